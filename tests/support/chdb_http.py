"""A small ClickHouse HTTP-protocol server backed by chDB, for tests.

Several processes can then share one real ClickHouse engine (chDB runs it in-process, and only
one process may open a data directory) through ``http://user:pass@127.0.0.1:PORT/default``
with ``clickhouse_connect.get_client(dsn=...)``, exactly as with a ClickHouse server.

Run it as ``python -m tests.support.chdb_http --path /abs/dir --port N [--host 127.0.0.1]``;
it prints ``READY http://HOST:PORT`` on stdout once it listens (``--port 0`` picks a free
port). SIGTERM/SIGINT stop it cleanly; SIGKILL is safe too (the data is reopened on restart).
:class:`ChdbHttpServer` starts, stops, kills, pauses and resumes it from a test.

Supported subset of the ClickHouse HTTP interface: what clickhouse-connect's sync client sends,
since that is the only client our services use. Anything outside it fails loudly (a ClickHouse
error, a 404) rather than behaving differently from a server without saying so.

* ``GET/HEAD /ping``, ``/replicas_status`` and a bare ``GET /``: ``Ok.``.
* ``POST /`` and ``GET /`` (read-only, ``readonly=2``, as in ClickHouse): the SQL is the
  ``query`` URL parameter, then a newline and the request body, or the body alone.
  ``multipart/form-data`` bodies (clickhouse-connect's form encoding of long parameters) give
  the same fields as URL parameters; external-data file parts are refused.
* ``INSERT ... FORMAT <fmt>`` followed by data (in any format, Native included) streams the data
  into chDB's ``send_insert``; every other statement (``INSERT ... VALUES``/``SELECT`` too) runs
  through ``Connection.query``. Without a ``FORMAT`` clause a result comes back as
  ``TabSeparated`` (or ``default_format`` / the ``X-ClickHouse-Format`` request header).
* Request bodies with ``Content-Encoding`` lz4 (concatenated frames), zstd, gzip, deflate,
  br (when ``brotli`` is installed), xz, bz2, or chunked transfer encoding.
  Responses are never compressed: ``Accept-Encoding`` is allowed to go unanswered.
* ``param_<name>`` parameters bind ``{name:Type}`` placeholders; ``database`` (or the
  ``X-ClickHouse-Database`` header) selects the database; every other URL parameter is a
  ClickHouse setting applied with ``SET`` on a connection opened for this one request, so an
  unknown setting fails exactly as on a server. Transport-only parameters (``session_id``,
  ``session_timeout``, ``session_check``, ``query_id``, ``wait_end_of_query``,
  ``client_protocol_version``, ``buffer_size``, ``user``, ``password``, ...) are not
  settings and are dropped; ``compress=1``/``decompress=1`` (ClickHouse's own block
  compression) are refused.
* Response headers ``X-ClickHouse-Query-Id``, ``-Format``, ``-Timezone``, ``-Summary``
  (read/written rows and bytes); errors are HTTP 500 with the ClickHouse exception text
  (``Code: N. DB::Exception: ... (NAME) (version V)``) and ``X-ClickHouse-Exception-Code``.

Not supported, by design (nothing in visitorstats may depend on them; replicas behind a load
balancer do not share sessions either): sessions (each request gets a fresh chDB connection, so
``SET`` statements and temporary tables do not outlive the request; ``session_id`` is ignored),
authentication (any user and password are accepted), external data, progress headers, and
``client_protocol_version`` (so clickhouse-connect's probe falls back to protocol 0, exactly as
behind a proxy that strips the parameter). Requests run concurrently on a thread pool, each on
its own chDB connection to the one engine; ``--serialize`` runs them one at a time instead.
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import gzip
import json
import lzma
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import zlib
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

#: URL parameters the ClickHouse HTTP handler consumes itself: they are never settings.
TRANSPORT_PARAMS = frozenset(
    {
        "query",
        "database",
        "default_format",
        "user",
        "password",
        "quota_key",
        "query_id",
        "stacktrace",
        "role",
        "buffer_size",
        "wait_end_of_query",
        "session_id",
        "session_timeout",
        "session_check",
        "close_session",
        "client_protocol_version",
        "compress",
        "decompress",
    }
)

KEEP_ALIVE_SECONDS = 30
_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_CODE = re.compile(r"\bCode:\s*(\d+)")
_FORMAT_WORD = re.compile(rb"\bFORMAT\s+[A-Za-z]", re.IGNORECASE)
_TRAILING_FORMAT = re.compile(rb"\bFORMAT\s+([A-Za-z][A-Za-z0-9_]*)\s*;?\s*\Z", re.IGNORECASE)
_IDENT_START = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")
_IDENT = _IDENT_START | frozenset(b"0123456789")
_WHITESPACE = frozenset(b" \t\r\n\f\v")


class ClickHouseError(Exception):
    """An error to answer with HTTP 500 and ClickHouse's exception text."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @classmethod
    def wrap(cls, ex: BaseException) -> ClickHouseError:
        if isinstance(ex, ClickHouseError):
            return ex
        text = str(ex)
        # chDB prefixes its own context ("Streaming insert finish failed: Code: 60. ...")
        start = text.find("Code: ")
        if start >= 0:
            match = _CODE.match(text, start)
            return cls(int(match.group(1)) if match else 1001, text[start:].strip())
        return cls(1001, f"Code: 1001. DB::Exception: {type(ex).__name__}: {text}. (STD_EXCEPTION)")


