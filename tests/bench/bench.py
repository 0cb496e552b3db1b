"""leftssh against ``rsync -a`` over the same loopback OpenSSH server (SPEC section 8).

Run from the repository root::

    python tests/bench/bench.py [--quick] [--pairs N] [--out results.json]

Everything runs on 127.0.0.1: a throw-away sshd (``tests.sshd.Sshd``), and in front
of it a byte-counting TCP proxy (threads in this process) that both tools go
through, so the bytes each tool sends client->server and server->client are
counted the same way for both, independently of what leftssh reports.

Workloads (SPEC section 8):

* W1  one 500 MB random file, push (remote file deleted between runs)
* W2  the same file, pull (local file deleted between runs)
* W3  10,000 files of 100 B - 8 KB in 100 folders, push to an empty remote dir
* W3P W3's tree pulled into an empty local dir (no SPEC target: shown for reference)
* W4  no-op ``sync`` of W3 (already in sync; falls back to a no-op ``push`` when
      this leftssh has no ``sync`` command yet, and says so)
* W5  W1 push killed (SIGKILL) at ~40 % of the file, then resumed; the bytes the
      resumed run sends are measured as a fraction of the file size.  The rsync
      counterpart is ``rsync -a --partial`` killed likewise, then run again.
* MEM peak RSS of a no-op leftssh ``sync`` (or ``push``) of a 100,000-file tree.

The two tools run alternately (leftssh, rsync, leftssh, rsync, ...) so that slow
drifts of the machine hit both alike; the figure of merit is the median of the
per-pair ratios leftssh/rsync.  Peak RSS comes from ``/usr/bin/time`` (wait4
rusage of the leftssh process), or from polling /proc/PID/status VmHWM when
/usr/bin/time is missing.

The kill in W5 watches the remote partial file (``*.leftpart``; rsync's
``.big.bin.XXXXXX``) and lands within about 0.5 % of the 40 % mark at loopback
speed, so no ``--bwlimit`` is used.  The source data (the 500 MB file and the
trees) is made once and kept in ``--cache`` for later runs.

Each run also records the 1-minute load average: the machine may be shared, and
a load above the CPU count means the times are noisy (the pairwise ratios less so).

``--quick`` shrinks sizes and pair counts for a smoke run (about a minute).
``--profile DIR`` runs every leftssh under py-spy (see ``profsum.py``), and
``--serve`` only starts sshd and the proxy, for measuring by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.sshd import Sshd  # noqa: E402

ALIAS = "leftssh-bench"
MB = 1 << 20
TIME_BIN = "/usr/bin/time"
TARGETS = {  # SPEC section 8: ratio to rsync (or sent fraction for W5), peak RSS in MB
    "W1": {"ratio": 1.0, "rss_mb": 100},
    "W2": {"ratio": 1.0},
    "W3": {"ratio": 1.5},
    "W4": {"ratio": 1.5},
    "W5": {"resent_fraction": 0.62},
    "MEM": {"rss_mb": 100},
}


# -- the counting proxy ---------------------------------------------------------------------


class CountingProxy:
    """A TCP relay on 127.0.0.1 that counts bytes in each direction.

    Each connection gets two pump threads; bytes move with ``os.splice`` through a
    pipe (no copy into Python, the GIL released), with a recv/sendall fallback.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.c2s = 0
        self.s2c = 0
        self.active = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._closed = False
        self._splice = hasattr(os, "splice")
        self._thread = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)

    def start(self) -> CountingProxy:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.c2s, self.s2c

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until every relayed connection has closed (its bytes are all counted)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self.active:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            state = {"pumps": 2}
            with self._lock:
                self.active += 1
                self.connections += 1
            for src, dst, attr in ((client, server, "c2s"), (server, client, "s2c")):
                threading.Thread(
                    target=self._pump, args=(src, dst, attr, state, client, server), daemon=True
                ).start()

    def _count(self, attr: str, n: int) -> None:
        with self._lock:
            setattr(self, attr, getattr(self, attr) + n)

    def _pump(self, src, dst, attr, state, client, server) -> None:  # noqa: ANN001
        try:
            if self._splice:
                self._pump_splice(src, dst, attr)
            else:
                self._pump_copy(src, dst, attr)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
        except OSError:
            # A reset (e.g. a SIGKILLed client): unblock the other direction too.
            for s in (client, server):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        finally:
            with self._idle:
                state["pumps"] -= 1
                if state["pumps"] == 0:
                    client.close()
                    server.close()
                    self.active -= 1
                    self._idle.notify_all()

    def _pump_splice(self, src, dst, attr) -> None:  # noqa: ANN001
        r, w = os.pipe()
        with contextlib.suppress(OSError, AttributeError):
            import fcntl

            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)
        try:
            sfd, dfd = src.fileno(), dst.fileno()
            quickack = getattr(socket, "TCP_QUICKACK", None)
            while True:
                n = os.splice(sfd, w, 1 << 20)
                if n == 0:
                    return
                if quickack is not None:
                    # Acknowledge at once, as the endpoint behind the proxy would when it
                    # answers: a delayed ACK here would hold the sender's next small
                    # packet (Nagle) for up to 40 ms, a stall a direct connection lacks.
                    src.setsockopt(socket.IPPROTO_TCP, quickack, 1)
                self._count(attr, n)
                while n:
                    n -= os.splice(r, dfd, n)
        finally:
            os.close(r)
            os.close(w)

    def _pump_copy(self, src, dst, attr) -> None:  # noqa: ANN001
        buf = bytearray(1 << 18)
        view = memoryview(buf)
        while True:
            n = src.recv_into(buf)
            if n == 0:
                return
            self._count(attr, n)
            dst.sendall(view[:n])


