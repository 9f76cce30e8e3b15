"""The planner's per-process memory estimate against the measured peak of the real run, on CPU.

    python benchmarks/planner_memory.py              # ~8 minutes on 2 CPU cores
    python benchmarks/planner_memory.py --rounds 5

What is compared, for each variant:
  estimate  the dry run's per-process total (rlhf_exp.planner) less its runtime allowance, i.e. what the
            planner attributes to the run's own tensors: states + the largest stage's activations
  measured  peak RSS of the training process (ru_maxrss from os.wait4 on that one child) minus the peak RSS of
            a process that only imports torch, transformers and trl (and TRL's SFTTrainer), measured the same way

Variants (each run in a fresh process, interleaved baseline A B C, baseline A B C, ...):
  A  tiny_sft   the embedded 83k-parameter model, SFT for --tiny-steps steps (batch 64)
  B  10m_sft    a 10.4M-parameter Mistral-layout model (python -m rlhf_exp.scaled_models, hidden 256, 10 layers,
                4 heads / 2 kv heads, MLP 1024, 1024-token vocabulary), SFT on data=synthetic_chat, --mid-steps steps
  C  tiny_ppo   the embedded model, PPO for --ppo-steps steps (policy, reference, reward model, critic), from an SFT
                and an RM run made once before the rounds (not measured)

The planner bounds sequences by phase.max_length; the runs pad to the longest sequence of each batch, which
for the embedded task is far shorter than the recipes' max_length. Both estimates are printed: at the
recipe's max_length (what a user sees) and at the data's longest tokenized sequence (what the run holds).
Prints every measurement, then medians and ratios estimate / measured; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BASELINE = "import torch, transformers, trl; from trl import SFTTrainer"
TEN_M = {"hidden-size": 256, "num-layers": 10, "num-heads": 4, "num-kv-heads": 2, "intermediate-size": 1024}


def measure(cmd: list[str], log: Path) -> dict:
    """Wall time, CPU time (user + system) and peak RSS of one child process, from os.wait4's rusage."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "WANDB_MODE": "disabled"}
    start = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return {"wall": time.monotonic() - start, "cpu": usage.ru_utime + usage.ru_stime, "rss_gb": usage.ru_maxrss * 1024 / 1e9}


def longest_sft_sequence(overrides: list[str]) -> int:
    """Tokens of the longest training sequence (prompt + answer), tokenized as SFT does."""
    from omegaconf import OmegaConf

    from rlhf_exp.cli import compose
    from rlhf_exp.data.encode import sft_ids
    from rlhf_exp.data.loading import synthetic_splits
    from rlhf_exp.models import load_tokenizer

    cfg = OmegaConf.to_object(compose(overrides))
    tokenizer = load_tokenizer(cfg.model)
    return max(len(sft_ids(tokenizer, r["prompt"], r["completion"])) for r in synthetic_splits(cfg.data)["sft_train"])


def longest_ppo_sequence() -> int:
    """PPO's sequences on the embedded task: the longest prompt (with BOS) + phase.max_new_tokens."""
    from omegaconf import OmegaConf

    from rlhf_exp.cli import compose
    from rlhf_exp.data.encode import prompt_ids
    from rlhf_exp.data.loading import synthetic_splits
    from rlhf_exp.models import build_tiny_tokenizer

    cfg = OmegaConf.to_object(compose(["phase=ppo"]))
    tokenizer = build_tiny_tokenizer()
    prompt = max(len(prompt_ids(tokenizer, p.prompt)) for p in synthetic_splits(cfg.data)["pref_train"])
    return prompt + cfg.phase.max_new_tokens


def only(root: Path, phase: str) -> Path:
    (run,) = sorted((root / "runs").glob(f"*_{phase}"))
    return run


