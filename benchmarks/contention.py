"""The README's main command alone and next to CPU-bound busy processes, with this project's CPU-thread rule
(``rlhf_exp.launch.threads``) and with torch's default threads (``RLHF_EXP_THREADS=torch``, the behaviour
before the rule), interleaved and repeated.

    python benchmarks/contention.py                  # shortened chain, 3 repeats, busy processes = cores
    python benchmarks/contention.py --full           # the README command as it is (minutes per run)
    python benchmarks/contention.py --reps 3 --busy 4 --timeout 600

The command is ``python -m rlhf_exp pipeline=rlhf`` (README, "Set-up and first run"). Unless ``--full``, each
phase is shortened with ``pipeline.<phase>.max_steps`` (``--steps``) so that a loaded run with torch's
default threads ends in minutes; the printout says so. A run that passes ``--timeout`` is stopped and its
time is shown as a lower bound (">"). Each run writes into its own temporary output_root, removed afterwards.

Busy process: a pure-Python spin loop in a subprocess (one per core by default), started before the loaded
run and stopped after it. Order within each repeat: <mode> alone, <mode> loaded, for each mode in turn, so
alone/loaded and the modes alternate (A B A B). Measured per run: wall time, CPU time of the run and its
children (wait4's rusage), peak RSS of the largest process (ru_maxrss), and the thread count the SFT
phase recorded in its manifest.json (cpu_threads). Slowdown = median loaded wall / median alone wall. Then, in
the style of benchmarks/harness.py, ratios taken round by round (each run against the run of the same repeat) with
their min / median / max, for wall, CPU and peak RSS: loaded / alone for each mode, and torch / rule for each load.
A ratio over a run stopped at the timeout is a lower bound for wall and says little for CPU; the printout marks
them. The printout starts with the machine, its load and the library versions (harness.header()).
Public tools only: stdlib (subprocess, os.wait4, resource).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import header, report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
README_COMMAND = [sys.executable, "-m", "rlhf_exp", "pipeline=rlhf"]
DEFAULT_STEPS = "sft=100,rm=20,ppo=4,dpo=20"
MODES = {
    # name -> environment changes
    "rule": {},  # this project's rule (the default)
    "torch": {"RLHF_EXP_THREADS": "torch"},  # torch's default threads: the old behaviour
}
SPIN = "while True:\n    pass\n"


def start_busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", SPIN], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(n)]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def recorded_threads(out: Path) -> str:
    """cpu_threads recorded by each phase's manifest.json, e.g. "1" or "2,2,2,2"."""
    seen = []
    for m in sorted(out.rglob("manifest.json"), key=lambda p: p.stat().st_mtime):
        try:
            seen.append(str(json.loads(m.read_text()).get("cpu_threads")))
        except (OSError, ValueError):
            pass
    uniq = sorted(set(seen))
    return ",".join(uniq) if uniq else "?"


def run_once(cmd: list[str], env: dict[str, str], timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="rlhf_contention_") as tmp:
        out = Path(tmp)
        log = open(out / "log.txt", "wb")
        t0 = time.perf_counter()
        proc = subprocess.Popen([*cmd, f"output_root={out / 'outputs'}"], cwd=tmp, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        timed_out = False
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                pid, status, ru = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.close()
        tail = (out / "log.txt").read_text(errors="replace")[-2000:]
        return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss_mb": ru.ru_maxrss / 1024,
                "rc": proc.returncode, "timed_out": timed_out, "threads": recorded_threads(out / "outputs"),
                "tail": tail}


