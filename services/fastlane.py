"""A fast lane for the hot endpoints (the beacons): a request of the usual, unambiguous shape is
recognised here in a few C-level scans and answered from ready bytes, with no ``Request``,
``Response``, router or middleware. Anything else goes to aiohttp's full server, which then
keeps the connection: routes, middleware, limits and errors are all aiohttp's, as before.

The lane takes a request only when every one of these holds; otherwise the connection is
handed over, from the first byte of that request (nothing of it has been read or answered):

* its method and path are one of the lane's routes (``POST /collect``, ``GET /collect.gif``);
* its head is complete in what has arrived, and matches ``LANE_HEAD``: ``HTTP/1.1``, a target of
  visible ASCII, header names that are RFC 9110 tokens, values of visible characters, spaces
  and tabs (no obsolete line folding), lines ended by CRLF, at most ``max_headers`` lines of at
  most ``max_line`` bytes each;
* no ``Transfer-Encoding``, no ``Expect``, at most one ``Content-Length`` made of digits, no
  repeat of a header aiohttp takes once only (``SINGLE_HEADERS``), and the whole body has
  arrived.

So the framing of every request the lane answers is unambiguous (one length, no chunks), and a
slow or odd client meets aiohttp's limits and timeouts. A connection in the lane is closed
after ``idle_timeout`` seconds without a request, and counts against the process's cap on open
connections like any other (``services.http._Gate``). Answers are written in request order:
while one request waits for its answer (the beacon's publication), the next is not started.
A client that half-closes (done sending, still reading) gets the answer of every complete
request it sent, then the connection is closed (a stream ends at once: see ``eof_received``);
once a connection is closing, no request still buffered is taken (it would be published, and
its answer lost).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, NamedTuple, Protocol


class RawRequest(NamedTuple):
    method: str
    path: str
    query: str  # after "?", still percent-encoded; "" if none
    # lower-case names; of a repeated name the first line counts, except X-Forwarded-For,
    # Content-Length and Transfer-Encoding: all their lines, joined with "," (``header_dict``)
    headers: dict[str, str]
    body: bytes
    peer: str | None


class Reply(NamedTuple):
    head: bytes  # the status line and the reply's own header lines, each ended by CRLF
    body: bytes


# A lane handler answers at once (a ``Reply``) or later: it returns ``None`` and calls
# ``conn.answer(reply)`` once (the next request of that connection waits until then).
LaneHandler = Callable[[RawRequest, "LaneProtocol"], "Reply | None"]

# The request line and header lines of a head the lane takes (without the final empty line).
LANE_HEAD = re.compile(
    rb"(GET|POST) (/[\x21-\x7e]*) HTTP/1\.1"
    rb"((?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*)*)"
)
# the header lines of a head that matched LANE_HEAD: (name, value without leading blanks)
_FIELD = re.compile(r"\r\n([^:]*):[ \t]*([^\r]*)")
_CRLF2 = b"\r\n\r\n"
_MAX_WAITING = 65536  # bytes read ahead while a request is being answered


class Gate(Protocol):
    def admit(self, conn: Any) -> bool: ...
    def release(self, conn: Any) -> None: ...


_date = [0, b""]


def _date_line() -> bytes:
    now = int(time.time())
    if now != _date[0]:
        _date[0], _date[1] = now, f"Date: {formatdate(now, usegmt=True)}\r\n".encode()
    return _date[1]  # type: ignore[return-value]


class LaneProtocol(asyncio.Protocol):
    """One connection: served by the lane until a request it does not take, then by
    ``fallback()`` (aiohttp's connection handler) for good."""

    __slots__ = (
        "_buf",
        "_busy",
        "_close_after",
        "_eof",
        "_fallback",
        "_gate",
        "_lane",
        "_last",
        "_limits",
        "_paused",
        "_peer",
        "_serving",
        "_stream_lost",
        "_transport",
        "_unread",
        "_unread_at",
        "handed_over",
    )

    def __init__(
        self,
        routes: dict[tuple[bytes, bytes], LaneHandler],
        fallback: Callable[[], asyncio.Protocol],
        gate: Gate,
        max_line: int,
        max_headers: int,
    ) -> None:
        self._lane = routes
        self._fallback = fallback
        self._gate = gate
        self._limits = (max_line, max_headers)
        self._transport: asyncio.Transport | None = None
        self._buf = b""
        self._busy = False
        self._close_after = False
        self._eof = False  # the client is done sending (a half-close): it still reads
        self._paused = False  # reading paused: a pipelining client waits for an answer
        self._unread = False  # reading paused: the client does not read its answers
        self._unread_at = 0.0  # since when
        self._serving = False
        self._peer: str | None = None
        self._last = time.monotonic()
        self._stream_lost: Callable[[], None] | None = None  # set while streaming
        self.handed_over: asyncio.Protocol | None = None

    # -- the gate's view ------------------------------------------------------------------------
    def idle(self) -> bool:
        """Between requests: nothing buffered, nothing being answered."""
        return not self._busy and not self._buf

    def idle_for(self, now: float) -> float:
        return now - self._last if self.idle() else 0.0

    def stalled_for(self, now: float) -> float:
        """How long the client has not read its answers (writing paused), 0 if it reads."""
        return now - self._unread_at if self._unread else 0.0

    def stalled(self) -> bool:
        return self._unread

    def close_when_idle(self) -> None:
        if self.idle() or self._stream_lost is not None:
            self.force_close()
        else:
            self._close_after = True

    def force_close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Close without writing what is buffered: for a client that does not read it (a close
        would wait for it to be read)."""
        if self._transport is not None:
            self._transport.abort()

    # -- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp: asyncio.Transport = transport  # type: ignore[assignment]
        if not self._gate.admit(self):
            tcp.write(TOO_MANY)
            tcp.close()
            return
        self._transport = tcp
        peer = tcp.get_extra_info("peername")
        self._peer = peer[0] if isinstance(peer, tuple) else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._transport = None
            self._gate.release(self)
        lost, self._stream_lost = self._stream_lost, None
        if lost is not None:
            lost()

    def pause_writing(self) -> None:  # a client that does not read its answers
        self._unread = True
        self._unread_at = time.monotonic()
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._unread = False
        self._resume_reading()

    def _resume_reading(self) -> None:
        """Read again once neither reason to pause holds."""
        if self._transport is not None and not self._paused and not self._unread:
            self._transport.resume_reading()

    def eof_received(self) -> bool:
        """The client is done sending, maybe not reading (a half-close, RFC 9112 9.6): every
        complete request received is answered, in order, and then the connection is closed.
        A streaming answer ends: its client's EOF cannot be told from a client gone (whose
        subscription would otherwise last until a keep-alive's write failed)."""
        self._eof = True
        self._close_if_done()
        return True  # the transport stays open for the answers

    def _close_if_done(self) -> None:
        """After the client's half-close: close once nothing is left to answer (a request
        still incomplete never will be), or at once when the answer is a stream."""
        if self._eof and (not self._busy or self._stream_lost is not None):
            self._buf = b""
            if self._transport is not None:
                self._transport.close()  # (what is written still goes out first)

    def data_received(self, data: bytes) -> None:
        if self._transport is None or self._stream_lost is not None:
            return  # (a streaming answer never ends: what a client sends after is ignored)
        self._last = time.monotonic()
        if self._buf:
            data = self._buf + data
            self._buf = b""
        if self._busy:
            self._buf = data
            if len(data) > _MAX_WAITING and not self._paused:
                # a client sending ahead without reading: stop reading until it is answered
                self._paused = True
                self._transport.pause_reading()
            return
        self._serve(data)

    # -- the lane -------------------------------------------------------------------------------
    def _serve(self, data: bytes) -> None:
        """Answer the complete requests at the front of ``data`` that the lane takes; keep the
        rest for later if one is being answered; hand over at the first one it does not take."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return  # no answer could be delivered: nothing more is taken (nor published)
        pos, size = 0, len(data)
        lane = self._lane
        max_line, max_headers = self._limits
        while pos < size:
            end = data.find(_CRLF2, pos)
            if end < 0:
                break
            m = LANE_HEAD.fullmatch(data, pos, end)
            if m is None:
                break
            method, target, block = m.groups()
            path, _, query = target.partition(b"?")
            handler = lane.get((method, path))
            if handler is None or len(target) + len(method) + 10 > max_line:
                break
            fields = _FIELD.findall(block.decode("utf-8", "surrogateescape"))
            if len(fields) > max_headers or (
                end - pos > max_line and max(map(len, block.split(b"\r\n"))) > max_line
            ):
                break
            headers = {name.lower(): value.rstrip(" \t") for name, value in fields}
            if len(headers) != len(fields):
                if _repeats_one_of(fields, SINGLE_HEADERS):
                    break  # aiohttp refuses it (400): so it is, whichever path it takes
                headers = header_dict(fields)
            if not _NOT_IN_LANE.isdisjoint(headers):
                break
            length = headers.get("content-length", "0")
            if not (length.isascii() and length.isdigit() and len(length) < 10):
                break  # (a repeated Content-Length, even an equal one, is joined: not digits)
            body_start = end + 4
            body_end = body_start + int(length)
            if body_end > size:
                break  # the body has not all arrived: aiohttp reads it, with its timeout
            if "close" in headers.get("connection", "").lower():
                self._close_after = True
            pos = body_end
            self._busy = self._serving = True
            try:
                reply = handler(
                    RawRequest(
                        method.decode("ascii"),
                        path.decode("ascii"),
                        query.decode("ascii"),
                        headers,
                        data[body_start:body_end],
                        self._peer,
                    ),
                    self,
                )
            finally:
                self._serving = False
            if reply is not None:
                self._busy = False
                if not self._write(reply):
                    return
                continue
            if self._stream_lost is not None:
                self._close_if_done()  # (the client is gone, or no longer sending)
                return  # a never-ending answer: nothing after this request is read
            if self._busy:
                # the answer comes later: the rest waits (answers go out in request order)
                self._buf = data[pos:]
                return
            # answered already, from inside the handler
            if self._transport is None or self._transport.is_closing():
                return
        if pos < size:
            self._hand_over(data[pos:])
        else:
            self._close_if_done()

    def answer(self, reply: Reply) -> None:
        """The answer to the request being handled (see ``LaneHandler``)."""
        if not self._busy:
            raise RuntimeError("no request of this connection is waiting for its answer")
        self._busy = False
        if self._transport is None:
            return
        if not self._write(reply):
            return
        if self._serving:
            return  # answered from inside the handler: _serve goes on with the rest
        if self._paused:
            self._paused = False
            self._resume_reading()
        if self._buf:
            data, self._buf = self._buf, b""
            self._serve(data)
        else:
            self._close_if_done()

    def _write(self, reply: Reply) -> bool:
        """Write one answer; False if the connection is now closing."""
        transport = self._transport
        if transport is None:
            return False
        self._last = time.monotonic()  # idle from the answer on
        close = self._close_after
        transport.write(
            b"".join(
                (
                    reply.head,
                    # (a 304 has no content, and a Content-Length there must be the 200's)
                    b""
                    if reply.head.startswith(_NOT_MODIFIED)
                    else b"Content-Length: %d\r\n" % len(reply.body),
                    _date_line(),
                    b"Connection: close\r\n\r\n" if close else b"\r\n",
                    reply.body,
                )
            )
        )
        if close:
            transport.close()
            return False
        return True

    # -- a never-ending answer (server-sent events) ------------------------------------------------
    def begin_stream(self, head: bytes, on_lost: Callable[[], None]) -> None:
        """Answer the request being handled with a chunked body that ``send`` writes to for as
        long as the connection lasts (the handler returns ``None``); ``on_lost`` is called once
        the connection is gone. The connection stays out of the idle sweep."""
        if not self._busy or self._transport is None:
            raise RuntimeError("no request of this connection is waiting for its answer")
        self._stream_lost = on_lost
        self._buf = b""
        self._transport.write(
            b"".join((head, b"Transfer-Encoding: chunked\r\n", _date_line(), b"\r\n"))
        )
        if self._paused:
            self._paused = False
            self._resume_reading()

    def send(self, chunk: bytes, limit: int) -> bool:
        """Write ``chunk`` (framed by ``chunk()``) to the stream; False (and the connection
        closed) when the client has more than ``limit`` bytes it has not read yet."""
        transport = self._transport
        if transport is None:
            return False
        if transport.get_write_buffer_size() > limit:
            transport.abort()  # a close would wait for the client to read what it has not
            return False
        transport.write(chunk)
        return True

    def end(self) -> None:
        """End the stream: its last chunk, then the connection is closed."""
        transport = self._transport
        if transport is not None:
            transport.write(b"0\r\n\r\n")
            transport.close()

    def _hand_over(self, data: bytes) -> None:
        """From now on aiohttp serves this connection, starting with ``data``."""
        transport = self._transport
        if transport is None:
            return
        self._gate.release(self)  # the handler takes this connection's place at the gate
        self._transport = None
        handler = self._fallback()
        self.handed_over = handler
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if not transport.is_closing():
            handler.data_received(data)
        # the client's EOF came to the lane: the handler is told, as the transport would
        if self._eof and not transport.is_closing() and not handler.eof_received():
            transport.close()


def header_dict(fields: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Header lines as ``RawRequest.headers``: lower-case names; of a repeated name the first
    line counts, except for X-Forwarded-For (every line, joined with ","); a repeated
    Content-Length or Transfer-Encoding is joined too, so that it is refused."""
    headers: dict[str, str] = {}
    for name, value in fields:
        name, value = name.lower(), value.rstrip(" \t")
        if name in headers:
            if name in _JOINED:
                headers[name] += "," + value
            continue
        headers[name] = value
    return headers


_JOINED = frozenset(("x-forwarded-for", "content-length", "transfer-encoding"))
# Headers a request may have once only: aiohttp's parser refuses a request that repeats one
# (``aiohttp.http_parser.SINGLETON_HEADERS``, but Content-Length and Transfer-Encoding, whose
# repeats are joined above and so refused here too).
SINGLE_HEADERS = frozenset(
    (
        "host",
        "etag",
        "server",
        "content-range",
        "content-location",
        "max-forwards",
        "content-type",
        "user-agent",
    )
)


def _repeats_one_of(fields: list[tuple[str, str]], names: frozenset[str]) -> bool:
    seen: set[str] = set()
    for name, _ in fields:
        name = name.lower()
        if name in seen and name in names:
            return True
        seen.add(name)
    return False


def chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a chunked body (for ``LaneProtocol.send``)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


# Every answer's type is the one it says: no browser may take a JSON error for a script.
_NOSNIFF = "X-Content-Type-Options: nosniff\r\n"


def reply_head(status: int, headers: Iterable[tuple[str, str]]) -> bytes:
    """The status line and header lines of a ``Reply`` (each ended by CRLF)."""
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n", _NOSNIFF]
    lines.extend(f"{name}: {value}\r\n" for name, value in headers)
    return "".join(lines).encode("latin-1")


_NOT_MODIFIED = b"HTTP/1.1 304 "

# Headers that make a request unusual enough for aiohttp's full treatment.
_NOT_IN_LANE = frozenset(("transfer-encoding", "expect", "upgrade"))

TOO_MANY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"X-Content-Type-Options: nosniff\r\n"
    b"Retry-After: 1\r\nAccess-Control-Allow-Origin: *\r\n"
    b"Access-Control-Expose-Headers: Retry-After\r\nConnection: close\r\n"
    b"Content-Length: 51\r\n\r\n"
    b'{"error":"too many open connections","field":null}\n'
)