def planner_gb(overrides: list[str]) -> float:
    """The planner's per-process bytes less its runtime allowance, in GB."""
    from rlhf_exp.cli import compose
    from rlhf_exp.planner import GB, estimate

    plan = estimate(compose(overrides))
    return (plan.total - plan.runtime) / GB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiny-steps", type=int, default=100)
    parser.add_argument("--mid-steps", type=int, default=10)
    parser.add_argument("--ppo-steps", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="planner_memory_"))
    py = [sys.executable]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from harness import header

    print(header())
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}; work folder {work}")

    mid = work / "model_10m"
    subprocess.run([*py, "-m", "rlhf_exp.scaled_models", "--family", "mistral_v03", "--out", str(mid),
                    *[x for k, v in TEN_M.items() for x in (f"--{k}", str(v))]], cwd=ROOT, check=True, capture_output=True)
    parents = work / "parents"
    measure([*py, "-m", "rlhf_exp", "phase=sft", "phase.max_steps=100", f"output_root={parents}"], work / "parent_sft.log")
    measure([*py, "-m", "rlhf_exp", "phase=rm", "phase.max_steps=30", f"output_root={parents}"], work / "parent_rm.log")

    variants = {
        "tiny_sft": ["phase=sft", f"phase.max_steps={args.tiny_steps}"],
        "10m_sft": ["model=local", f"model.path={mid}", "data=synthetic_chat", "phase=sft", f"phase.max_steps={args.mid_steps}"],
        "tiny_ppo": ["phase=ppo", f"phase.max_steps={args.ppo_steps}", f"phase.sft_run={only(parents, 'sft')}",
                     f"phase.reward_run={only(parents, 'rm')}"],
    }
    longest = {"tiny_sft": longest_sft_sequence([]), "10m_sft": longest_sft_sequence(variants["10m_sft"][:3]),
               "tiny_ppo": longest_ppo_sequence()}
    estimates = {name: (planner_gb(o), planner_gb([*o, f"phase.max_length={longest[name]}"])) for name, o in variants.items()}

    runs: dict[str, list[dict]] = {"baseline": [], **{name: [] for name in variants}}
    print(f"\n{'round':>5} {'variant':<10} {'wall s':>7} {'CPU s':>7} {'peak RSS GB':>12}")
    for r in range(1, args.rounds + 1):
        for name in runs:
            if name == "baseline":
                cmd = [*py, "-c", BASELINE]
            else:
                cmd = [*py, "-m", "rlhf_exp", *variants[name], f"output_root={work / f'runs_{r}'}"]
            m = measure(cmd, work / f"{name}_{r}.log")
            runs[name].append(m)
            print(f"{r:>5} {name:<10} {m['wall']:7.1f} {m['cpu']:7.1f} {m['rss_gb']:12.3f}", flush=True)

    base = statistics.median(m["rss_gb"] for m in runs["baseline"])
    print(f"\nbaseline (import torch, transformers, trl): peak RSS median {base:.3f} GB over {args.rounds} runs\n")
    head = (f"{'variant':<10} {'est. GB':>8} {'est. GB':>8} {'measured':>9} {'ratio':>6} {'ratio':>6} "
            f"{'wall s':>7} {'CPU s':>7} {'peak RSS':>9}")
    print(head)
    print(f"{'':<10} {'max_len':>8} {'longest':>8} {'GB':>9} {'(max)':>6} {'(long)':>6} {'median':>7} {'median':>7} "
          f"{'GB med.':>9}")
    for name in variants:
        rss = statistics.median(m["rss_gb"] for m in runs[name])
        measured = rss - base
        at_max, at_longest = estimates[name]
        print(f"{name:<10} {at_max:8.3f} {at_longest:8.3f} {measured:9.3f} {at_max / measured:6.2f} "
              f"{at_longest / measured:6.2f} {statistics.median(m['wall'] for m in runs[name]):7.1f} "
              f"{statistics.median(m['cpu'] for m in runs[name]):7.1f} {rss:9.3f}")
    print("\nmeasured growth round by round (the variant's peak RSS less the baseline's of the same round, GB): "
          "min / median / max")
    for name in variants:
        growth = [m["rss_gb"] - b["rss_gb"] for m, b in zip(runs[name], runs["baseline"])]
        print(f"  {name:<10} {min(growth):.3f} / {statistics.median(growth):.3f} / {max(growth):.3f}")
    print(f"\nlongest sequences (tokens): {json.dumps(longest)}; spread of measured peaks (max - min, GB): "
          + ", ".join(f"{n} {max(m['rss_gb'] for m in runs[n]) - min(m['rss_gb'] for m in runs[n]):.3f}" for n in runs))


if __name__ == "__main__":
    main()