def _error(code: int, name: str, text: str) -> ClickHouseError:
    return ClickHouseError(code, f"Code: {code}. DB::Exception: {text}. ({name})")


# --- request bodies ---------------------------------------------------------------------------


def decompress(data: bytes, encoding: str) -> bytes:
    """Decode a request body per its Content-Encoding (what ClickHouse accepts)."""
    encoding = encoding.strip().lower()
    if not data or encoding in ("", "identity"):
        return data
    try:
        if encoding == "lz4":
            import lz4.frame

            # clickhouse-connect compresses every block as its own frame: decode them all
            out = bytearray()
            rest = data
            while rest:
                decomp = lz4.frame.LZ4FrameDecompressor()
                out += decomp.decompress(rest)
                if not decomp.eof:
                    raise ValueError("truncated lz4 frame")
                rest = decomp.unused_data
            return bytes(out)
        if encoding == "zstd":
            if sys.version_info >= (3, 14):
                from compression import zstd
            else:
                from backports import zstd
            return bytes(zstd.decompress(data))  # handles concatenated frames
        if encoding in ("gzip", "x-gzip"):
            return gzip.decompress(data)
        if encoding == "deflate":
            try:
                return zlib.decompress(data)
            except zlib.error:
                return zlib.decompress(data, -zlib.MAX_WBITS)
        if encoding == "br":
            import brotli

            return bytes(brotli.decompress(data))
        if encoding == "xz":
            return lzma.decompress(data)
        if encoding in ("bz2", "bzip2"):
            return bz2.decompress(data)
    except ImportError as ex:
        raise _error(1, "UNSUPPORTED_METHOD", f"{encoding} is not available: {ex}") from ex
    except Exception as ex:
        raise _error(
            432, "UNKNOWN_CODEC", f"Cannot decompress the {encoding} request body: {ex}"
        ) from ex
    raise _error(1, "UNSUPPORTED_METHOD", f"Unsupported Content-Encoding: {encoding}")


def parse_multipart(content_type: str, body: bytes) -> list[tuple[str, str]]:
    """Form fields of a multipart/form-data body, as (name, value) pairs."""
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        raise _error(1, "UNSUPPORTED_METHOD", "Malformed multipart/form-data body")
    fields = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if part.get_filename() is not None:
            raise _error(48, "NOT_IMPLEMENTED", "External data is not supported by chdb_http")
        if not name:
            continue
        payload = part.get_payload(decode=True)
        value = payload.decode("utf-8", errors="replace") if isinstance(payload, bytes) else ""
        fields.append((str(name), value))
    return fields


# --- SQL scanning -----------------------------------------------------------------------------


def _skip_space(buf: bytes, pos: int) -> int:
    """Skip whitespace and comments (``--``, ``# ``, ``/* */``)."""
    n = len(buf)
    while pos < n:
        if buf[pos] in _WHITESPACE:
            pos += 1
        elif buf.startswith(b"--", pos) or buf.startswith((b"# ", b"#!"), pos):
            end = buf.find(b"\n", pos)
            pos = n if end < 0 else end + 1
        elif buf.startswith(b"/*", pos):
            end = buf.find(b"*/", pos + 2)
            pos = n if end < 0 else end + 2
        else:
            break
    return pos


