"""The front server's request-head parser: strict on purpose, so doubt goes to Hypercorn.

``front.py`` serves a request itself only when its head is one this parser is sure of, and
pipes every other connection, byte for byte, to Hypercorn (h11), which parses it properly
and answers 400 where the request is malformed. So this parser never needs to be lenient
and never needs to reject: it answers "a hot request, framed like this" or "not mine".
Two parsers that disagree about where a request ends are the root of request smuggling, so
"mine" is kept narrow enough that h11 would read the same request the same way:

* request line exactly ``POST <origin-form target> HTTP/1.1``, single spaces;
* header lines ``token ":" OWS value OWS`` ending in CRLF: no space before the colon, no
  obs-fold continuation lines, no bare CR or LF, no NUL or other control bytes;
* exactly one ``Host`` and exactly one ``Content-Length`` (1 to 18 ASCII digits, no sign,
  no list), no ``Transfer-Encoding``, ``Expect`` or ``Upgrade``;
* at most ``MAX_HEADERS`` headers in at most ``MAX_HEAD`` bytes (h11's own head limit).

The whole header block is checked by one regular expression (a C loop, ~1 µs for a typical
head) before it is split, rather than byte by byte in Python.
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = ["MAX_HEAD", "MAX_HEADERS", "Head", "bare_lf", "parse_head"]

#: Longest head served here: h11's ``max_incomplete_event_size`` default (16 KiB).
MAX_HEAD = 16 * 1024
MAX_HEADERS = 100

_REQUEST_LINE = re.compile(rb"POST (/[!-~]*) HTTP/1\.1")
# Each field line: CRLF, an RFC 9110 token, a colon, then a value of HTAB, SP, VCHAR and
# obs-text only. That excludes CR, LF, NUL and every other control byte, so a match also
# proves that every line ends in CRLF; the bound on repeats is the bound on headers.
_FIELDS = re.compile(
    rb"(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*){1,"
    + str(MAX_HEADERS).encode() + rb"}")
_LENGTH = re.compile(rb"[0-9]{1,18}")
_REFUSED = frozenset({b"transfer-encoding", b"expect", b"upgrade"})


class Head(NamedTuple):
    """A hot request's head, as the ASGI scope wants it (a tuple: built at C speed, once
    per request)."""

    path: bytes
    query: bytes
    headers: list[tuple[bytes, bytes]]  # names lower-cased, values without OWS
    length: int
    keep_alive: bool


def parse_head(head: bytes, hot: frozenset[bytes]) -> Head | None:
    """``head``: the bytes before the blank line ending the head (its final CRLFCRLF
    excluded). The ``Head`` of a ``POST`` to one of ``hot`` paths that is framed beyond
    doubt; None for anything else."""
    if len(head) > MAX_HEAD:
        return None
    line_end = head.find(b"\r\n")
    if line_end < 0:
        return None  # no headers at all, so no Host either
    line = _REQUEST_LINE.fullmatch(head, 0, line_end)
    if line is None:
        return None
    path, _, query = line.group(1).partition(b"?")
    if path not in hot:
        return None
    if _FIELDS.fullmatch(head, line_end) is None:
        return None
    headers: list[tuple[bytes, bytes]] = []
    length: int | None = None
    hosts = 0
    keep_alive = True
    for field_line in head[line_end + 2:].split(b"\r\n"):
        name, _, value = field_line.partition(b":")
        name = name.lower()
        value = value.strip(b" \t")
        if name == b"content-length":
            if length is not None or _LENGTH.fullmatch(value) is None:
                return None  # a second Content-Length (even an equal one), a sign, a list
            length = int(value)
        elif name == b"host":
            hosts += 1
        elif name in _REFUSED:
            return None
        elif name == b"connection" and b"close" in value.lower() and \
                b"close" in [token.strip(b" \t") for token in value.lower().split(b",")]:
            keep_alive = False
        headers.append((name, value))
    if length is None or hosts != 1:
        return None
    return Head(path, query, headers, length, keep_alive)


def bare_lf(buf: bytes | bytearray, start: int) -> bool:
    """Whether ``buf`` holds, from ``start``, an LF not preceded by CR (a head the front
    would otherwise wait on forever for its CRLFCRLF: h11 accepts bare LF, so pipe it)."""
    at = buf.find(b"\n", start)
    while at >= 0:
        if at == 0 or buf[at - 1] != 0x0D:
            return True
        at = buf.find(b"\n", at + 1)
    return False
