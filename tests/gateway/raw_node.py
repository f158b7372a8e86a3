"""A node that answers with exactly the bytes a test scripts, over a real loopback socket.

No HTTP server would send a broken response, so this one is raw ``asyncio``: it reads each
request (head, then ``Content-Length`` bytes of body), writes the scripted reply in the given
pieces (each drained, so they leave as separate reads where the kernel allows), then closes
the connection, or keeps it for the next request with ``keep_open``. A node that sends a
broken answer and then stays silent forever is not scripted here: with no read timeout
toward nodes (a model load takes minutes) that would hang by design, not by bug.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence


class RawNode:
    def __init__(self, reply: Sequence[bytes], *, keep_open: bool = False) -> None:
        self.reply = list(reply)
        self.keep_open = keep_open
        self.requests: list[bytes] = []
        self.connections = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                for piece in self.reply:
                    writer.write(piece)
                    await writer.drain()
                if not self.keep_open:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@contextlib.asynccontextmanager
async def raw_node(reply: Sequence[bytes], *, keep_open: bool = False,
                   ) -> AsyncIterator[tuple[RawNode, str]]:
    """``async with raw_node([b"HTTP/1.1 200 OK\\r\\n..."]) as (node, url)``."""
    node = RawNode(reply, keep_open=keep_open)
    server = await asyncio.start_server(node._serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield node, f"http://127.0.0.1:{port}"
    finally:
        server.close()
        # Python 3.12+ waits for handlers in wait_closed(); they end when the pieces are out.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 5)


def chunked(*pieces: bytes) -> bytes:
    """A chunked body of ``pieces`` with its final zero-size chunk."""
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


OK_CHUNKED = (b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n"
              b"transfer-encoding: chunked\r\n\r\n")