def _skip_quoted(buf: bytes, pos: int) -> int:
    quote = buf[pos]
    pos += 1
    n = len(buf)
    while pos < n:
        ch = buf[pos]
        if ch == 0x5C:  # backslash escape
            pos += 2
        elif ch == quote:
            if pos + 1 < n and buf[pos + 1] == quote:
                pos += 2
            else:
                return pos + 1
        else:
            pos += 1
    return n


def _word(buf: bytes, pos: int) -> tuple[bytes, int]:
    end = pos
    while end < len(buf) and buf[end] in _IDENT:
        end += 1
    return buf[pos:end], end


def split_insert(buf: bytes) -> tuple[str, str, int] | None:
    """Split ``INSERT ... FORMAT fmt<data>`` into (statement, format, data offset).

    Returns None for anything else (``INSERT ... VALUES``, ``INSERT ... SELECT`` and all other
    statements run as plain queries). As in ClickHouse, the data begins after the format name
    and the blanks after it, including at most one line break.
    """
    pos = _skip_space(buf, 0)
    word, pos = _word(buf, pos)
    if word.upper() != b"INSERT":
        return None
    depth = 0
    n = len(buf)
    while True:
        pos = _skip_space(buf, pos)
        if pos >= n:
            return None
        ch = buf[pos]
        if ch in b"'\"`":
            pos = _skip_quoted(buf, pos)
        elif ch == 0x28:  # (
            depth += 1
            pos += 1
        elif ch == 0x29:  # )
            depth -= 1
            pos += 1
        elif ch in _IDENT_START:
            start = pos
            word, pos = _word(buf, pos)
            keyword = word.upper()
            if depth != 0:
                continue
            if keyword in (b"VALUES", b"SELECT", b"WITH", b"INFILE"):
                return None
            if keyword == b"FORMAT":
                fmt, fmt_end = _word(buf, _skip_space(buf, pos))
                if not fmt:
                    return None
                data = fmt_end
                while data < n and buf[data] in b" \t\f":
                    data += 1
                if data < n and buf[data] == 0x0D:
                    data += 1
                if data < n and buf[data] == 0x0A:
                    data += 1
                return buf[:start].decode("utf-8"), fmt.decode(), data
        else:
            pos += 1


def _content_type(fmt: str | None) -> str:
    name = (fmt or "").lower()
    if name.startswith(("tabseparated", "tsv")):
        return "text/tab-separated-values; charset=UTF-8"
    if name.startswith("csv"):
        return "text/csv; charset=UTF-8"
    if name.startswith("json") or name.startswith("ndjson"):
        return "application/json; charset=UTF-8"
    if name.startswith(("native", "rowbinary", "arrow", "parquet", "orc", "avro", "protobuf")):
        return "application/octet-stream"
    return "text/plain; charset=UTF-8"


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _quote_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


# --- engine -----------------------------------------------------------------------------------


class Request:
    """One parsed HTTP request, ready for the engine."""

    def __init__(self, sql: bytes, read_only: bool) -> None:
        self.sql = sql
        self.read_only = read_only
        self.database: str | None = None
        self.default_format: str | None = None
        self.params: dict[str, str] = {}
        self.settings: dict[str, str] = {}
        self.query_id = ""


class Result:
    def __init__(self, body: bytes, fmt: str | None, timezone: str, summary: dict[str, str]):
        self.body = body
        self.fmt = fmt
        self.timezone = timezone
        self.summary = summary


