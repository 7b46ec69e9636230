"""The fast lane stops reading a connection for two reasons that can overlap — a pipelining
client whose next requests wait for an answer, and a client that does not read its answers
(``pause_writing``) — and reads again only once neither holds."""

from __future__ import annotations

from typing import Any

from services.fastlane import LaneProtocol, RawRequest, Reply

REQUEST = b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
AHEAD = REQUEST * 2000  # more than the lane reads ahead while an answer is pending


class Transport:
    """The part of an asyncio transport the lane uses; records whether it is reading."""

    def __init__(self) -> None:
        self.reading = True
        self.written = b""
        self.closed = False

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else None

    def get_write_buffer_size(self) -> int:
        return 0


class Gate:
    def admit(self, conn: Any) -> bool:
        return True

    def release(self, conn: Any) -> None:
        pass


def lane() -> tuple[LaneProtocol, Transport, list[LaneProtocol]]:
    waiting: list[LaneProtocol] = []

    def later(req: RawRequest, conn: LaneProtocol) -> Reply | None:
        waiting.append(conn)  # answered by the test
        return None

    conn = LaneProtocol({(b"POST", b"/collect"): later}, lambda: None, Gate(), 8190, 100)  # type: ignore[arg-type,return-value]
    transport = Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport, waiting


OK = Reply(b"HTTP/1.1 202 Accepted\r\n", b"")


def test_answered_but_unread_stays_paused_until_the_client_reads() -> None:
    conn, transport, waiting = lane()
    conn.data_received(REQUEST)
    conn.data_received(AHEAD)
    assert not transport.reading  # the next requests wait for the first answer
    conn.pause_writing()  # and the client does not read its answers
    waiting.pop(0).answer(OK)
    assert not transport.reading  # answered, but still not reading its answers
    conn.resume_writing()
    assert transport.reading


def test_reading_again_waits_for_the_pending_answer_too() -> None:
    conn, transport, waiting = lane()
    conn.pause_writing()
    conn.data_received(REQUEST)
    conn.data_received(AHEAD)
    conn.resume_writing()
    assert not transport.reading  # its answers drained, but the next requests still wait
    waiting.pop(0).answer(OK)
    assert transport.reading
    assert transport.written.startswith(b"HTTP/1.1 202 Accepted\r\n")
