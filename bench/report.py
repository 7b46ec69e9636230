"""The table of a run: every figure beside its baseline, the ratio and the target; written as
Markdown and JSON under ``bench-results/``."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Figure:
    name: str
    value: float | None
    unit: str
    baseline: float | None
    baseline_note: str
    target: str
    met: bool | None
    ratio: float | None = None
    note: str = ""
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        if self.ratio is None and self.value is not None and self.baseline:
            self.ratio = self.value / self.baseline


@dataclass
class Report:
    mode: str
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    figures: list[Figure] = field(default_factory=list)
    truth: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)

    def add(self, figure: Figure) -> None:
        self.figures.append(figure)


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    load = os.getloadavg()
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "wrk": wrk.split("[")[0].strip() if wrk else "",
        "load_at_start": [round(x, 2) for x in load],
    }


def _num(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit in ("ms", "s"):
        return f"{value:,.2f} {unit}" if value < 10 else f"{value:,.1f} {unit}"
    return f"{value:,.0f} {unit}".strip()


def markdown(report: Report) -> str:
    lines = [
        f"# visitorstats benchmarks ({report.mode} run, {report.started})",
        "",
        f"Machine: {report.machine.get('nproc')} CPUs ({report.machine.get('cpu')}), "
        f"{report.machine.get('memory_gib')} GiB, Python {report.machine.get('python')}, "
        f"{report.machine.get('wrk')}; load average at start "
        f"{report.machine.get('load_at_start')}, "
        f"{report.machine.get('cores_busy_before_start')} cores busy just before the run.",
        "",
        f"Ingest answers once its record is safe: `VISITORSTATS_PUBLISH_ACK="
        f"{report.machine.get('publish_ack', 'spool')}`.",
        "",
        "| figure | visitorstats | baseline (same run) | ratio | target | met |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for f in report.figures:
        ratio = "—" if f.ratio is None else f"{f.ratio:.2f}×"
        met = "n/a" if f.met is None else ("yes" if f.met else "**no**")
        baseline = _num(f.baseline, f.unit)
        if f.baseline_note:
            baseline += f" ({f.baseline_note})"
        value = _num(f.value, f.unit)
        if f.note:
            value += f" ({f.note})"
        lines.append(f"| {f.name} | {value} | {baseline} | {ratio} | {f.target} | {met} |")
    cpu_lines = []
    for figure, sides in report.raw.items():
        if not isinstance(sides, dict):
            continue
        for side, result in sides.items():
            if isinstance(result, dict) and "cpu_cores" in result:
                shares = ", ".join(f"{k} {v:.2f}" for k, v in result["cpu_cores"].items())
                cpu_lines.append(f"- {figure}, {side}: {shares}")
    if cpu_lines:
        lines += ["", "Cores busy on average while measured (of the machine's CPUs):", ""]
        lines += cpu_lines
    lines += ["", "Ground truth (the harness's own counts):", ""]
    for k, v in report.truth.items():
        lines.append(f"- {k}: {v}")
    lines.append("")
    return "\n".join(lines)


def write(report: Report, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "latest.md", out / "latest.json"
    md.write_text(markdown(report), encoding="utf-8")
    data = asdict(report)
    js.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    return md, js