# -- running one command ----------------------------------------------------------------------


@dataclass
class Run:
    tool: str
    seconds: float
    rc: int
    c2s: int
    s2c: int
    rss_kb: int | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)
    stdout: str = field(default="", repr=False)  # kept for parsing, not written out

    def as_dict(self) -> dict:
        d = {
            "tool": self.tool,
            "seconds": round(self.seconds, 4),
            "rc": self.rc,
            "c2s_bytes": self.c2s,
            "s2c_bytes": self.s2c,
            "peak_rss_kb": self.rss_kb,
        }
        if self.note:
            d["note"] = self.note
        d.update(self.extra)
        return d


class BenchError(RuntimeError):
    pass


def _vmhwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


class Runner:
    """Runs leftssh and rsync through the proxy and measures each run."""

    def __init__(self, bench: Bench) -> None:
        self.b = bench
        self.use_time = os.access(TIME_BIN, os.X_OK)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LEFTSSH_")}
        for k in ("SSH_AUTH_SOCK", "SSH_AGENT_PID"):
            self.env.pop(k, None)
        self.env["PYTHONPATH"] = str(REPO) + (
            os.pathsep + self.env["PYTHONPATH"] if self.env.get("PYTHONPATH") else ""
        )
        self.env["HOME"] = str(bench.home)
        self.rss_file = bench.work / "time.out"
        self.profiled = 0

    # command lines

    def leftssh_cmd(self, command: str, remote: Path, local: Path, *extra: str) -> list[str]:
        b = self.b
        return [
            sys.executable,
            "-m",
            "leftssh",
            command,
            f"{ALIAS}:{remote}",
            "-d",
            str(local),
            "-i",
            str(b.sshd.identity),
            "--known-hosts",
            str(b.known_hosts),
            "-F",
            str(b.ssh_config),
            "--json",
            "--no-progress",
            "-q",
            *extra,
        ]

    def rsync_cmd(self, src: str, dst: str, *extra: str) -> list[str]:
        return [
            "rsync",
            "-a",
            "--exclude=/.leftssh/",
            *extra,
            "-e",
            f"ssh -F {self.b.ssh_config}",
            src,
            dst,
        ]

    # execution

    def measure(self, tool: str, cmd: list[str], timeout: float, check: bool = True) -> Run:
        proxy = self.b.proxy
        if not proxy.wait_idle(10):
            raise BenchError("proxy still has open connections before a run")
        # What the previous run wrote reaches the disk now, not during this run: each
        # tool is timed on its own work, not on writing back the other's.
        os.sync()
        c0, s0 = proxy.snapshot()
        full = cmd
        if self.b.args.profile and tool == "leftssh":
            # Sampled out of process, so timings shift a little; for finding hot spots only.
            self.profiled += 1
            out = Path(self.b.args.profile) / f"{self.b.current}-{cmd[3]}-{self.profiled:02d}.txt"
            out.parent.mkdir(parents=True, exist_ok=True)
            full = ["py-spy", "record", "-r", "200", "-f", "raw", "--threads", "--idle"]
            full += ["-o", str(out), "--", *cmd]
        if self.use_time:
            with contextlib.suppress(FileNotFoundError):
                self.rss_file.unlink()
            full = [TIME_BIN, "-f", "%M", "-o", str(self.rss_file), *full]
        hwm: list[int] = []
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            full,
            cwd=self.b.work,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        poller = None
        if not self.use_time:
            poller = threading.Thread(target=self._poll_hwm, args=(proc, hwm), daemon=True)
            poller.start()
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise BenchError(f"{tool} timed out after {timeout:.0f}s: {' '.join(cmd)}") from None
        seconds = time.perf_counter() - t0
        if poller is not None:
            poller.join(1)
        if not proxy.wait_idle(10):
            raise BenchError(f"{tool}: connections still open 10 s after exit")
        c1, s1 = proxy.snapshot()
        rss = None
        if self.use_time:
            with contextlib.suppress(OSError, ValueError):
                rss = int(self.rss_file.read_text().split()[-1])
        elif hwm:
            rss = max(hwm)
        run = Run(tool, seconds, proc.returncode, c1 - c0, s1 - s0, rss)
        run.extra["load1"] = round(os.getloadavg()[0], 2)
        run.stdout = out.decode(errors="replace")
        summary = [o["summary"] for o in _json_lines(run.stdout[-4000:]) if "summary" in o]
        if summary:
            run.extra["summary"] = summary[-1]
        if proc.returncode != 0:
            run.note = err.decode(errors="replace").strip()[-1000:]
            if check:
                raise BenchError(
                    f"{tool} exited {proc.returncode}: {' '.join(cmd)}\n{run.note}\n"
                    + out.decode(errors="replace")[-1000:]
                )
        return run

    @staticmethod
    def _poll_hwm(proc: subprocess.Popen, hwm: list[int]) -> None:
        while proc.poll() is None:
            v = _vmhwm(proc.pid)
            if v:
                hwm.append(v)
            time.sleep(0.02)

    def killed_at(
        self,
        tool: str,
        cmd: list[str],
        watch_dir: Path,
        is_partial,  # noqa: ANN001
        total: int,
        fraction: float,
        timeout: float,
    ) -> dict:
        """Start ``cmd``, SIGKILL it once a partial file in ``watch_dir`` reaches ``fraction``."""
        proxy = self.b.proxy
        proxy.wait_idle(10)
        c0, s0 = proxy.snapshot()
        want = int(total * fraction)
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            cwd=self.b.work,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        seen = 0
        killed = False
        try:
            while time.perf_counter() - t0 < timeout:
                if proc.poll() is not None:
                    break
                seen = max(seen, _partial_size(watch_dir, is_partial))
                if seen >= want:
                    os.kill(proc.pid, signal.SIGKILL)
                    killed = True
                    break
                time.sleep(0.002)
        finally:
            if proc.poll() is None and not killed:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        seconds = time.perf_counter() - t0
        proxy.wait_idle(15)
        # let the server side finish writing what it had received
        size = _settle(watch_dir, is_partial)
        c1, s1 = proxy.snapshot()
        return {
            "tool": tool,
            "killed": killed,
            "seconds": round(seconds, 4),
            "kill_trigger_bytes": seen,
            "partial_bytes_after_kill": size,
            "partial_fraction": round(size / total, 4) if total else None,
            "c2s_bytes": c1 - c0,
            "s2c_bytes": s1 - s0,
        }