class Engine:
    """The chDB engine, opened once; every request runs on its own connection to it."""

    def __init__(self, path: str, serialize: bool = False) -> None:
        import chdb

        self._chdb = chdb
        self.path = path
        # This connection keeps the engine open for the server's lifetime, so per-request
        # connections are cheap (the first connect boots the engine and loads the tables).
        self._anchor = chdb.connect(path)
        row = self._anchor.query("SELECT version(), timezone()", "TabSeparated").bytes()
        self.version, self.timezone = row.decode().rstrip("\n").split("\t")
        self._lock = threading.Lock() if serialize else contextlib.nullcontext()
        self._busy = threading.Condition()
        self._in_flight = 0
        self.closed = False

    def close(self, timeout: float = 10.0) -> None:
        with self._busy:
            self.closed = True
            self._busy.wait_for(lambda: self._in_flight == 0, timeout)
            self._anchor.close()

    def execute(self, req: Request) -> Result:
        with self._busy:
            if self.closed:
                raise _error(202, "TOO_MANY_SIMULTANEOUS_QUERIES", "The server is shutting down")
            self._in_flight += 1
        try:
            with self._lock:
                return self._execute(req)
        finally:
            with self._busy:
                self._in_flight -= 1
                self._busy.notify_all()

    def _execute(self, req: Request) -> Result:
        if not req.sql.strip():
            raise _error(62, "SYNTAX_ERROR", "Empty query")
        conn = self._chdb.connect(self.path)
        try:
            if req.database:
                conn.query(f"USE {_quote_identifier(req.database)}", "TabSeparated")
            for name, value in req.settings.items():
                if not _SETTING_NAME.match(name):
                    raise _error(115, "UNKNOWN_SETTING", f"Unknown setting '{name}'")
                conn.query(f"SET {name} = {_quote(value)}", "TabSeparated")
            if req.read_only and "readonly" not in req.settings:
                conn.query("SET readonly = 2", "TabSeparated")
            timezone = self.timezone
            if "session_timezone" in req.settings:
                timezone = conn.query("SELECT timezone()", "TabSeparated").bytes().decode().strip()
            insert = split_insert(req.sql)
            if insert is not None:
                return self._insert(conn, req, insert, timezone)
            return self._query(conn, req, timezone)
        except ClickHouseError:
            raise
        except Exception as ex:
            raise ClickHouseError.wrap(ex) from ex
        finally:
            conn.close()

    @staticmethod
    def _insert(conn: Any, req: Request, insert: tuple[str, str, int], timezone: str) -> Result:
        statement, fmt, offset = insert
        started = time.monotonic()
        inserter = conn.send_insert(statement, fmt)
        try:
            if offset < len(req.sql):
                inserter.append(memoryview(req.sql)[offset:])
            written = inserter.finish()
        except BaseException:
            with contextlib.suppress(Exception):
                inserter.cancel()
            raise
        summary = {
            "read_rows": str(written.rows_written),
            "read_bytes": str(written.bytes_written),
            "written_rows": str(written.rows_written),
            "written_bytes": str(written.bytes_written),
            "total_rows_to_read": "0",
            "result_rows": str(written.rows_written),
            "result_bytes": str(written.bytes_written),
            "elapsed_ns": str(int((time.monotonic() - started) * 1e9)),
        }
        return Result(b"", None, timezone, summary)

    @staticmethod
    def _query(conn: Any, req: Request, timezone: str) -> Result:
        try:
            sql: str | bytes = req.sql.decode("utf-8")
        except UnicodeDecodeError:
            sql = req.sql  # a binary bind: chDB takes the raw bytes
        if req.default_format or _FORMAT_WORD.search(req.sql):
            fmt = req.default_format or "TabSeparated"
            result = conn.query(sql, fmt, params=req.params)
            body = result.bytes() or b""
            # An explicit FORMAT clause wins over the default format, as in ClickHouse
            explicit = _TRAILING_FORMAT.search(req.sql[-200:])
            out_fmt = explicit.group(1).decode() if explicit else (fmt if body else None)
        else:
            # The default format is TabSeparated. With names, a statement that has a result
            # always prints a line, even with no rows, so the X-ClickHouse-Format header can
            # tell "empty result" from "no result" (DDL) as a server does.
            result = conn.query(sql, "TabSeparatedWithNames", params=req.params)
            body = result.bytes() or b""
            out_fmt = None
            if body:
                body = body[body.index(b"\n") + 1 :] if b"\n" in body else b""
                out_fmt = "TabSeparated"
        summary = {
            "read_rows": str(result.rows_read()),
            "read_bytes": str(result.bytes_read()),
            "written_rows": str(result.rows_written()),
            "written_bytes": str(result.bytes_written()),
            "total_rows_to_read": str(result.rows_read()),
            "result_bytes": str(len(body)),
            "elapsed_ns": str(int(result.elapsed() * 1e9)),
        }
        return Result(body, out_fmt, timezone, summary)


# --- HTTP -------------------------------------------------------------------------------------


class _BadRequest(Exception):
    pass


