"""Parse TARGET arguments and resolve SSH settings from the SSH config."""

from __future__ import annotations

import getpass
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from leftssh.errors import UsageError

DEFAULT_REMOTE_PATH = "share"
_LOCAL_PREFIXES = ("/", "./", "../", "~/")
_HOST_RE = re.compile(r"^[A-Za-z0-9_.%+\-]+$")
_IPV6_RE = re.compile(r"^[0-9A-Fa-f:.%A-Za-z]+$")
_USER_RE = re.compile(r"^[^\s/:@\x00-\x1f\x7f]+$")


@dataclass(frozen=True)
class Target:
    """Where the other side lives: a local directory or an SSH peer's path."""

    raw: str
    local_path: Path | None = None
    host: str = ""
    user: str | None = None
    port: int | None = None
    path: str = DEFAULT_REMOTE_PATH

    def label(self) -> str:
        """Return the target as shown in output (``user@host:path``)."""
        if self.local_path is not None:
            return str(self.local_path)
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        if port:
            return (
                f"ssh://{user}{host}{port}/{self.path.lstrip('/')}"
                if self.path.startswith("/")
                else f"ssh://{user}{host}{port}/~/{self.path}"
            )
        return f"{user}{host}:{self.path}"


def is_local_target(text: str) -> bool:
    """Tell whether TARGET names a local directory (SPEC section 2)."""
    return text in (".", "..", "~") or text.startswith(_LOCAL_PREFIXES)


def parse_target(text: str) -> Target:
    """Parse ``[user@]host[:path]``, ``ssh://[user@]host[:port][/path]`` or a local path."""
    if not text or any(c in text for c in "\x00\n\r"):
        raise UsageError(f"invalid target {text!r}")
    if is_local_target(text):
        return Target(raw=text, local_path=Path(os.path.expanduser(text)).absolute())
    if text.startswith("ssh://"):
        return _parse_url(text)
    return _parse_scp(text)


def _parse_url(text: str) -> Target:
    rest = text[len("ssh://") :]
    authority, slash, path = rest.partition("/")
    user, host, port = _split_authority(authority, text, allow_port=True)
    if not slash or path == "":
        remote = DEFAULT_REMOTE_PATH
    elif path == "~":
        remote = "."
    elif path.startswith("~/"):
        remote = path[2:] or "."
    else:
        remote = "/" + path
    return Target(raw=text, host=host, user=user, port=port, path=_clean_remote_path(remote, text))


def _parse_scp(text: str) -> Target:
    if text.startswith("[") or "@[" in text:
        user_part, _, rest = text.partition("[") if text.startswith("[") else text.partition("@[")
        user = user_part if not text.startswith("[") else ""
        host, close, after = rest.partition("]")
        if not close:
            raise UsageError(f"invalid target {text!r}: unclosed '['")
        if after and not after.startswith(":"):
            raise UsageError(f"invalid target {text!r}")
        path = after[1:] if after else None
        authority = f"{user}@[{host}]" if user else f"[{host}]"
    else:
        authority, colon, path_text = text.partition(":")
        path = path_text if colon else None
    user, host, _ = _split_authority(authority, text, allow_port=False)
    if path is None:
        remote = DEFAULT_REMOTE_PATH
    elif path in ("", "~"):
        remote = "."
    elif path.startswith("~/"):
        remote = path[2:] or "."
    else:
        remote = path
    return Target(raw=text, host=host, user=user, port=None, path=_clean_remote_path(remote, text))


def _split_authority(
    authority: str, text: str, *, allow_port: bool
) -> tuple[str | None, str, int | None]:
    user: str | None = None
    if "@" in authority:
        user, _, authority = authority.rpartition("@")
        if not user or not _USER_RE.match(user) or user.startswith("-"):
            raise UsageError(f"invalid user name in target {text!r}")
    port: int | None = None
    if authority.startswith("["):
        host, close, after = authority[1:].partition("]")
        if not close or not host or not _IPV6_RE.match(host):
            raise UsageError(f"invalid host in target {text!r}")
        port_text = after[1:] if after.startswith(":") else None
        if after and port_text is None:
            raise UsageError(f"invalid target {text!r}")
    else:
        host, colon, port_text_raw = authority.partition(":")
        port_text = port_text_raw if colon else None
        if not host or not _HOST_RE.match(host) or host.startswith("-"):
            raise UsageError(f"invalid host in target {text!r}")
    if port_text is not None:
        if not allow_port:
            raise UsageError(f"invalid target {text!r}")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise UsageError(f"invalid port in target {text!r}")
        port = int(port_text)
    return user, host, port


def _clean_remote_path(path: str, text: str) -> str:
    if path.startswith("~"):
        raise UsageError(f"invalid target {text!r}: only '~/' paths are supported")
    if any(ord(c) < 32 for c in path):
        raise UsageError(f"invalid path in target {text!r}")
    absolute = path.startswith("/")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    cleaned = "/".join(parts)
    if absolute:
        return "/" + cleaned
    return cleaned or "."


