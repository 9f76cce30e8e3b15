"""rlhf_exp's PPO against TRL 1.12's PPOTrainer (``trl.experimental.ppo``; TRL >= 1.14 has none) on equal work, at
two model sizes, side by side: interleaved rounds, fresh processes, CPU time, wall time, peak RSS, and the training
loop's seconds per PPO step (benchmarks/harness.py).

    python benchmarks/ppo_vs_trl.py                       # both sizes, 3 rounds (~15 min on 2 cores)
    python benchmarks/ppo_vs_trl.py --sizes tiny --reps 5
    python benchmarks/ppo_vs_trl.py --venv /tmp/trl112    # where TRL 1.12's environment is built (kept)

TRL 1.12 runs in a virtual environment of its own, built on first use: ``pip install torch==<ours> trl==1.12.0
transformers==<ours> accelerate==<ours> datasets==<ours>``: only TRL differs. Sizes: ``tiny`` (the embedded model,
83k parameters) and ``6m`` (the same Llama built from config with hidden 256, 6 layers, MLP 1024: 6.3M
parameters). For each size the benchmark first makes the parents with rlhf_exp (SFT, then a reward model from
it; shortened for 6m, whose quality does not matter here), then hands both variants the same SFT checkpoint
(policy, reference), reward-model checkpoint (reward model, and the value model's initialisation) and prompts
(the preference set's distinct prompts, as rlhf_exp's PPO samples them).

Equal work per step: 128 answers of at most 8 new tokens at temperature 1, scored by policy, reference, value
model and reward model, then 2 PPO epochs of one update over all 128 (one mini-batch: TRL 1.12 cannot express the
recipe's 2 mini-batches of 64 with the same rollout size, see benchmarks/trl112_ppo.py) updating policy and value
model; a fixed KL coefficient 0.05. rlhf_exp runs ``phase=ppo`` with ``phase.kl_ctrl=fixed phase.eval_steps=null`` (no held-out
evaluation during training); it still scores gold before and after training (greedy answers to 500 prompts)
and writes its run folder, TRL writes nothing. Differences that remain (their cost is in the ratios): rlhf_exp
has separate optimizers for policy and critic (TRL one for both), normalises and clips the reward-model score
(TRL does not), and scores the rollouts' gold reward.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import ROOT, Variant, header, interleaved, python, report  # noqa: E402

ENV = {"OMP_NUM_THREADS": "1"}
SIZES = {
    "tiny": {"model": [], "sft": [], "rm": [], "steps": 40},
    "6m": {"model": ["model.embedded.hidden_size=256", "model.embedded.num_layers=6",
                     "model.embedded.intermediate_size=1024"],
           "sft": ["phase.max_steps=150", "phase.eval_steps=50"], "rm": ["phase.max_steps=30"], "steps": 10},
}
TRL_VERSION = "1.12.0"


def build_venv(folder: Path) -> Path:
    """TRL 1.12's environment (built once; the same torch, transformers, accelerate and datasets as ours)."""
    py = folder / "bin" / "python"
    if py.is_file() and subprocess.run([str(py), "-c", f"import trl; assert trl.__version__ == '{TRL_VERSION}'"],
                                       capture_output=True).returncode == 0:
        return py
    print(f"building TRL {TRL_VERSION}'s environment in {folder} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    pins = [f"torch=={version('torch').split('+')[0]}", f"trl=={TRL_VERSION}", f"transformers=={version('transformers')}",
            f"accelerate=={version('accelerate')}", f"datasets=={version('datasets')}"]
    subprocess.run([str(py), "-m", "pip", "install", "-q", pins[0]], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", *pins], check=True)
    return py


def rlhf_exp(args: list[str]) -> None:
    proc = subprocess.run(python("-m", "rlhf_exp", *args), cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **ENV})
    if proc.returncode != 0:
        raise SystemExit(f"python -m rlhf_exp {' '.join(args)} failed:\n{proc.stderr[-3000:]}")