class Handler(BaseHTTPRequestHandler):
    """ClickHouse's HTTP interface, the subset described in the module docstring."""

    protocol_version = "HTTP/1.1"
    server_version = "chdb-http"
    timeout = KEEP_ALIVE_SECONDS  # idle keep-alive connections are closed, as ClickHouse does
    # Headers and body are separate writes: with Nagle on, each response would wait for the
    # client's delayed ACK (~40 ms)
    disable_nagle_algorithm = True
    server: Server

    def do_GET(self) -> None:
        self._dispatch(read_only=True)

    def do_HEAD(self) -> None:
        self._dispatch(read_only=True)

    def do_POST(self) -> None:
        self._dispatch(read_only=False)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    # -- plumbing

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                line = self.rfile.readline(65537)
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError as ex:
                    raise _BadRequest(f"bad chunk size line {line[:40]!r}") from ex
                if size == 0:
                    break
                chunk = self.rfile.read(size)
                if len(chunk) != size:
                    raise _BadRequest("truncated chunk")
                chunks.append(chunk)
                self.rfile.readline(65537)  # CRLF after the chunk
            while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        length = self.headers.get("Content-Length")
        if not length:
            return b""
        try:
            size = int(length)
        except ValueError as ex:
            raise _BadRequest(f"bad Content-Length {length!r}") from ex
        body = self.rfile.read(size)
        if len(body) != size:
            raise _BadRequest("truncated body")
        return body

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Keep-Alive", f"timeout={KEEP_ALIVE_SECONDS}")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _dispatch(self, read_only: bool) -> None:
        try:
            raw_body = self._read_body()
        except (_BadRequest, OSError) as ex:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._send(400, f"Bad request: {ex}\n".encode(), {"Connection": "close"})
            return
        url = urlsplit(self.path)
        pairs = parse_qsl(url.query, keep_blank_values=True)
        if url.path in ("/ping", "/replicas_status") or (
            url.path == "/" and read_only and not pairs and not raw_body
        ):
            self._send(200, b"Ok.\n", {"Content-Type": "text/html; charset=UTF-8"})
            return
        query_id = dict(pairs).get("query_id") or str(uuid.uuid4())
        base_headers = {
            "X-ClickHouse-Query-Id": query_id,
            "X-ClickHouse-Server-Display-Name": socket.gethostname(),
            "X-ClickHouse-Timezone": self.server.engine.timezone,
        }
        if url.path != "/":
            self._send(
                404,
                f"There is no handle {url.path}\n".encode(),
                {**base_headers, "Content-Type": "text/plain; charset=UTF-8"},
            )
            return
        try:
            req = self._build_request(raw_body, pairs, read_only)
            req.query_id = query_id
            result = self.server.engine.execute(req)
        except Exception as ex:
            err = ClickHouseError.wrap(ex)
            if err.code == 1001 or self.server.verbose:
                sys.stderr.write(f"chdb_http: {err.message}\n")
            body = f"{err.message} (version {self.server.engine.version})\n".encode()
            self._send(
                500,
                body,
                {
                    **base_headers,
                    "Content-Type": "text/plain; charset=UTF-8",
                    "X-ClickHouse-Exception-Code": str(err.code),
                },
            )
            return
        headers = {
            **base_headers,
            "X-ClickHouse-Timezone": result.timezone,
            "Content-Type": _content_type(result.fmt),
            "X-ClickHouse-Summary": json.dumps(result.summary, separators=(",", ":")),
        }
        if result.fmt:
            headers["X-ClickHouse-Format"] = result.fmt
        self._send(200, result.body, headers)

    def _build_request(
        self, raw_body: bytes, pairs: list[tuple[str, str]], read_only: bool
    ) -> Request:
        body = decompress(raw_body, self.headers.get("Content-Encoding", ""))
        content_type = self.headers.get("Content-Type", "")
        if content_type.lower().startswith("multipart/form-data"):
            pairs = pairs + parse_multipart(content_type, body)
            body = b""
        fields = dict(pairs)
        for flag in ("compress", "decompress"):
            if fields.get(flag, "0").lower() not in ("0", "false", ""):
                raise _error(1, "UNSUPPORTED_METHOD", f"{flag}=1 is not supported by chdb_http")
        query = fields.get("query", "")
        sql = query.encode() + b"\n" + body if query else body
        req = Request(sql, read_only)
        req.database = fields.get("database") or self.headers.get("X-ClickHouse-Database")
        req.default_format = fields.get("default_format") or self.headers.get("X-ClickHouse-Format")
        for name, value in fields.items():
            # chDB binds parameters exactly as the server does (escaped text per placeholder type)
            if name.startswith("param_"):
                req.params[name[6:]] = value
            elif name not in TRANSPORT_PARAMS:
                req.settings[name] = value
        return req


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # restart on the same port right after a kill

    def __init__(self, address: tuple[str, int], engine: Engine, verbose: bool) -> None:
        self.engine = engine
        self.verbose = verbose
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)  # a client that went away is normal


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(0)  # orphaned: the test runner is gone


