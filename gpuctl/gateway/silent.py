"""Close client connections that never send a byte: the one idle case granian leaves open.

granian (hyper) bounds how long a request head may take, but its timer starts at the head's
first byte: a connection that sends nothing at all is kept for ever. Each one holds a
descriptor and a share of ``server.max_connections``, and the per-client cap never sees it
(it counts requests, and there is none), so a few thousand silent connections would fill
the gateway and leave real clients in the backlog.

granian accepts in Rust and never shows us a connection, so this sweeper looks from the
side: every few seconds it lists the process's sockets (``/proc/self/fd``), keeps those
accepted on the gateway's port, and asks the kernel (``TCP_INFO``) what each has done. A
connection whose client has sent no byte (plain HTTP) or has never had a byte of ours
acknowledged (TLS: the handshake never finished) for longer than
``server.header_timeout_seconds`` is shut down; granian sees the end of the stream and
drops it. A connection that sent anything is hyper's to time: a request held for minutes
while a GPU wakes has sent its head, and is never touched.

Linux only (``/proc`` and ``TCP_INFO``); elsewhere the sweeper does nothing and says so once.
Sockets already judged (they spoke, are not the gateway's, or were shut down) are remembered
by inode, so a sweep costs one ``readlink`` for each of them and the system calls only for
the rest. A sweep runs in a
thread: thousands of connections must not stall the loop that relays streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import sys

from gpuctl.tasks import cancel_and_wait

__all__ = ["SilentConnections", "TcpActivity", "tcp_activity"]

log = logging.getLogger(__name__)

#: ``struct tcp_info`` (linux/tcp.h): offsets of the fields read here, stable since 4.1.
_LAST_DATA_RECV = 52  # u32, ms since the last byte received (since the accept if none)
_BYTES_ACKED = 120  # u64, bytes we sent that the peer acknowledged
_BYTES_RECEIVED = 128  # u64, bytes received from the peer
_INFO_SIZE = 136

#: Sweeps at least this often, and at most this often (seconds).
_MIN_EVERY, _MAX_EVERY = 0.25, 5.0


class TcpActivity:
    """What the kernel says one TCP connection has done."""

    __slots__ = ("bytes_acked", "bytes_received", "silent_seconds")

    def __init__(self, silent_seconds: float, bytes_received: int, bytes_acked: int) -> None:
        self.silent_seconds = silent_seconds
        self.bytes_received = bytes_received
        self.bytes_acked = bytes_acked


def tcp_activity(sock: socket.socket) -> TcpActivity | None:
    """``TCP_INFO`` of ``sock``, or None where the kernel does not give it."""
    option = getattr(socket, "TCP_INFO", None)
    if option is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, option, _INFO_SIZE)
    except OSError:
        return None
    if len(info) < _INFO_SIZE:
        return None
    (last_recv_ms,) = struct.unpack_from("=I", info, _LAST_DATA_RECV)
    acked, received = struct.unpack_from("=QQ", info, _BYTES_ACKED)
    return TcpActivity(last_recv_ms / 1000.0, received, acked)


class SilentConnections:
    """Shuts down connections on ``port`` that stay silent longer than ``timeout`` seconds."""

    def __init__(self, listener: socket.socket, timeout: float, *, tls: bool) -> None:
        self.port: int = listener.getsockname()[1]
        self.timeout = timeout
        self.tls = tls
        self.closed = 0  # connections shut down so far (for tests and the log)
        self._listener_inode = _inode_of(listener.fileno())
        #: Inodes of sockets never to look at again: they spoke, are not ours, or were shut.
        self._settled: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    @property
    def supported(self) -> bool:
        return sys.platform.startswith("linux") and hasattr(socket, "TCP_INFO")

    def start(self) -> None:
        if not self.supported:
            log.info("silent connections are not closed on this platform (no TCP_INFO)")
            return
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        every = min(_MAX_EVERY, max(_MIN_EVERY, self.timeout / 3))
        while True:
            await asyncio.sleep(every)
            try:
                closed = await asyncio.to_thread(self.sweep)
            except Exception:  # the sweeper must outlive one bad round
                log.exception("sweeping silent connections failed")
                continue
            if closed:
                log.info("closed %d connection(s) silent for over %.0f s", closed, self.timeout)

    def sweep(self) -> int:
        """One pass over the process's sockets; returns how many were shut down."""
        try:
            names = os.listdir("/proc/self/fd")
        except OSError:
            return 0
        seen: set[str] = set()
        closed = 0
        for name in names:
            inode = _inode_of(int(name))
            if inode is None or inode == self._listener_inode:
                continue
            seen.add(inode)
            if inode in self._settled:
                continue
            verdict = self._judge(int(name), inode)
            if verdict is None:
                continue
            closed += verdict
            self._settled.add(inode)
        self._settled &= seen  # forget closed sockets (an inode may be reused later)
        self.closed += closed
        return closed

    def _judge(self, fd: int, inode: str) -> bool | None:
        """True: shut down now; False: it has spoken, never look again; None: not yet, or
        not one of ours."""
        try:
            copy = os.dup(fd)
        except OSError:
            return None  # closed meanwhile
        try:
            sock = socket.socket(fileno=copy)
        except OSError:
            os.close(copy)
            return None  # reused meanwhile by something that is not a socket
        with sock:
            if sock.type != socket.SOCK_STREAM or sock.family not in (
                    socket.AF_INET, socket.AF_INET6):
                return False
            try:
                if sock.getsockname()[1] != self.port:
                    return False  # a connection toward a node, the cloud, Redis
                sock.getpeername()
            except OSError:
                return None  # not connected (yet, or any more)
            if _inode_of(fd) != inode:
                return None  # the descriptor was reused between the two looks
            activity = tcp_activity(sock)
            if activity is None:
                return False
            spoke = activity.bytes_acked > 0 if self.tls else activity.bytes_received > 0
            if spoke:
                return False
            if activity.silent_seconds < self.timeout:
                return None
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # reaches granian's descriptor too
            return True


def _inode_of(fd: int) -> str | None:
    """``socket:[N]`` → ``N`` for a socket descriptor; None for anything else."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    if not target.startswith("socket:["):
        return None
    return target[8:-1]
