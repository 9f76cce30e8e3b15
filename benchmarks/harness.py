"""Side-by-side measurement of whole commands on a noisy, shared machine (stdlib only).

Every benchmark in this folder runs its variants through :func:`interleaved`: each variant is a command run in a
fresh process; the variants run in turn (A B C, then A B C again, ...) for ``reps`` rounds, so slow spells of the
machine fall on every variant alike. Per run: wall time, CPU time of the process and its children (``os.wait4``'s
rusage, user + system), and the peak RSS of the largest process (``ru_maxrss``). :func:`report` prints each
variant's median, then each variant against a baseline as ratios taken round by round (the run of round i against
the baseline's run of round i) with their min / median / max: a ratio whose min and max straddle 1 says "no
difference measured".

    from harness import Variant, interleaved, report, header
    print(header())
    results = interleaved([Variant("ours", [...]), Variant("bare", [...])], reps=3)
    report(results, baseline="bare")
"""

from __future__ import annotations

import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = (("wall", "wall s"), ("cpu", "CPU s"), ("rss_mb", "peak RSS MB"))


@dataclass
class Variant:
    name: str
    cmd: list[str]  # "{tmp}" in an argument is replaced by a fresh temporary folder per run
    env: dict[str, str] = field(default_factory=dict)
    parse: object = None  # optional: callable(stdout, tmp folder) -> dict of extra numbers for the run
    ok_rc: tuple[int, ...] = (0,)  # exit statuses that count as a finished run (e.g. a dry run that ends refused)
    # optional: callable(run dict) -> None, called after parse, may change the run's numbers (e.g. CPU time spent
    # outside the process tree; a metric set to None is not measured: "n/a", no ratio)
    finish: object = None


def header() -> str:
    """The machine, its load and the library versions, for the top of a benchmark's printout."""
    versions = []
    for name in ("torch", "transformers", "trl", "accelerate", "peft"):
        try:
            from importlib.metadata import version

            versions.append(f"{name} {version(name)}")
        except Exception:  # not installed
            pass
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"machine: {platform.machine()}, {os.cpu_count()} CPUs (affinity {len(os.sched_getaffinity(0))}), {cpu}\n"
            f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average at start "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}\n"
            f"Python {platform.python_version()}; {', '.join(versions)}")


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 1800, parse=None,
        ok_rc: tuple[int, ...] = (0,)) -> dict:
    """One run of ``cmd`` in a fresh process group: wall, CPU (process + children), peak RSS, exit status."""
    with tempfile.TemporaryDirectory(prefix="rlhf_bench_") as tmp:
        argv = [a.replace("{tmp}", tmp) for a in cmd]
        full_env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    **(env or {})}
        out_path = Path(tmp) / "stdout.txt"
        with open(out_path, "wb") as out:
            start = time.perf_counter()
            proc = subprocess.Popen(argv, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.perf_counter() - start > timeout:
                    os.killpg(proc.pid, signal.SIGKILL)
                    pid, status, usage = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.02)
            wall = time.perf_counter() - start
        text = out_path.read_text(errors="replace")
        result = {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024,
                  "rc": os.waitstatus_to_exitcode(status), "tail": text[-3000:]}
        if parse is not None and result["rc"] in ok_rc:
            result.update(parse(text, Path(tmp)))
        return result


def interleaved(variants: list[Variant], reps: int = 3, timeout: float = 1800, verbose: bool = True) -> dict:
    """``reps`` rounds of every variant in turn; {variant name: [run dict per round]}. A failed run stops the
    benchmark with its output (a ratio over a failed run would be meaningless)."""
    results: dict[str, list[dict]] = {v.name: [] for v in variants}
    width = max(len(v.name) for v in variants)
    for rnd in range(reps):
        for v in variants:
            r = run(v.cmd, v.env, timeout, v.parse, v.ok_rc)
            if r["rc"] not in v.ok_rc:
                raise SystemExit(f"{v.name} failed (exit {r['rc']}) in round {rnd + 1}; its output ends with:\n{r['tail']}")
            if v.finish is not None:
                v.finish(r)
            results[v.name].append(r)
            if verbose:
                extra = "".join(f"  {k} {r[k]:.4g}" for k in r if k not in ("wall", "cpu", "rss_mb", "rc", "tail")
                                and isinstance(r[k], (int, float)))
                cpu = "    n/a" if r["cpu"] is None else f"{r['cpu']:7.2f}"
                rss = "   n/a" if r["rss_mb"] is None else f"{r['rss_mb']:6.0f}"
                print(f"round {rnd + 1}  {v.name:<{width}}  wall {r['wall']:7.2f} s  CPU {cpu} s  "
                      f"peak RSS {rss} MB{extra}", flush=True)
    return results


def _stats(values: list[float]) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


def _median(runs: list[dict], k: str) -> str:
    values = [r.get(k) for r in runs]
    return "n/a" if any(v is None for v in values) else f"{statistics.median(values):.3f}"


def report(results: dict[str, list[dict]], baseline: str, extra: tuple[str, ...] = ()) -> dict:
    """Medians per variant, then each variant / the baseline, round by round (min / median / max). Returns the
    median ratios {variant: {metric: ratio}}. A metric that is None in a run (not measured) prints as n/a and has
    no ratio."""
    keys = [*METRICS, *((k, k) for k in extra)]
    width = max(len(n) for n in results)
    print(f"\nmedians over {len(results[baseline])} rounds")
    print(f"{'variant':<{width}}  " + "  ".join(f"{label:>12}" for _, label in keys))
    for name, runs in results.items():
        print(f"{name:<{width}}  " + "  ".join(f"{_median(runs, k):>12}" for k, _ in keys))
    print(f"\nratios to {baseline}, round by round: min / median / max")
    medians: dict[str, dict[str, float]] = {}
    for name, runs in results.items():
        if name == baseline:
            continue
        row = []
        for k, label in METRICS:
            if any(r[k] is None for r in [*runs, *results[baseline]]):  # not measured (e.g. CPU outside our tree)
                row.append(f"{label} n/a")
                continue
            ratios = [r[k] / b[k] for r, b in zip(runs, results[baseline]) if b[k] > 0]
            medians.setdefault(name, {})[k] = statistics.median(ratios)
            row.append(f"{label} {_stats(ratios)}")
        print(f"{name} / {baseline}: " + "; ".join(row))
    return medians


def python(*args: str) -> list[str]:
    """This interpreter with ``args``."""
    return [sys.executable, *args]
