"""Shared timing, reporting and plotting for the benchmarks in this folder.

Conventions (both benchmarks): warm up first, then time `repeats` calls and report the median
(torch.utils.benchmark.Timer on CPU, one call per measurement so slow and fast implementations get the
same statistics; CUDA events on GPU); ratios are against the eager reference at the same
shape; every row is appended to a CSV under benchmarks/results/ with the device, shapes, git
commit and a timestamp; a PNG plot of the sweeps is written next to it.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.utils.benchmark as benchmark

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def load_average() -> str:
    """`uptime`'s 1-minute load average (the machine is shared: numbers are only as good as the load)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "unknown"


def device_name(device: torch.device) -> str:
    """"Intel(R) Xeon(R) Processor (2 threads)" or the CUDA device name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True, text=True, timeout=10,
        )
        commit = out.stdout.strip() if out.returncode == 0 else "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True, text=True, timeout=10,
        )
        if commit != "unknown" and dirty.stdout.strip():
            commit += "+dirty"
        return commit
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int) -> List[float]:
    """Wall times of `repeats` calls in milliseconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            times.append(timer.timeit(1).median * 1e3)
    return times


@dataclass
class Row:
    benchmark: str
    impl: str
    mode: str  # "fwd" or "fwd+bwd"
    shape: Dict[str, object]
    times_ms: List[float]
    ratio: Optional[float] = None  # eager reference median / this median (speed-up)
    note: str = ""
    extra: Dict[str, object] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def minimum(self) -> float:
        return min(self.times_ms)


def fill_ratios(rows: Sequence[Row], baseline_impl: str = "reference-eager"):
    """ratio = median(eager reference) / median(impl) for rows sharing benchmark, mode and shape."""
    base = {}
    for r in rows:
        if r.impl == baseline_impl:
            base[(r.benchmark, r.mode, tuple(sorted(r.shape.items())))] = r.median
    for r in rows:
        b = base.get((r.benchmark, r.mode, tuple(sorted(r.shape.items()))))
        r.ratio = None if b is None else b / r.median


def print_table(rows: Sequence[Row], title: str):
    print(f"\n{title}")
    shape_keys = list(rows[0].shape) if rows else []
    header = ["impl", "mode"] + shape_keys + ["median ms", "min ms", "x vs eager ref", "note"]
    table = []
    for r in rows:
        table.append(
            [r.impl, r.mode] + [str(r.shape[k]) for k in shape_keys]
            + [f"{r.median:.2f}", f"{r.minimum:.2f}", "-" if r.ratio is None else f"{r.ratio:.1f}x", r.note]
        )
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)] if table else []
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths)))


def append_csv(rows: Sequence[Row], filename: str, device: torch.device, extra_columns: Dict[str, object]):
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, filename)
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    commit = git_commit()
    dev = device_name(device)
    shape_keys = sorted({k for r in rows for k in r.shape})
    fields = (
        ["timestamp", "git_commit", "device", "benchmark", "impl", "mode"] + shape_keys
        + ["median_ms", "min_ms", "repeats", "speedup_vs_eager_reference", "note"] + list(extra_columns)
    )
    new = not os.path.exists(path)
    if not new:
        with open(path, newline="", encoding="utf-8") as f:
            existing = next(csv.reader(f), None)
        if existing != fields:  # columns changed: start a fresh file rather than misalign
            os.replace(path, path + f".{stamp.replace(':', '')}.old")
            new = True
    with open(path, "a", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if new:
            w.writerow(fields)
        for r in rows:
            w.writerow(
                [stamp, commit, dev, r.benchmark, r.impl, r.mode] + [r.shape.get(k, "") for k in shape_keys]
                + [f"{r.median:.4f}", f"{r.minimum:.4f}", len(r.times_ms),
                   "" if r.ratio is None else f"{r.ratio:.3f}", r.note]
                + list(extra_columns.values())
            )
    return path


def plot_sweeps(rows: Sequence[Row], sweeps: Dict[str, Sequence[Row]], filename: str, title: str):
    """One panel per sweep (x = the swept shape key), median ms per implementation, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, key, rs) for name, (key, rs) in sweeps.items() if rs]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (name, key, rs) in zip(axes[0], panels):
        series: Dict[str, List] = {}
        for r in rs:
            series.setdefault(f"{r.impl} ({r.mode})", []).append((r.shape[key], r.median))
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("median time (ms)")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, filename)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

