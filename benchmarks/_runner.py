"""The shared benchmark runner: timing, machine facts, floors, the markdown table and the results CSV.

Each ``bench_<op>.py`` builds its inputs and a dict of named callables, then calls :func:`run_cases`. Timings are
medians (with p20/p80) over repetitions after warm-up, with CUDA synchronisation around each repetition. Rows are
appended to ``benchmarks/results.csv`` with the device, git SHA and configuration.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.csv"
COLUMNS = [
    "date", "git_sha", "device", "torch", "bench", "config", "provider", "median_ms", "p20_ms", "p80_ms",
    "speedup_vs_ref", "speedup_vs_peer", "speedup_vs_peer2", "floor_ms", "floor_fraction", "notes",
]


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=HERE, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


@dataclass
class Timing:
    median: float
    p20: float
    p80: float
    reps: int
    samples: list[float] = field(default_factory=list, repr=False)


def time_fn(fn: Callable[[], object], device: str, reps: int = 10, warmup: int = 2, max_seconds: float = 60.0) -> Timing:
    """Median/p20/p80 wall time in ms of ``fn()``; stops early once ``max_seconds`` are spent (at least 3 reps)."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples: list[float] = []
    start = time.perf_counter()
    for i in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        samples.append(1e3 * (time.perf_counter() - t0))
        if i >= 2 and time.perf_counter() - start > max_seconds:
            break
    q = statistics.quantiles(samples, n=5) if len(samples) >= 2 else [samples[0]] * 4
    return Timing(statistics.median(samples), q[0], q[3], len(samples), samples)


def read_bandwidth_gbs(device: str, nbytes: int = 1 << 29) -> float:
    """Memory read bandwidth in GB/s, measured as a float32 sum over ``nbytes`` (read-dominated)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    t = time_fn(lambda: x.sum(), device, reps=7, warmup=2)
    return nbytes / (t.median * 1e-3) / 1e9


def exp_rate(device: str, dtype: torch.dtype = torch.float32) -> float:
    """Compute-bound exp throughput (evaluations per second) of torch.exp on a cache-resident float32 buffer
    (256 KiB on a CPU, 16 MiB on a GPU), repeated, so that memory traffic does not enter the number."""
    n = (1 << 16) if device == "cpu" else (1 << 22)
    loops = 64
    x = torch.rand(n, dtype=dtype, device=device) - 0.5
    out = torch.empty_like(x)

    def run():
        for _ in range(loops):
            torch.exp(x, out=out)

    t = time_fn(run, device, reps=7, warmup=2)
    return n * loops / (t.median * 1e-3)


def markdown_table(rows: list[dict]) -> str:
    cols = ["provider", "median_ms", "p20_ms", "p80_ms", "speedup_vs_ref", "speedup_vs_peer", "speedup_vs_peer2",
            "floor_fraction", "notes"]
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)
    lines = [head]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def append_results(rows: list[dict], path: Path = RESULTS) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def base_row(bench: str, config: str, device: str) -> dict:
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_sha": git_sha(),
        "device": device_name(device),
        "torch": torch.__version__,
        "bench": bench,
        "config": config,
    }


def scaled(t: Timing, factor: float) -> Timing:
    """A timing multiplied by ``factor`` (a peer timed on a subset of the models, extrapolated to all of them)."""
    return Timing(t.median * factor, t.p20 * factor, t.p80 * factor, t.reps)


def report(bench: str, config: str, device: str, timings: dict[str, Timing], *, ref: str | None, peer: str,
           peer2: str | None = None, floor_ms: float = float("nan"), notes: dict[str, str] | None = None,
           extra_note: str = "", record: bool = True) -> list[dict]:
    """One row per provider (speedups vs the ``ref``, ``peer`` and ``peer2`` providers, fraction of the floor),
    printed as a markdown table and, with ``record``, appended to the results CSV. Returns the rows."""
    notes = notes or {}
    ref_t, peer_t = timings.get(ref) if ref else None, timings[peer]
    peer2_t = timings[peer2] if peer2 else None
    rows = []
    for provider, t in timings.items():
        row = base_row(bench, config, device)
        row.update(
            provider=provider, median_ms=t.median, p20_ms=t.p20, p80_ms=t.p80,
            speedup_vs_ref=(ref_t.median / t.median) if ref_t else float("nan"),
            speedup_vs_peer=peer_t.median / t.median,
            speedup_vs_peer2=(peer2_t.median / t.median) if peer2_t else float("nan"),
            floor_ms=floor_ms, floor_fraction=floor_ms / t.median,
            notes="; ".join(x for x in (notes.get(provider, ""), f"{t.reps} reps", extra_note) if x),
        )
        rows.append(row)
    print(markdown_table(rows))
    if record:
        append_results(rows)
        print(f"\nappended {len(rows)} rows to {RESULTS}")
    return rows


def cli(argv, doc: str, configs: dict, run_config, *, skip_by_default=("quick",), default_reps=None) -> int:
    """The shared command line of the bench scripts: ``--config`` (repeatable), ``--reps``, ``--no-record``.
    Without ``--config``: every config except ``skip_by_default`` whose device this machine has."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--config", action="append", choices=sorted(configs),
                    help=f"default: every config this machine can run except {', '.join(skip_by_default)}")
    ap.add_argument("--reps", type=int, default=default_reps, help="repetitions per provider")
    ap.add_argument("--no-record", action="store_true", help="do not append to benchmarks/results.csv")
    args = ap.parse_args(argv)
    names = args.config or [n for n, c in configs.items()
                            if n not in skip_by_default and (c["device"] == "cpu" or torch.cuda.is_available())]
    for name in names:
        cfg = configs[name]
        if cfg["device"] == "cuda" and not torch.cuda.is_available():
            print(f"skipping {name}: no CUDA device")
            continue
        run_config(name, cfg, args.reps, not args.no_record)
    return 0


def _proc_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_mb(fn: Callable[[], object], device: str) -> float:
    """Peak memory growth (MB) while running ``fn`` once: ``torch.cuda.max_memory_allocated`` on CUDA, the
    process's peak RSS (``VmHWM`` after a reset through ``/proc/self/clear_refs``) on Linux CPUs, NaN elsewhere."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS
        base = _proc_kb("VmRSS")
        fn()
        return (_proc_kb("VmHWM") - base) / 1024
    except (OSError, KeyError):  # not Linux
        return float("nan")


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")