def serve(
    path: str,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    serialize: bool = False,
    verbose: bool = False,
    exit_with_parent: bool = False,
) -> None:
    os.makedirs(path, exist_ok=True)
    engine = Engine(path, serialize=serialize)
    server = Server((host, port), engine, verbose)

    def on_signal(signum: int, frame: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if exit_with_parent:
        threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    bound_port = server.socket.getsockname()[1]
    print(f"READY http://{_host_port(host, bound_port)}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        engine.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", required=True, help="chDB data directory (created if missing)")
    parser.add_argument("--port", type=int, default=8123, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--serialize", action="store_true", help="one request at a time")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    parser.add_argument("--exit-with-parent", action="store_true", help="exit when orphaned")
    args = parser.parse_args(argv)
    serve(
        os.path.abspath(args.path),
        args.host,
        args.port,
        serialize=args.serialize,
        verbose=args.verbose,
        exit_with_parent=args.exit_with_parent,
    )


# --- test helper ------------------------------------------------------------------------------

_ROOT = Path(__file__).resolve().parents[2]


class ChdbHttpServer:
    """Runs the server as a subprocess: ``with ChdbHttpServer(tmp_path / "ch") as ch: ...``.

    ``port=0`` picks a free port on the first start and keeps it for restarts, so a client's
    URL stays valid across ``kill()``/``start()``. The server's stderr goes to the caller's.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        port: int = 0,
        host: str = "127.0.0.1",
        *,
        ready_timeout: float = 60.0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.path = os.path.abspath(path)
        self.port = port
        self.host = host
        self.ready_timeout = ready_timeout
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self.output: list[str] = []

    @property
    def url(self) -> str:
        return f"http://{_host_port(self.host, self.port)}"

    @property
    def dsn(self) -> str:
        """A clickhouse-connect DSN for the default database."""
        return f"http://default:@{_host_port(self.host, self.port)}/default"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> ChdbHttpServer:
        if self.running:
            raise RuntimeError("chdb_http is already running")
        self._cleanup()
        cmd = [sys.executable, "-m", "tests.support.chdb_http", "--path", self.path]
        cmd += ["--port", str(self.port), "--host", self.host, "--exit-with-parent"]
        cmd += list(self.extra_args)
        self.proc = subprocess.Popen(
            cmd, cwd=_ROOT, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._drain, args=(self.proc, lines), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.ready_timeout
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise TimeoutError(f"chdb_http not ready in {self.ready_timeout}s") from None
            if line is None:
                code = self.proc.wait()
                self._cleanup()
                raise RuntimeError(
                    f"chdb_http exited with {code} before READY (its stderr is the caller's)"
                )
            if line.startswith("READY "):
                self.port = int(line.rsplit(":", 1)[1])
                return self

    def _drain(self, proc: subprocess.Popen[bytes], lines: queue.Queue[str | None]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.output.append(line)
            lines.put(line)
        lines.put(None)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (resuming a paused server so it can act on it), then wait; SIGKILL if stuck."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        code = proc.wait()
        self._cleanup()
        return code

    def kill(self) -> None:
        """SIGKILL: the outage a crash or an OOM kill would cause."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        self._cleanup()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its socket but answers nothing (a hung server).
        Returns once the kernel reports the process stopped (signal delivery is asynchronous,
        and on a loaded machine a request could otherwise still be answered)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 10
        stat = Path(f"/proc/{self.proc.pid}/stat")
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if stat.read_text().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                    return
            time.sleep(0.01)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> ChdbHttpServer:
        self.stop()
        return self.start()

    def _cleanup(self) -> None:
        if self._reader is not None:
            self._reader.join(5)
            self._reader = None
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None

    def __enter__(self) -> ChdbHttpServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


if __name__ == "__main__":
    main()
