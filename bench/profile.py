"""Optional profiles (``--profile``): py-spy samples a process while a figure is measured; the
folded stacks are kept under ``bench-results/`` and their top entries go into the report."""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
from pathlib import Path


def py_spy() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


class Sampler:
    """``py-spy record`` on ``pid`` for ``seconds``, folded stacks into ``path``."""

    def __init__(self, pid: int, seconds: float, path: Path, rate: int = 250) -> None:
        self.path = path
        binary = py_spy()
        self.proc: subprocess.Popen[bytes] | None = None
        if binary is None:
            print("bench: --profile needs py-spy (pip install py-spy)", file=sys.stderr)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                binary,
                "record",
                "-p",
                str(pid),
                "-d",
                str(max(1, int(seconds))),
                "-r",
                str(rate),
                "-f",
                "raw",
                "-o",
                str(path),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait(self) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def top(path: Path, n: int = 15) -> dict[str, list[tuple[float, str]]]:
    """The frames with the most samples of their own, and the most samples under them."""
    own: collections.Counter[str] = collections.Counter()
    under: collections.Counter[str] = collections.Counter()
    total = 0
    if not path.exists():
        return {"self": [], "inclusive": []}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        total += k
        frames = stack.split(";")
        own[frames[-1]] += k
        for frame in set(frames):
            under[frame] += k
    if not total:
        return {"self": [], "inclusive": []}
    skip = ("<module>", "_run_module_as_main", "_run_code", "run_forever", "_run_once")
    inclusive = [
        (100 * k / total, f)
        for f, k in under.most_common()
        if not any(s in f for s in skip) and 100 * k / total < 99.5
    ]
    return {
        "self": [(100 * k / total, f) for f, k in own.most_common(n)],
        "inclusive": inclusive[:n],
    }


def markdown(title: str, entries: dict[str, list[tuple[float, str]]]) -> str:
    lines = [f"### {title}", "", "| own samples | frame |", "| --- | --- |"]
    lines += [f"| {p:.1f} % | `{f}` |" for p, f in entries["self"]]
    lines += ["", "| samples under | frame |", "| --- | --- |"]
    lines += [f"| {p:.1f} % | `{f}` |" for p, f in entries["inclusive"]]
    return "\n".join(lines) + "\n"