@dataclass
class SshSettings:
    """Everything needed to open the SSH connection, after the SSH config."""

    alias: str
    hostname: str
    port: int
    user: str
    identity_files: list[Path] = field(default_factory=list)
    explicit_identity: Path | None = None
    identities_only: bool = False
    known_hosts: list[Path] = field(default_factory=list)
    strict_host_key: str = "yes"
    proxy_jump: str | None = None
    connect_timeout: float = 30.0
    keepalive: int = 0
    compression: bool = False
    jump: SshSettings | None = None

    def known_hosts_name(self) -> str:
        """The name the host key is recorded under (``[host]:port`` off port 22)."""
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"


def _yes(value: str | None) -> bool:
    return (value or "").strip().lower() in ("yes", "true", "on")


def resolve_ssh(
    target: Target,
    *,
    port: int | None = None,
    identity: str | None = None,
    ssh_config: str | None = None,
    known_hosts: str | None = None,
    accept_new: bool = False,
    timeout: float = 30.0,
    compress: bool = False,
    _depth: int = 0,
    _hops: list[str] | None = None,
) -> SshSettings:
    """Combine TARGET, command-line options and the SSH config (options win, as in ssh)."""
    import paramiko

    if _depth > 4:
        raise UsageError("ProxyJump chain too long (loop in the SSH config?)")

    config_path = Path(os.path.expanduser(ssh_config or "~/.ssh/config"))
    conf: dict = {}
    if config_path.exists() or ssh_config:
        try:
            cfg = paramiko.SSHConfig.from_path(str(config_path))
            conf = cfg.lookup(target.host)
        except FileNotFoundError as e:
            raise UsageError(f"SSH config {config_path} not found") from e
        except OSError as e:
            raise UsageError(f"cannot read SSH config {config_path}: {e.strerror}") from e
        except Exception as e:  # paramiko raises plain exceptions for bad syntax
            raise UsageError(f"cannot parse SSH config {config_path}: {e}") from e
    hostname = conf.get("hostname", target.host)
    try:
        real_port = port or target.port or int(conf.get("port", 22))
    except ValueError as e:
        raise UsageError(f"invalid Port in SSH config {config_path}") from e
    user = target.user or conf.get("user") or getpass.getuser()
    identity_files = [Path(os.path.expanduser(p)) for p in conf.get("identityfile", [])]
    explicit = Path(os.path.expanduser(identity)) if identity else None
    if explicit is not None and not explicit.is_file():
        raise UsageError(f"identity file {explicit} not found")
    if known_hosts:
        kh = [Path(os.path.expanduser(known_hosts))]
    elif conf.get("userknownhostsfile"):
        kh = [Path(os.path.expanduser(p)) for p in shlex.split(conf["userknownhostsfile"])]
    else:
        kh = [Path(os.path.expanduser("~/.ssh/known_hosts"))]
    strict = (conf.get("stricthostkeychecking") or "ask").strip().lower()
    if accept_new or strict in ("accept-new", "no", "off"):
        strict = "accept-new"
    else:
        strict = "yes"
    connect_timeout = float(timeout)
    if conf.get("connecttimeout"):
        try:
            connect_timeout = min(connect_timeout, float(conf["connecttimeout"]))
        except ValueError as e:
            raise UsageError(f"invalid ConnectTimeout in {config_path}") from e
    keepalive = 0
    if conf.get("serveraliveinterval"):
        try:
            keepalive = int(conf["serveraliveinterval"])
        except ValueError as e:
            raise UsageError(f"invalid ServerAliveInterval in {config_path}") from e
    if _hops is not None:
        hops = _hops
    else:
        proxy = (conf.get("proxyjump") or "").strip()
        hops = [] if proxy.lower() in ("", "none") else [h.strip() for h in proxy.split(",")]
    jump = None
    if hops:
        last = hops[-1]
        try:
            hop_target = parse_target(last if last.startswith("ssh://") else f"ssh://{last}")
        except UsageError as e:
            raise UsageError(f"invalid ProxyJump host {last!r}") from e
        jump = resolve_ssh(
            hop_target,
            ssh_config=ssh_config,
            known_hosts=known_hosts,
            accept_new=accept_new,
            timeout=timeout,
            compress=compress,
            _depth=_depth + 1,
            _hops=hops[:-1] if len(hops) > 1 else None,
        )
    return SshSettings(
        alias=target.host,
        hostname=hostname,
        port=real_port,
        user=user,
        identity_files=identity_files,
        explicit_identity=explicit,
        identities_only=_yes(conf.get("identitiesonly")),
        known_hosts=kh,
        strict_host_key=strict,
        proxy_jump=proxy,
        connect_timeout=connect_timeout,
        keepalive=keepalive,
        compression=compress or _yes(conf.get("compression")),
        jump=jump,
    )
