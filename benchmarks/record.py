"""Shared bookkeeping for benchmark scripts: the context every result row carries, timing percentiles, CSV and
Markdown output.

Every row names the machine, the library versions, the git SHA and the date, so numbers from different runs are
never compared without knowing where they came from. Timings are meant to be compared as ratios between providers
measured in the same run.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        sha = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "?"))
    except Exception:  # a missing optional library is recorded, not fatal
        return "absent"


def machine_context(device: str = "cpu") -> dict[str, Any]:
    """Where and when a result was measured."""
    ctx: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_sha": _git_sha(),
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "num_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "triton": _version("triton"),
        "device": device,
    }
    if device.startswith("cuda"):
        import torch
        ctx["device"] = torch.cuda.get_device_name()
    return ctx


def time_percentiles(fn: Callable[[], Any], *, warmup: int = 1, repeat: int = 5,
                     sync: Callable[[], None] | None = None) -> dict[str, float]:
    """Run fn warmup + repeat times; return p20/p50/p80 wall time in milliseconds."""
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    if len(times) == 1:
        return {"p20_ms": times[0], "p50_ms": times[0], "p80_ms": times[0]}
    q = statistics.quantiles(times, n=10, method="inclusive")
    return {"p20_ms": q[1], "p50_ms": statistics.median(times), "p80_ms": q[7]}


def append_csv(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> Path:
    """Append rows to a CSV file, writing the header when the file is new; columns are the first row's keys."""
    rows = list(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not rows:
        return path
    new = not path.exists() or path.stat().st_size == 0
    fields = list(rows[0].keys())
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), None)
        if header:
            fields = header + [k for k in rows[0] if k not in header]
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table of the given columns; floats with 4 significant digits."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def context_header(ctx: dict[str, Any]) -> str:
    """One Markdown line saying where and when, for the top of a results file."""
    return (f"Measured {ctx['date']} on {ctx['host']} ({ctx['cpu']}, {ctx['num_cpus']} CPUs, device {ctx['device']}), "
            f"git {ctx['git_sha']}, Python {ctx['python']}, torch {ctx['torch']}, triton {ctx['triton']}.")
