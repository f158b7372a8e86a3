"""``parse_head`` against h11, the parser behind the pipe: whatever the front accepts, h11
reads the same way (same target, same headers, same body length), so the two can never
disagree about where a request ends. Heads are valid ones mutated with the bytes that
smuggling attacks are made of."""

from __future__ import annotations

import h11
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuctl.gateway.head import parse_head

HOT = frozenset({b"/api/chat", b"/v1/chat/completions"})
VALID = (b"POST /api/chat HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n"
         b"Authorization: Bearer k\r\nConnection: keep-alive\r\nX-Note: a b")
NASTY = [b" ", b"\t", b"\r", b"\n", b"\r\n", b"\x00", b":", b",", b"+", b"-", b"0", b"9",
         b"\r\n ", b"\r\nContent-Length: 7", b"\r\nTransfer-Encoding: chunked",
         b"\r\nHost: x", b"\x7f", b"\xff", b"(", b"/", b"?", b"#", b"HTTP/1.0", b"post"]


@st.composite
def mutated_heads(draw: st.DrawFn) -> bytes:
    head = VALID
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(head)))
        cut = draw(st.integers(0, 2))
        head = head[:at] + draw(st.sampled_from(NASTY)) + head[at + cut:]
    return head


def h11_reading(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], int | None] | None:
    """What h11 makes of ``head``, a blank line and 64 body bytes: the target, the headers
    and how many body bytes belong to this request (None: it wants more than 64); None if
    h11 refuses the head."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head + b"\r\n\r\n" + b"b" * 64)
    try:
        request = conn.next_event()
        if not isinstance(request, h11.Request):
            return None
        taken = 0
        while isinstance(event := conn.next_event(), h11.Data):
            taken += len(event.data)
    except h11.RemoteProtocolError:
        return None
    headers = [(bytes(name), bytes(value)) for name, value in request.headers]
    return bytes(request.target), headers, None if event is h11.NEED_DATA else taken


def test_a_clean_head_is_accepted_and_read_as_h11_reads_it() -> None:
    parsed = parse_head(VALID, HOT)

    assert parsed is not None
    assert h11_reading(VALID) == (b"/api/chat", parsed.headers, 5)


@settings(max_examples=400, deadline=None, derandomize=True)  # the same cases in every run
@given(mutated_heads())
def test_whatever_the_front_accepts_h11_reads_the_same_way(head: bytes) -> None:
    parsed = parse_head(head, HOT)
    if parsed is None:
        return  # piped: h11 alone decides
    reading = h11_reading(head)

    assert reading is not None, "the front serves a head h11 would refuse"
    target, headers, length = reading
    path, _, query = target.partition(b"?")
    assert (path, query) == (parsed.path, parsed.query)
    assert headers == parsed.headers
    assert length == (parsed.length if parsed.length <= 64 else None)