def fmt_s(r: dict) -> str:
    return (">" if r["timed_out"] else "") + f"{r['wall']:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3, help="repeats of each (mode, alone/loaded) pair (default 3)")
    ap.add_argument("--busy", type=int, default=os.cpu_count() or 1, help="busy processes (default: cores)")
    ap.add_argument("--steps", default=DEFAULT_STEPS,
                    help=f"phase=max_steps for each shortened phase (default {DEFAULT_STEPS})")
    ap.add_argument("--full", action="store_true", help="the README command unshortened")
    ap.add_argument("--modes", default="rule,torch", help="comma-separated of: " + ", ".join(MODES))
    ap.add_argument("--timeout", type=float, default=300, help="seconds before a run is stopped (default 300)")
    ap.add_argument("extra", nargs="*", help="more overrides for the command (key=value)")
    args = ap.parse_args(argv)

    cmd = list(README_COMMAND)
    if not args.full:
        for item in filter(None, args.steps.split(",")):
            phase, steps = item.split("=")
            cmd.append(f"pipeline.{phase.strip()}.max_steps={int(steps)}")
    cmd += args.extra
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}")

    base_env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "RLHF_EXP_THREADS")}
    base_env["PYTHONPATH"] = str(ROOT) + os.pathsep + base_env.get("PYTHONPATH", "")
    print(header())
    print("command: " + " ".join(["python", *cmd[1:]]) + " output_root=<temp>")
    if not args.full:
        print(f"  (the README's main command, shortened with pipeline.<phase>.max_steps ({args.steps}); --full: as is)")
    print(f"busy: {args.busy} pure-Python spin processes; repeats: {args.reps}; timeout {args.timeout:.0f} s per run")
    print("modes: rule = this project's thread rule (default); torch = RLHF_EXP_THREADS=torch (torch's default threads)\n",
          flush=True)

    results: dict[tuple[str, str], list[dict]] = {}
    print(f"{'rep':>3} {'mode':<6} {'load':<7} {'wall s':>8} {'cpu s':>8} {'peak RSS MB':>11} {'threads':>7} {'rc':>3}",
          flush=True)
    for rep in range(args.reps):
        for mode in modes:
            env = {**base_env, **MODES[mode]}
            for load in ("alone", "loaded"):
                busy = start_busy(args.busy) if load == "loaded" else []
                try:
                    if busy:
                        time.sleep(0.5)  # the spinners are running before the run starts
                    r = run_once(cmd, env, args.timeout)
                finally:
                    stop(busy)
                results.setdefault((mode, load), []).append(r)
                print(f"{rep + 1:>3} {mode:<6} {load:<7} {fmt_s(r):>8} {r['cpu']:>8.1f} {r['rss_mb']:>11.0f} "
                      f"{r['threads']:>7} {r['rc']:>3}", flush=True)
                if r["rc"] != 0 and not r["timed_out"]:
                    print("    run failed; its output ends with:\n" + r["tail"], flush=True)

    print("\nsummary (median of the repeats; '>' = at least one run stopped at the timeout, a lower bound)")
    print(f"{'mode':<6} {'alone wall s':>12} {'loaded wall s':>13} {'slowdown':>8} {'alone cpu s':>11} "
          f"{'loaded cpu s':>12} {'peak RSS MB':>11}")
    failed = False
    for mode in modes:
        a, b = results[(mode, "alone")], results[(mode, "loaded")]
        wa, wb = statistics.median(r["wall"] for r in a), statistics.median(r["wall"] for r in b)
        mark_a = ">" if any(r["timed_out"] for r in a) else ""
        mark_b = ">" if any(r["timed_out"] for r in b) else ""
        failed |= any(r["rc"] != 0 and not r["timed_out"] for r in a + b)
        print(f"{mode:<6} {mark_a + f'{wa:.1f}':>12} {mark_b + f'{wb:.1f}':>13} {mark_b + f'{wb / wa:.2f}x':>8} "
              f"{statistics.median(r['cpu'] for r in a):>11.1f} {statistics.median(r['cpu'] for r in b):>12.1f} "
              f"{max(r['rss_mb'] for r in a + b):>11.0f}")

    comparisons = [(f"{m} loaded", f"{m} alone", (m, "loaded"), (m, "alone")) for m in modes]
    if "rule" in modes and "torch" in modes:
        comparisons += [(f"torch {load}", f"rule {load}", ("torch", load), ("rule", load)) for load in ("alone", "loaded")]
    for name, base, key, base_key in comparisons:
        runs = results[key] + results[base_key]
        print(f"\n== {name} against {base} ==")
        report({base: results[base_key], name: results[key]}, baseline=base)
        if any(r["timed_out"] for r in runs):
            print("  (some runs here were stopped at the timeout: their wall ratios are bounds, CPU ratios say little)")
        if any(r["rc"] != 0 and not r["timed_out"] for r in runs):
            print("  (some runs here failed: these ratios are not comparable)")
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
