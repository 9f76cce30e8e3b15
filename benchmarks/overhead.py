"""Framework overhead on the embedded SFT job, measured side by side in one run.

    python benchmarks/overhead.py            # ~2 minutes on 2 CPU cores

The same job (tiny Llama, 4,096 sort demonstrations, 640 steps of batch 64, lr 3e-3, loss on answer
tokens only, then greedy gold evaluation on 500 held-out prompts) is run three ways, each in a fresh
Python process so import costs count:

  torch     a plain PyTorch loop: the floor
  trl       a bare TRL SFTTrainer script with the minimum configuration
  rlhf_exp  `python -m rlhf_exp`: adds per-epoch evaluation, best-checkpoint restore, initial and final
            gold evaluation, metrics.jsonl/summary.json/manifest.json

plus the latency of the CLI's light paths (--help, --cfg job, and a PPO dry run with its memory plan), which must
not import ML libraries.
It prints wall times, gold scores and the ratios; nothing is asserted.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH, LR = 640, 64, 3e-3


def _setup():
    from omegaconf import OmegaConf

    from rlhf_exp.cli import compose
    from rlhf_exp.data.synthetic import build_task_data
    from rlhf_exp.models import build_tiny_model, build_tiny_tokenizer

    cfg = OmegaConf.to_object(compose([]))
    data = build_task_data(cfg.data.synthetic, cfg.data.seed)
    tokenizer = build_tiny_tokenizer()
    return cfg, data, tokenizer, build_tiny_model(cfg.model, tokenizer)


def _gold(model, tokenizer, data) -> float:
    from rlhf_exp.evaluation import gold_score

    return gold_score(model, tokenizer, data["eval_prompts"], max_new_tokens=8, batch_size=256)


def variant_torch() -> dict:
    import torch

    torch.manual_seed(0)
    _, data, tokenizer, model = _setup()
    rows = []
    for r in data["sft_train"]:
        prompt = tokenizer(r["prompt"])["input_ids"]
        full = tokenizer(r["prompt"] + r["completion"] + tokenizer.eos_token)["input_ids"]
        rows.append((full, len(prompt)))
    width = max(len(f) for f, _ in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for i, (full, n_prompt) in enumerate(rows):
        ids[i, : len(full)] = torch.tensor(full)
        labels[i, n_prompt: len(full)] = torch.tensor(full[n_prompt:])
    mask = ids != tokenizer.pad_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    start = time.perf_counter()
    model.train()
    for _ in range(STEPS):
        idx = torch.randint(0, len(rows), (BATCH,))
        loss = model(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    train_s = time.perf_counter() - start
    return {"train_s": train_s, "gold_score": _gold(model, tokenizer, data)}


def variant_trl() -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    _, data, tokenizer, model = _setup()
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(output_dir=tmp, max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=LR,
                         lr_scheduler_type="constant", bf16=False, gradient_checkpointing=False, use_cpu=True,
                         report_to="none", save_strategy="no", logging_steps=16, max_length=32, seed=0,
                         disable_tqdm=True)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(data["sft_train"]),
                             processing_class=tokenizer)
        start = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - start
    return {"train_s": train_s, "gold_score": _gold(trainer.model, tokenizer, data)}


def _timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    return time.perf_counter() - start, proc


def _run_variant(name: str) -> dict:
    wall, proc = _timed([sys.executable, __file__, "--variant", name])
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-2000:]}")
    return {"wall_s": wall, **json.loads(proc.stdout.strip().splitlines()[-1])}


def main() -> None:
    # the light paths, interleaved (A B C A B C ...): the dry run adds the config checks and the planner to --cfg
    # (on a machine without GPUs the a100x8 dry run ends refused after printing its plan: the time is the same)
    paths = (["--help"], ["--cfg", "job"], ["phase=ppo", "hardware=a100x8", "model=llama3_8b", "dry_run=true"])
    times: dict[str, list[float]] = {" ".join(args): [] for args in paths}
    for _ in range(3):
        for args in paths:
            times[" ".join(args)].append(_timed([sys.executable, "-m", "rlhf_exp", *args])[0])
    light = {args: statistics.median(t) for args, t in times.items()}

    results = {"torch": _run_variant("torch"), "trl": _run_variant("trl")}
    with tempfile.TemporaryDirectory() as tmp:
        wall, proc = _timed([sys.executable, "-m", "rlhf_exp", f"output_root={tmp}"])
        if proc.returncode != 0:
            raise SystemExit(f"rlhf_exp failed:\n{proc.stderr[-2000:]}")
        summary = json.loads(next(Path(tmp).rglob("summary.json")).read_text())["metrics"]
        results["rlhf_exp"] = {"wall_s": wall, "train_s": summary["train_runtime_s"], "gold_score": summary["gold_score"]}

    print(f"machine: {platform.machine()}, {__import__('os').cpu_count()} cores, Python {platform.python_version()}")
    for args, seconds in light.items():
        print(f"python -m rlhf_exp {args:<58} {seconds:6.2f} s (median of 3)")
    print(f"\n{'variant':<10} {'wall s':>8} {'train s':>8} {'gold':>6}")
    for name, r in results.items():
        print(f"{name:<10} {r['wall_s']:8.1f} {r['train_s']:8.1f} {r['gold_score']:6.3f}")
    ours, trl, floor = results["rlhf_exp"], results["trl"], results["torch"]
    print(f"\nwall  ratio rlhf_exp / bare TRL   : {ours['wall_s'] / trl['wall_s']:.2f}")
    print(f"wall  ratio rlhf_exp / plain torch: {ours['wall_s'] / floor['wall_s']:.2f}")
    print(f"train ratio bare TRL / plain torch: {trl['train_s'] / floor['train_s']:.2f}")
    print(f"train ratio rlhf_exp / bare TRL   : {ours['train_s'] / trl['train_s']:.2f} "
          "(rlhf_exp adds per-epoch eval and checkpoints for best-model restore)")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--variant":
        sys.path.insert(0, str(ROOT))
        print(json.dumps({"torch": variant_torch, "trl": variant_trl}[sys.argv[2]]()))
    else:
        main()