def parents(size: str, root: Path) -> tuple[Path, Path, Path]:
    """(SFT run, RM run, prompts.json) of ``size``, made with rlhf_exp under ``root``."""
    spec = SIZES[size]
    out = root / size
    rlhf_exp(["phase=sft", *spec["model"], *spec["sft"], f"output_root={out}"])
    (sft,) = (out / "runs").iterdir()
    rlhf_exp(["phase=rm", *spec["model"], *spec["rm"], f"phase.sft_run={sft}", f"output_root={out}"])
    (rm,) = [r for r in (out / "runs").iterdir() if r.name.endswith("_rm")]
    from omegaconf import OmegaConf

    from rlhf_exp.cli import compose
    from rlhf_exp.data.synthetic import build_task_data

    cfg = OmegaConf.to_object(compose(["phase=ppo"]))
    data = build_task_data(cfg.data.synthetic, cfg.data.seed)
    prompts = list(dict.fromkeys(p.prompt for p in data["pref_train"]))
    path = out / "prompts.json"
    path.write_text(json.dumps(prompts))
    return sft, rm, path


def ours_numbers(text: str, tmp: Path) -> dict:
    (summary,) = Path(tmp).rglob("summary.json")
    m = json.loads(summary.read_text())["metrics"]
    return {"steps": m["steps"], "s_per_step": m["train_runtime_s"] / m["steps"]}


def trl_numbers(text: str, _tmp: Path) -> dict:
    line = [ln for ln in text.splitlines() if ln.startswith("{")][-1]
    r = json.loads(line)
    return {"steps": r["steps"], "s_per_step": r["s_per_step"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="tiny,6m")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--venv", default=str(Path(tempfile.gettempdir()) / "rlhf_bench_trl112"))
    args = ap.parse_args(argv)
    trl_python = build_venv(Path(args.venv))
    print(header())
    print(f"TRL {TRL_VERSION} in {args.venv}; rounds: {args.reps}; threads: 1 per process\n", flush=True)
    summary = {}
    with tempfile.TemporaryDirectory(prefix="rlhf_bench_ppo_") as tmp:
        for size in [s for s in args.sizes.split(",") if s]:
            spec = SIZES[size]
            sft, rm, prompts = parents(size, Path(tmp))
            steps = spec["steps"]
            print(f"== {size}: {steps} PPO steps (parents {sft.name}, {rm.name}) ==", flush=True)
            ours = ["-m", "rlhf_exp", "phase=ppo", *spec["model"], f"phase.sft_run={sft}", f"phase.reward_run={rm}",
                    f"phase.max_steps={steps}", "phase.kl_ctrl=fixed", "phase.kl_coef=0.05", "phase.eval_steps=null",
                    "phase.num_mini_batches=1",
                    "output_root={tmp}"]
            theirs = ["benchmarks/trl112_ppo.py", "--sft", str(sft / "checkpoints" / "final"),
                      "--rm", str(rm / "checkpoints" / "reward_model"), "--prompts", str(prompts),
                      "--steps", str(steps), "--out", "{tmp}"]
            results = interleaved([Variant("rlhf_exp", python(*ours), ENV, ours_numbers),
                                   Variant("trl_1.12", [str(trl_python), *theirs], ENV, trl_numbers)], reps=args.reps)
            medians = report(results, baseline="trl_1.12", extra=("s_per_step",))
            per_step = [a["s_per_step"] / b["s_per_step"] for a, b in zip(results["rlhf_exp"], results["trl_1.12"])]
            summary[size] = {**medians["rlhf_exp"], "s_per_step": sorted(per_step)[len(per_step) // 2]}
            print(f"s per step: rlhf_exp / trl_1.12 round by round: {' '.join(f'{r:.3f}' for r in per_step)}\n",
                  flush=True)
    print("summary: rlhf_exp / TRL 1.12 PPO, median of the round-by-round ratios")
    for size, m in summary.items():
        print(f"  {size:<5} CPU {m['cpu']:.3f}  wall {m['wall']:.3f}  peak RSS {m['rss_mb']:.3f}  "
              f"training s per step {m['s_per_step']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
