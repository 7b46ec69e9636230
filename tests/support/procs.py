"""Starting the real ``visitorstats`` processes for end-to-end tests, and talking to them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.tansu import free_port

ROOT = Path(__file__).resolve().parents[2]
CHROME_UA = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0 Safari/537.36"
)
SITES_TOML = """
[sites.dongha]
name = "Thành phố Đông Hà"
origins = []
timezone = "Asia/Ho_Chi_Minh"
baseline_visits = 23070412
baseline_pageviews = 1000
online_window_seconds = 300

[sites.utc]
name = "UTC test site"
timezone = "UTC"
online_window_seconds = 60

[sites.locked]
name = "Origin-locked site"
origins = ["https://portal.example.vn"]
timezone = "Asia/Ho_Chi_Minh"
"""


def write_sites(directory: Path, text: str = SITES_TOML) -> Path:
    path = directory / "sites.toml"
    path.write_text(text, encoding="utf-8")
    return path


class Service:
    """One ``visitorstats <command>`` process in its own working directory."""

    def __init__(
        self,
        command: str,
        workdir: Path,
        env: dict[str, str] | None = None,
        port: int | None = None,
        name: str | None = None,
    ) -> None:
        self.command = command
        self.workdir = workdir
        self.port = port or free_port()
        self.name = name or command
        self.env = {
            **os.environ,
            "VISITORSTATS_PORT": str(self.port),
            "VISITORSTATS_SECRET": "test-secret",
            "VISITORSTATS_SITES": str(workdir / "sites.toml"),
            "VISITORSTATS_LOG_LEVEL": "INFO",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{self.name}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True, timeout: float = 60) -> Service:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", self.command],
            cwd=self.workdir,
            env={**self.env, "PYTHONPATH": str(ROOT)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        if wait_ready:
            self._ready_or_killed(timeout)
        return self

    def _ready_or_killed(self, timeout: float) -> None:
        """Wait until ready; a process that never gets there is killed, not left running
        after its test (the test holds no handle to stop it: ``start`` raised)."""
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.kill()
            raise

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log()}")
            try:
                status, _, _ = http("GET", f"{self.url}/readyz", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait: a graceful stop."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10,
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def send_beacon(
    base: str,
    site: str,
    *,
    client: str,
    type: str = "pageview",
    url: str = "https://portal.example.vn/",
    user_agent: str = CHROME_UA,
    **fields: Any,
) -> int:
    """POST one beacon as if from the client address ``client`` (through the trusted local
    proxy's X-Forwarded-For)."""
    payload: dict[str, Any] = {"site": site, "type": type, **fields}
    if type == "pageview" or url:
        payload["url"] = url
    status, _, _ = http(
        "POST",
        f"{base}/collect",
        json.dumps(payload).encode(),
        {"Content-Type": "text/plain", "User-Agent": user_agent, "X-Forwarded-For": client},
    )
    return status


def counter(base: str, site: str) -> dict[str, Any]:
    status, _, body = http("GET", f"{base}/v1/sites/{site}/counter")
    assert status == 200, (status, body)
    result: dict[str, Any] = json.loads(body)
    return result


def wait_counter(base: str, site: str, predicate: Any, timeout: float = 20) -> dict[str, Any]:
    """Poll the counter until ``predicate(counter)`` holds; return it (or the last one seen
    when the time is up, so the test's assertion shows the difference)."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            last = counter(base, site)
            if predicate(last):
                return last
        except (AssertionError, OSError):
            pass
        time.sleep(0.2)
    return last


def numbers(c: dict[str, Any]) -> dict[str, Any]:
    """The counter without its time stamps: what must be equal across deployments."""
    online = {k: v for k, v in c["online"].items() if k != "peak"}
    return {"online": online, "visits": c["visits"], "pageviews": c["pageviews"]}
