"""``dry_run=true``: print what a run would do, load nothing."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig


def print_plan(cfg: DictConfig) -> None:
    from rlhf_exp.config.schema import learning_rate
    from rlhf_exp.tracking.lineage import describe_parents

    hw = cfg.hardware
    lr = learning_rate(cfg.phase, hw)
    lr_note = " from phase.lora_learning_rate: hardware.lora=true" if lr != cfg.phase.learning_rate else ""
    print(f"phase     : {cfg.phase.name} (lr={lr}{lr_note}, epochs={cfg.phase.num_epochs}, "
          f"batch={cfg.phase.per_device_train_batch_size}x{cfg.phase.gradient_accumulation_steps})")
    source = "folder" if cfg.model.path and Path(str(cfg.model.path)).expanduser().is_dir() else cfg.model.source
    print(f"model     : {cfg.model.name} ({source}{': ' + cfg.model.path if cfg.model.path else ''})")
    print(f"data      : {cfg.data.name} ({cfg.data.source}{': ' + cfg.data.path if cfg.data.path else ''})")
    print(f"hardware  : {hw.name} ({hw.num_nodes} node(s) x {hw.num_processes} process(es), "
          f"{hw.precision}, distributed={hw.distributed}, "
          f"lora={hw.lora})")
    print(f"parents   : {describe_parents(cfg)}")
    records, prompts = print_data(cfg)
    print(f"logger    : {cfg.logger.name}")
    launcher = cfg.launcher
    where = "" if launcher.name == "local" else (
        f" ({hw.num_nodes} node(s), {hw.num_processes} task(s) and {hw.gpus_per_node} GPU(s) per node, "
        f"partition={launcher.partition}, {launcher.time_min} min)")
    print(f"launcher  : {launcher.name}{where}")
    if hw.accelerator == "cuda" and launcher.name != "slurm" and not nvidia_gpu_visible():
        print(f"warning   : hardware={hw.name} needs CUDA GPUs and this machine shows none (no NVIDIA driver): a real "
              "run here stops at once; use hardware=cpu, or launcher=slurm to run it on GPU nodes")
    from rlhf_exp.planner import print_estimate

    summary = print_estimate(cfg, records, prompts)
    print("dry run: nothing loaded, nothing trained.")
    print(json.dumps(summary))  # the last line: one JSON object for scripts (fits, per_gpu_memory_gb, cost_usd)


def nvidia_gpu_visible() -> bool:
    """A cheap look for an NVIDIA driver (dry runs import no torch): its /proc entry or nvidia-smi."""
    import os
    import shutil

    return os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi") is not None


def print_data(cfg: DictConfig) -> tuple[int | None, int | None]:
    """The first record as the loader parsed it and the counts per split (read, kept, dropped), from the
    same loaders the run uses; no tokenizer or model is loaded, so token counts come with the run
    (data_preview.jsonl). A hub data set by id is not downloaded for a dry run. Returns the training records
    kept and, for the preference phases, their distinct prompts (PPO's epochs run over those), for the planner;
    (None, None) when not read."""
    from omegaconf import OmegaConf

    from rlhf_exp.data.loading import generated_counts, pair_rows, preference_data, sft_data, synthetic_splits

    data_cfg = OmegaConf.to_object(cfg.data)
    if data_cfg.source == "hub":
        from rlhf_exp.data.sources import local_path

        if local_path(data_cfg.path) is None:
            print(f"records   : not read in a dry run ({data_cfg.path} comes from the hub when the run starts)")
            return None, None
    sft, counts = cfg.phase.name == "sft", {}
    if data_cfg.source == "synthetic":  # generated in pure Python: no need to import datasets
        splits = synthetic_splits(data_cfg)
        train, eval_ = (splits["sft_train"], splits["sft_eval"]) if sft else (splits["pref_train"], splits["pref_eval"])
        generated_counts(counts, len(train), len(eval_))
        record = train[0] if sft else pair_rows(train[:1])[0]
        prompts = None if sft else {json.dumps(p.prompt, sort_keys=True) for p in train}
    else:
        train = (sft_data(data_cfg, counts) if sft else preference_data(data_cfg, counts)).train
        record = train[0]
        prompts = None if sft else {json.dumps(p, sort_keys=True) for p in train["prompt"]}
    counts = {split: c for split, c in counts.items() if c}
    first = json.dumps(record, ensure_ascii=False)
    print(f"records   : {'; '.join(f'{split} {_counts(c)}' for split, c in counts.items())}")
    print(f"first     : {first if len(first) <= 400 else first[:400] + ' ...'}")
    return (counts.get("train") or {}).get("kept"), None if prompts is None else len(prompts)


def _counts(c: dict) -> str:
    dropped = ", ".join(f"{n} {why}" for why, n in (c.get("dropped") or {}).items() if n)
    return f"{c.get('kept')} of {c.get('loaded')} read" + (f" (dropped: {dropped})" if dropped else "")