def _partial_size(directory: Path, is_partial) -> int:  # noqa: ANN001
    best = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if is_partial(entry.name):
                with contextlib.suppress(OSError):
                    best = max(best, entry.stat(follow_symlinks=False).st_size)
    return best


def _settle(directory: Path, is_partial, wait: float = 3.0) -> int:  # noqa: ANN001
    """Return the partial's size once it stops growing (the server may still be writing)."""
    deadline = time.monotonic() + wait
    last = -1
    while time.monotonic() < deadline:
        size = _partial_size(directory, is_partial)
        if size == last:
            return size
        last = size
        time.sleep(0.1)
    return last


# -- data -------------------------------------------------------------------------------------


def make_big_file(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size == size:
        return
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(8 * MB, left)
            f.write(os.urandom(n))
            left -= n


def make_small_tree(root: Path, files: int, folders: int, lo: int, hi: int, seed: int) -> None:
    marker = root.parent / f"{root.name}.complete"
    if marker.exists():
        return
    if root.exists():
        shutil.rmtree(root)
    rng = random.Random(seed)
    per = files // folders
    for d in range(folders):
        folder = root / f"d{d:04d}"
        folder.mkdir(parents=True)
        count = per if d < folders - 1 else files - per * (folders - 1)
        for i in range(count):
            size = rng.randint(lo, hi)
            with open(folder / f"f{i:05d}.bin", "wb") as f:
                f.write(rng.randbytes(size))
    marker.touch()


def copy_tree(src: Path, dst: Path) -> None:
    """Copy a tree with its mtimes, so that both sides already agree."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)


def clear_dir(path: Path) -> None:
    """Empty a directory but keep it."""
    path.mkdir(parents=True, exist_ok=True)
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


def count_files(root: Path) -> int:
    n = 0
    for _, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".left")]
        n += sum(1 for f in files if not f.startswith(".left"))
    return n


# -- the benchmark ----------------------------------------------------------------------------


@dataclass
class Sizes:
    big: int
    small_files: int
    small_folders: int
    mem_files: int
    mem_folders: int
    pairs: dict[str, int]


FULL = Sizes(
    big=500 * 1000 * 1000,
    small_files=10_000,
    small_folders=100,
    mem_files=100_000,
    mem_folders=1000,
    pairs={"W1": 5, "W2": 5, "W3": 5, "W3P": 3, "W4": 5, "W5": 5},
)
QUICK = Sizes(
    big=50 * 1000 * 1000,
    small_files=1000,
    small_folders=20,
    mem_files=10_000,
    mem_folders=100,
    pairs={"W1": 2, "W2": 2, "W3": 2, "W3P": 2, "W4": 2, "W5": 2},
)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = QUICK if args.quick else FULL
        if args.pairs:
            self.sizes.pairs = {k: args.pairs for k in self.sizes.pairs}
        if args.workdir:
            self.work = Path(args.workdir).absolute()
            self.work.mkdir(parents=True, exist_ok=True)
            self._own_work = False
        else:
            self.work = Path(tempfile.mkdtemp(prefix="leftssh-bench-"))
            self._own_work = True
        self.home = self.work / "home"
        self.home.mkdir(exist_ok=True)
        # Source data is made once and reused by later runs (the 500 MB file, the trees).
        self.cache = Path(args.cache).absolute()
        if args.fresh and self.cache.exists():
            shutil.rmtree(self.cache)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.data = self.work / "data"  # the "local" side
        self.remote = self.work / "remote"  # the "remote" side (same machine, via sshd)
        self.sshd = Sshd(self.work / "sshd")
        self.proxy: CountingProxy | None = None
        self.runner: Runner | None = None
        self.results: dict = {"workloads": {}, "notes": []}
        self.sync_command = "sync"
        self.current = ""

    # setup

    def start(self) -> None:
        self.sshd.start()
        self.proxy = CountingProxy(self.sshd.port).start()
        host_key = " ".join(self.sshd.host_key_pub.read_text().split()[:2])
        self.known_hosts = self.work / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.proxy.port} {host_key}\n")
        self.ssh_config = self.work / "ssh_config"
        self.ssh_config.write_text(
            f"Host {ALIAS}\n"
            "    HostName 127.0.0.1\n"
            f"    Port {self.proxy.port}\n"
            f"    User {self.sshd.user}\n"
            f"    IdentityFile {self.sshd.identity}\n"
            "    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {self.known_hosts}\n"
            "    GlobalKnownHostsFile /dev/null\n"
            "    StrictHostKeyChecking yes\n"
            "    BatchMode yes\n"
            "    ControlMaster no\n"
            "    ControlPath none\n"
        )
        self.ssh_config.chmod(0o600)
        self.runner = Runner(self)
        # An installed package is byte-compiled (pip does it at install time); a
        # checkout run with PYTHONDONTWRITEBYTECODE set would otherwise compile every
        # module of leftssh again at each start. Compile once, as an install would.
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", str(REPO / "leftssh")],
            check=True,
            env=self.runner.env,
        )
        probe = subprocess.run(
            [sys.executable, "-m", "leftssh", "sync", "--help"],
            cwd=self.work,
            env=self.runner.env,
            capture_output=True,
        )
        if probe.returncode != 0:
            self.sync_command = "push"
            self.note(
                "leftssh has no `sync` command yet: W4 and MEM run a no-op `push` instead "
                "(same scan + listing + plan, no two-way state)"
            )
        ssh_v = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
        rsync_v = subprocess.run(["rsync", "--version"], capture_output=True, text=True)
        self.results["meta"] = {
            "quick": self.args.quick,
            "pairs": self.sizes.pairs,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "ssh": ssh_v,
            "rsync": rsync_v.stdout.splitlines()[0] if rsync_v.stdout else "",
            "peak_rss_from": TIME_BIN if self.runner.use_time else "/proc/PID/status VmHWM",
            "proxy": "splice" if hasattr(os, "splice") else "recv/sendall",
            "sync_command": self.sync_command,
            "workdir": str(self.work),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
        self.sshd.stop()
        if self._own_work and not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)

    def note(self, text: str) -> None:
        print(f"note: {text}", flush=True)
        self.results["notes"].append(text)

    # helpers

    def alternate(self, name: str, left, right, reset_left=None, reset_right=None) -> dict:  # noqa: ANN001
        """Run leftssh (left) and rsync (right) alternately; return a summary."""
        pairs = self.sizes.pairs[name]
        runs: list[tuple[Run, Run]] = []
        for i in range(pairs):
            if reset_left:
                reset_left()
            a = left()
            if reset_right:
                reset_right()
            b = right()
            runs.append((a, b))
            print(
                f"  {name} pair {i + 1}/{pairs}: leftssh {a.seconds:7.2f}s  rsync {b.seconds:7.2f}s"
                f"  ratio {a.seconds / b.seconds:5.2f}  rss {_mb(a.rss_kb)}",
                flush=True,
            )
        return summarize(runs)

    def big_source(self) -> Path:
        """The directory holding big.bin (cached)."""
        src = self.cache / f"big-{self.sizes.big}"
        make_big_file(src / "big.bin", self.sizes.big)
        return src

    def run_w1(self) -> None:
        size = self.sizes.big
        src = self.big_source()
        dst_l, dst_r = self.remote / "w1-leftssh", self.remote / "w1-rsync"
        r = self.runner
        assert r is not None

        def reset(d: Path) -> None:
            clear_dir(d)

        def left() -> Run:
            run = r.measure("leftssh", r.leftssh_cmd("push", dst_l, src), 600)
            check_size(dst_l / "big.bin", size)
            return run

        def right() -> Run:
            run = r.measure("rsync", r.rsync_cmd(f"{src}/", f"{ALIAS}:{dst_r}/"), 600)
            check_size(dst_r / "big.bin", size)
            return run

        s = self.alternate("W1", left, right, lambda: reset(dst_l), lambda: reset(dst_r))
        s["file_bytes"] = size
        self.results["workloads"]["W1"] = s

    def run_w2(self) -> None:
        size = self.sizes.big
        src_file = self.big_source() / "big.bin"
        remote_src = self.remote / "w2-source"
        clear_dir(remote_src)
        try:
            os.link(src_file, remote_src / "big.bin")
        except OSError:
            shutil.copy2(src_file, remote_src / "big.bin")
        dst_l, dst_r = self.data / "w2-leftssh", self.data / "w2-rsync"
        r = self.runner
        assert r is not None

        def left() -> Run:
            run = r.measure("leftssh", r.leftssh_cmd("pull", remote_src, dst_l), 600)
            check_size(dst_l / "big.bin", size)
            return run

        def right() -> Run:
            run = r.measure("rsync", r.rsync_cmd(f"{ALIAS}:{remote_src}/", f"{dst_r}/"), 600)
            check_size(dst_r / "big.bin", size)
            return run

        def reset(d: Path) -> None:
            with contextlib.suppress(FileNotFoundError):
                (d / "big.bin").unlink()
            d.mkdir(parents=True, exist_ok=True)

        s = self.alternate("W2", left, right, lambda: reset(dst_l), lambda: reset(dst_r))
        s["file_bytes"] = size
        self.results["workloads"]["W2"] = s

    def small_tree(self) -> Path:
        z = self.sizes
        src = self.cache / f"small-{z.small_files}"
        make_small_tree(src, z.small_files, z.small_folders, 100, 8192, seed=3)
        return src

    def run_w3(self) -> None:
        """W3's tree pushed into a fresh remote directory per run."""
        self._small_tree_runs("W3", "push", self.small_tree(), self.remote)

    def run_w3p(self) -> None:
        """W3's tree pulled into a fresh local directory per run (no target in SPEC 8)."""
        src = self.remote / "w3p-source"
        copy_tree(self.small_tree(), src)
        try:
            self._small_tree_runs("W3P", "pull", src, self.data)
        finally:
            shutil.rmtree(src, ignore_errors=True)

    def _small_tree_runs(self, name: str, command: str, src: Path, into: Path) -> None:
        """Copy the small tree ``src`` (``push`` from local, ``pull`` from remote) into
        a new directory under ``into`` per run, alternating leftssh and rsync."""
        n = self.sizes.small_files
        r = self.runner
        assert r is not None
        # Every run gets a destination of its own, and all are removed after the last
        # pair: removing 10,000 files keeps the kernel busy for seconds afterwards
        # (journal, discards), and a run timed right after such a removal creates its
        # files several times slower, whichever tool it is.
        made: list[Path] = []

        def fresh(tool: str) -> Path:
            d = into / f"{name.lower()}-{tool}-{len(made)}"
            made.append(d)
            return d

        def left() -> Run:
            dst = fresh("leftssh")
            remote, local = (dst, src) if command == "push" else (src, dst)
            run = r.measure("leftssh", r.leftssh_cmd(command, remote, local), 600)
            check_count(dst, n)
            return run

        def right() -> Run:
            dst = fresh("rsync")
            if command == "push":
                args = (f"{src}/", f"{ALIAS}:{dst}/")
            else:
                args = (f"{ALIAS}:{src}/", f"{dst}/")
            run = r.measure("rsync", r.rsync_cmd(*args), 600)
            check_count(dst, n)
            return run

        try:
            s = self.alternate(name, left, right)
        finally:
            for d in made:
                shutil.rmtree(d, ignore_errors=True)
            os.sync()
        s["files"] = n
        self.results["workloads"][name] = s

    def run_w4(self) -> None:
        src = self.small_tree()
        local = self.data / "w4-local"
        copy_tree(src, local)
        dst_l, dst_r = self.remote / "w4-leftssh", self.remote / "w4-rsync"
        copy_tree(src, dst_l)
        copy_tree(src, dst_r)
        r = self.runner
        assert r is not None
        cmd_l = r.leftssh_cmd(self.sync_command, dst_l, local)
        cmd_r = r.rsync_cmd(f"{local}/", f"{ALIAS}:{dst_r}/")
        # One untimed run each first: caches warm, and sync records its base state.
        warm = r.measure("leftssh", cmd_l, 600, check=False)
        if warm.rc != 0 and self.sync_command == "sync":
            self.note(f"`sync` warm-up exited {warm.rc} ({warm.note[-200:]}); W4 uses `push`")
            self.sync_command = "push"
            cmd_l = r.leftssh_cmd("push", dst_l, local)
            r.measure("leftssh", cmd_l, 600)
        r.measure("rsync", cmd_r, 600)

        def left() -> Run:
            run = r.measure("leftssh", cmd_l, 600)
            moved = _json_actions(run.stdout)
            if moved:
                run.note = f"no-op run performed actions: {moved}"
            return run

        def right() -> Run:
            return r.measure("rsync", cmd_r, 600)

        s = self.alternate("W4", left, right)
        s["command"] = self.sync_command
        s["files"] = self.sizes.small_files
        self.results["workloads"]["W4"] = s

    def run_w5(self) -> None:
        size = self.sizes.big
        src = self.big_source()
        dst_l, dst_r = self.remote / "w5-leftssh", self.remote / "w5-rsync"
        r = self.runner
        assert r is not None
        pairs = self.sizes.pairs["W5"]
        frac = 0.40
        rows = []
        for i in range(pairs):
            clear_dir(dst_l)
            cmd = r.leftssh_cmd("push", dst_l, src)
            kill_l = r.killed_at(
                "leftssh", cmd, dst_l, lambda n: n.endswith(".leftpart"), size, frac, 300
            )
            if not kill_l["killed"]:
                raise BenchError(f"W5: leftssh finished before reaching {frac:.0%}: {kill_l}")
            res_l = r.measure("leftssh", cmd, 600)
            check_size(dst_l / "big.bin", size)
            resumed_from = _json_field(res_l.stdout, "resumed_from")
            clear_dir(dst_r)
            rcmd = r.rsync_cmd(f"{src}/", f"{ALIAS}:{dst_r}/", "--partial")
            kill_r = r.killed_at(
                "rsync",
                rcmd,
                dst_r,
                lambda n: n == "big.bin" or n.startswith(".big.bin."),
                size,
                frac,
                300,
            )
            res_r = r.measure("rsync", rcmd, 600)
            check_size(dst_r / "big.bin", size)
            row = {
                "leftssh_kill": kill_l,
                "leftssh_resume": res_l.as_dict(),
                "leftssh_resumed_from": resumed_from,
                "leftssh_resent_fraction": round(res_l.c2s / size, 4),
                "rsync_kill": kill_r,
                "rsync_resume": res_r.as_dict(),
                "rsync_resent_fraction": round(res_r.c2s / size, 4),
            }
            rows.append(row)
            print(
                f"  W5 pair {i + 1}/{pairs}: killed at {kill_l['partial_fraction']:.1%} "
                f"(rsync {kill_r['partial_fraction'] or 0:.1%}); resume leftssh "
                f"{res_l.seconds:6.2f}s sent {row['leftssh_resent_fraction']:.1%} "
                f"(resumed_from {resumed_from}), rsync {res_r.seconds:6.2f}s sent "
                f"{row['rsync_resent_fraction']:.1%}  rss {_mb(res_l.rss_kb)}",
                flush=True,
            )
        med = statistics.median
        self.results["workloads"]["W5"] = {
            "pairs": rows,
            "file_bytes": size,
            "kill_fraction_target": frac,
            "leftssh_partial_fraction_median": med(
                r_["leftssh_kill"]["partial_fraction"] for r_ in rows
            ),
            "leftssh_resent_fraction_median": med(r_["leftssh_resent_fraction"] for r_ in rows),
            "leftssh_resent_fraction_max": max(r_["leftssh_resent_fraction"] for r_ in rows),
            "rsync_resent_fraction_median": med(r_["rsync_resent_fraction"] for r_ in rows),
            "leftssh_resume_seconds_median": med(r_["leftssh_resume"]["seconds"] for r_ in rows),
            "rsync_resume_seconds_median": med(r_["rsync_resume"]["seconds"] for r_ in rows),
            "ratio_median": med(
                r_["leftssh_resume"]["seconds"] / r_["rsync_resume"]["seconds"] for r_ in rows
            ),
            "leftssh_peak_rss_kb": max((r_["leftssh_resume"]["peak_rss_kb"] or 0) for r_ in rows),
        }

    def run_bw(self) -> None:
        """--bwlimit accuracy: push a 50 MB file at 10 MiB/s; the rate must be within 10 %.

        The rate is read off the counting proxy while the push runs: bytes sent
        client-to-server sampled every 50 ms, and the slope between 10 % and 90 % of
        the file (connection set-up and the final verification are outside that span).
        """
        size = 50 * 1000 * 1000 if not self.args.quick else 10 * 1000 * 1000
        limit = 10 * 1024 * 1024
        src = self.cache / f"bw-{size}" / "local"
        make_big_file(src / "bw.bin", size)
        r = self.runner
        proxy = self.proxy
        assert r is not None and proxy is not None
        remote = self.work / "bw-remote"
        rates = []
        for _ in range(2 if not self.args.quick else 1):
            clear_dir(remote)
            if not proxy.wait_idle(10):
                raise BenchError("proxy still has open connections before a run")
            base = proxy.snapshot()[0]
            cmd = r.leftssh_cmd("push", remote, src, "--bwlimit", str(limit))
            proc = subprocess.Popen(
                cmd,
                cwd=self.work,
                env=r.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            samples: list[tuple[float, int]] = []
            while proc.poll() is None:
                samples.append((time.perf_counter(), proxy.snapshot()[0] - base))
                time.sleep(0.05)
            if proc.returncode != 0:
                raise BenchError(f"BW push failed: {proc.stderr.read().decode()[-500:]}")
            span = [(t, b) for t, b in samples if 0.1 * size <= b <= 0.9 * size]
            if len(span) < 2:
                raise BenchError("BW: too few samples inside the transfer")
            (t0, b0), (t1, b1) = span[0], span[-1]
            rates.append((b1 - b0) / (t1 - t0))
        rate = statistics.median(rates)
        ok = abs(rate - limit) <= 0.10 * limit
        self.results["workloads"]["BW"] = {
            "file_bytes": size,
            "limit_bytes_per_s": limit,
            "rates_bytes_per_s": rates,
            "rate_median": rate,
            "deviation": rate / limit - 1,
            "within_10_percent": ok,
        }
        print(
            f"  BW: --bwlimit {limit / 1048576:.0f} MiB/s on {size / 1e6:.0f} MB: measured "
            f"{rate / 1048576:.2f} MiB/s ({rate / limit - 1:+.1%}; "
            f"{'within' if ok else 'NOT within'} 10 %)",
            flush=True,
        )

    def run_mem(self) -> None:
        z = self.sizes
        # Made once and kept in the cache: a no-op run leaves both copies as they are.
        base = self.cache / f"mem-{z.mem_files}"
        local, remote = base / "local", base / "remote"
        make_small_tree(local, z.mem_files, z.mem_folders, 0, 100, seed=5)
        marker = base / "remote.complete"
        if not marker.exists():
            copy_tree(local, remote)
            marker.touch()
        r = self.runner
        assert r is not None
        cmd = r.leftssh_cmd(self.sync_command, remote, local)
        first = None
        if self.sync_command == "sync":
            first = r.measure("leftssh", cmd, 900, check=False)
        run = r.measure("leftssh", cmd, 900)
        rs = r.measure("rsync", r.rsync_cmd(f"{local}/", f"{ALIAS}:{remote}/"), 900)
        self.results["workloads"]["MEM"] = {
            "files": z.mem_files,
            "command": self.sync_command,
            "leftssh": run.as_dict(),
            "leftssh_first_sync": first.as_dict() if first else None,
            "rsync": rs.as_dict(),
            "leftssh_peak_rss_kb": run.rss_kb,
            "leftssh_seconds": run.seconds,
            "rsync_seconds": rs.seconds,
        }
        print(
            f"  MEM: no-op {self.sync_command} of {z.mem_files} files: leftssh {run.seconds:.2f}s "
            f"rss {_mb(run.rss_kb)}; rsync {rs.seconds:.2f}s rss {_mb(rs.rss_kb)}",
            flush=True,
        )


def _json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            obj = json.loads(line)
            if isinstance(obj, dict):
                out.append(obj)
    return out


def _json_field(text: str, name: str):  # noqa: ANN202
    for obj in _json_lines(text):
        if name in obj:
            return obj[name]
    return None


def _json_actions(text: str) -> int:
    return sum(1 for o in _json_lines(text) if "action" in o and o.get("action") != "skip")


def check_size(path: Path, size: int) -> None:
    got = path.stat().st_size if path.exists() else None
    if got != size:
        raise BenchError(f"{path}: expected {size} bytes, found {got}")


def check_count(root: Path, n: int) -> None:
    got = count_files(root)
    if got != n:
        raise BenchError(f"{root}: expected {n} files, found {got}")


def summarize(runs: list[tuple[Run, Run]]) -> dict:
    med = statistics.median
    a = [p[0] for p in runs]
    b = [p[1] for p in runs]
    return {
        "leftssh_seconds_median": med(r.seconds for r in a),
        "rsync_seconds_median": med(r.seconds for r in b),
        "ratio_median": med(x.seconds / y.seconds for x, y in runs),
        "ratios": [round(x.seconds / y.seconds, 4) for x, y in runs],
        "leftssh_peak_rss_kb": max((r.rss_kb or 0) for r in a),
        "rsync_peak_rss_kb": max((r.rss_kb or 0) for r in b),
        "leftssh_c2s_bytes_median": med(r.c2s for r in a),
        "leftssh_s2c_bytes_median": med(r.s2c for r in a),
        "rsync_c2s_bytes_median": med(r.c2s for r in b),
        "rsync_s2c_bytes_median": med(r.s2c for r in b),
        "runs": [[x.as_dict(), y.as_dict()] for x, y in runs],
    }


def _find(obj: object, key: str):  # noqa: ANN202
    """Yield every value stored under ``key`` anywhere in a JSON-like structure."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                yield v
            else:
                yield from _find(v, key)
    elif isinstance(obj, list):
        for v in obj:
            yield from _find(v, key)


def _mb(kb: int | None) -> str:
    return "?" if not kb else f"{kb / 1024:.0f}MB"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("ok" if ok else "MISS")


def print_table(results: dict) -> None:
    w = results["workloads"]
    print()
    hdr = (
        f"{'work':4} {'leftssh s':>9} {'rsync s':>8} {'ratio':>6} {'target':>7} {'':4} "
        f"{'rss MB':>7} {'leftssh c2s/s2c':>19} {'rsync c2s/s2c':>19}"
    )
    print(hdr)
    print("-" * len(hdr))
    for name in ("W1", "W2", "W3", "W3P", "W4"):
        s = w.get(name)
        if not s or "error" in s:
            if s:
                print(f"{name:4} FAILED: {s['error'].splitlines()[0][:100]}")
            continue
        rss = s["leftssh_peak_rss_kb"] / 1024
        if name in TARGETS:
            target = "<=" + str(TARGETS[name]["ratio"])
            ok = s["ratio_median"] <= TARGETS[name]["ratio"]
            rss_t = TARGETS[name].get("rss_mb")
            if rss_t and rss > rss_t:
                ok = False
            mark = verdict(ok)
        else:
            target, mark = "-", ""
        cmd = f" ({s['command']})" if "command" in s else ""
        print(
            f"{name:4} {s['leftssh_seconds_median']:9.2f} {s['rsync_seconds_median']:8.2f} "
            f"{s['ratio_median']:6.2f} {target:>7} {mark:4} {rss:7.0f} "
            f"{_size(s['leftssh_c2s_bytes_median']) + '/' + _size(s['leftssh_s2c_bytes_median']):>19} "
            f"{_size(s['rsync_c2s_bytes_median']) + '/' + _size(s['rsync_s2c_bytes_median']):>19}"
            f"{cmd}"
        )
    s = w.get("W5")
    if s and "error" in s:
        print(f"W5   FAILED: {s['error'].splitlines()[0][:100]}")
    elif s:
        ok = s["leftssh_resent_fraction_median"] <= TARGETS["W5"]["resent_fraction"]
        print(
            f"W5   resume {s['leftssh_resume_seconds_median']:.2f}s vs rsync "
            f"{s['rsync_resume_seconds_median']:.2f}s (ratio {s['ratio_median']:.2f}); killed at "
            f"{s['leftssh_partial_fraction_median']:.1%}; leftssh resent "
            f"{s['leftssh_resent_fraction_median']:.1%} (max {s['leftssh_resent_fraction_max']:.1%}, "
            f"target <=62%) {verdict(ok)}; rsync --partial resent "
            f"{s['rsync_resent_fraction_median']:.1%}; rss {s['leftssh_peak_rss_kb'] / 1024:.0f}MB"
        )
    s = w.get("MEM")
    if s and "error" in s:
        print(f"MEM  FAILED: {s['error'].splitlines()[0][:100]}")
    elif s:
        rss = (s["leftssh_peak_rss_kb"] or 0) / 1024
        print(
            f"MEM  no-op {s['command']} of {s['files']} files: leftssh {s['leftssh_seconds']:.2f}s, "
            f"peak RSS {rss:.0f}MB (target <=100MB) {verdict(rss <= 100)}; rsync "
            f"{s['rsync_seconds']:.2f}s"
        )


def serve(bench: Bench) -> None:
    """Keep sshd and the proxy up until SIGINT/SIGTERM; print how to use them."""
    r = bench.runner
    assert r is not None and bench.proxy is not None
    example = r.leftssh_cmd("push", bench.remote / "x", bench.data / "x")
    print("leftssh:", " ".join(example[:3]), "push", *example[4:], sep=" ")
    print("rsync:  ", " ".join(r.rsync_cmd("SRC/", f"{ALIAS}:/DST/")))
    print("Ctrl-C to stop", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(5):
        c2s, s2c = bench.proxy.snapshot()
        print(
            f"  proxy: {bench.proxy.connections} connections, {c2s} bytes up, {s2c} down", end="\r"
        )
    print()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, 2 pairs: a smoke run")
    p.add_argument("--pairs", type=int, help="pairs per workload (default 5, --quick 2)")
    p.add_argument("--out", default=str(REPO / "tests" / "bench" / "results.json"))
    p.add_argument(
        "--only", default="W1,W2,W3,W3P,W4,W5,MEM,BW", help="comma-separated workloads to run"
    )
    p.add_argument("--workdir", help="work here instead of in a new temp dir")
    p.add_argument(
        "--cache",
        default=os.path.join(tempfile.gettempdir(), "leftssh-bench-cache"),
        help="where the source data (made once) is kept between runs (default: %(default)s)",
    )
    p.add_argument("--fresh", action="store_true", help="remake the cached source data")
    p.add_argument("--keep", action="store_true", help="do not delete the temp work dir")
    p.add_argument(
        "--serve",
        action="store_true",
        help="only start sshd and the counting proxy, print how to reach them, and wait for "
        "Ctrl-C (for profiling leftssh by hand)",
    )
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="run every leftssh under `py-spy record -f raw` and keep the stacks in DIR "
        "(summarize with tests/bench/profsum.py); timings are then not comparable",
    )
    args = p.parse_args(argv)
    only = [x.strip().upper() for x in args.only.split(",") if x.strip()]
    t0 = time.perf_counter()
    bench = Bench(args)
    code = 0
    try:
        bench.start()
        print(
            f"leftssh benchmark: sshd on 127.0.0.1:{bench.sshd.port}, counting proxy on "
            f"127.0.0.1:{bench.proxy.port}, workdir {bench.work}"
            + (" (quick)" if args.quick else ""),
            flush=True,
        )
        if args.serve:
            serve(bench)
            return 0
        steps = {
            "W1": bench.run_w1,
            "W2": bench.run_w2,
            "W3": bench.run_w3,
            "W3P": bench.run_w3p,
            "W4": bench.run_w4,
            "W5": bench.run_w5,
            "MEM": bench.run_mem,
            "BW": bench.run_bw,
        }
        for name in only:
            t1 = time.perf_counter()
            bench.current = name
            print(f"{name} ...", flush=True)
            try:
                steps[name]()
            except BenchError as e:
                code = 1
                bench.results["workloads"][name] = {"error": str(e)}
                print(f"  {name} FAILED: {e}", flush=True)
            print(f"  {name} took {time.perf_counter() - t1:.1f}s", flush=True)
    finally:
        total = time.perf_counter() - t0
        bench.results["total_seconds"] = round(total, 1)
        if bench.proxy is not None:
            bench.results["meta"]["proxy_connections"] = bench.proxy.connections
        bench.stop()
    print_table(bench.results)
    loads = list(_find(bench.results, "load1"))
    if loads:
        bench.results["meta"]["load1_max"] = max(loads)
        print(
            f"\n1-minute load average after each run: median {statistics.median(loads):.2f}, "
            f"max {max(loads):.2f} on {os.cpu_count()} CPUs"
        )
        if max(loads) > (os.cpu_count() or 1) + 1:
            print(
                "warning: other processes competed for the CPUs during this run; "
                "times are noisy (the pairwise ratios less so)"
            )
    print(f"total time {total:.1f}s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(bench.results, indent=1) + "\n")
    print(f"results written to {out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
