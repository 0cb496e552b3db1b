"""What large transfers read and write through: the socket that reads ahead, the
channel's input buffer, and the SFTP client that joins answers once and hands the data
of a READ on as a view."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

import paramiko
import pytest

from leftssh.transport import sftp


def test_socket_reads_ahead_and_hands_out_at_most_what_is_asked() -> None:
    if sftp._QUICKACK is None:
        pytest.skip("no TCP_QUICKACK here: the plain socket is used")
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    sock = sftp._AckingSocket(client.family, client.type, client.proto, fileno=client.detach())
    try:
        data = os.urandom(3 << 20)
        sender = threading.Thread(target=peer.sendall, args=(data,))
        sender.start()
        time.sleep(0.1)  # the kernel holds more than the first read asks for
        got = []
        have = 0
        sizes = [16, 32768 + 16, 1, 300_000, 5]
        while have < len(data):
            want = sizes[len(got) % len(sizes)]
            piece = sock.recv(want)
            assert 0 < len(piece) <= want and isinstance(piece, bytes)
            if not got:  # one read from the kernel took more than the 16 bytes asked
                assert len(sock._ahead) > 0
            got.append(piece)
            have += len(piece)
        sender.join()
        assert b"".join(got) == data
        peer.close()
        assert sock.recv(10) == b""  # the end, once what was read ahead is handed out
    finally:
        sock.close()
        peer.close()
        server.close()


def test_chunk_pipe_hands_out_what_was_fed_in_order() -> None:
    pipe = sftp._ChunkPipe()
    assert len(pipe) == 0 and not pipe.read_ready()
    for piece in (b"abc", b"", b"defgh", b"ij"):
        pipe.feed(piece)
    assert len(pipe) == 10 and pipe.read_ready()
    part = pipe.read(2)
    assert part == b"ab" and isinstance(part, memoryview)  # part of a piece, not a copy
    assert pipe.read(100) == b"cdefghij"  # the rest, joined
    pipe.feed(b"klm")
    pipe.feed(b"nop")
    assert pipe.read(3) == b"klm"  # a whole piece, as it came
    assert pipe.read(4) == b"nop"
    with pytest.raises(paramiko.buffered_pipe.PipeTimeout):
        pipe.read(1, timeout=0.0)
    with pytest.raises(paramiko.buffered_pipe.PipeTimeout):
        pipe.read(1, timeout=0.05)
    pipe.feed(b"qrs")
    assert pipe.empty() == b"qrs" and len(pipe) == 0
    pipe.feed(b"tu")
    pipe.close()
    assert pipe.read(10) == b"tu"
    assert pipe.read(10) == b""  # closed and empty: the end


def test_chunk_pipe_wakes_a_waiting_reader_and_sets_the_event() -> None:
    pipe = sftp._ChunkPipe()
    event = threading.Event()
    pipe.set_event(event)
    assert not event.is_set()
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(pipe.read(10, timeout=10)))
    reader.start()
    time.sleep(0.05)
    pipe.feed(b"late")
    reader.join(5)
    assert got == [b"late"]
    assert not event.is_set()  # read empty again
    pipe.feed(b"x")
    assert event.is_set()


def test_large_reads_and_writes_through_the_sftp_client(remote) -> None:
    """Requests and answers of the peer's largest size, and odd sizes, arrive whole."""
    t, root = remote
    data = os.urandom(3 * sftp.MAX_REQUEST + 12345)
    with t.open_write("big.leftpart", 0) as out:
        out.write(data[:1000])
        out.write(data[1000:])
    assert (root / "big.leftpart").read_bytes() == data
    assert isinstance(t.client(), sftp._SFTPClient)
    # the data of a READ is handed on as a view of the answer it came in, not a copy
    assert isinstance(next(iter(t.read_chunks("big.leftpart", 0))), memoryview)
    for offset, listed in ((0, None), (5, None), (len(data) - 3, len(data)), (7, 70_000)):
        got = b"".join(t.read_chunks("big.leftpart", offset, listed))
        # up to the listed size, and one byte more that tells a file that grew
        assert got == data[offset : None if listed is None else listed + 1]
    st = t.client().stat(t.full("big.leftpart"))  # an ordinary request and answer
    assert st.st_size == len(data)


def test_hashing_thread_hashes_what_it_is_given_and_never_blocks_after_a_failure() -> None:
    from leftssh.execute import _HashingThread

    blocks = [os.urandom(n) for n in (0, 1, 2047, 2048, 1 << 20)] * 5
    h = _HashingThread(hashlib.md5())
    for block in blocks:
        h.update(memoryview(block))
    h.close()
    h.close()  # closing twice is harmless
    assert h.hexdigest() == hashlib.md5(b"".join(blocks)).hexdigest()

    bad = _HashingThread(hashlib.md5())
    bad.update("not bytes")  # type: ignore[arg-type]
    for _ in range(3 * _HashingThread.AHEAD):  # more than the queue holds: still drained
        bad.update(b"x" * 4096)
    with pytest.raises(TypeError):
        bad.hexdigest()
