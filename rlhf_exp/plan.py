"""``dry_run=true``: print what a run would do, load nothing."""

from __future__ import annotations

from omegaconf import DictConfig


def print_plan(cfg: DictConfig) -> None:
    from rlhf_exp.tracking.lineage import describe_parents

    hw = cfg.hardware
    print(f"phase     : {cfg.phase.name} (lr={cfg.phase.learning_rate}, epochs={cfg.phase.num_epochs}, "
          f"batch={cfg.phase.per_device_train_batch_size}x{cfg.phase.gradient_accumulation_steps})")
    print(f"model     : {cfg.model.name} ({cfg.model.source}{': ' + cfg.model.path if cfg.model.path else ''})")
    print(f"data      : {cfg.data.name} ({cfg.data.source}{': ' + cfg.data.path if cfg.data.path else ''})")
    print(f"hardware  : {hw.name} ({hw.num_nodes} node(s) x {hw.num_processes} process(es), "
          f"{hw.precision}, distributed={hw.distributed}, "
          f"lora={hw.lora})")
    print(f"parents   : {describe_parents(cfg)}")
    print(f"logger    : {cfg.logger.name}")
    launcher = cfg.launcher
    where = "" if launcher.name == "local" else (
        f" ({hw.num_nodes} node(s), {hw.num_processes} task(s) and {hw.gpus_per_node} GPU(s) per node, "
        f"partition={launcher.partition}, {launcher.time_min} min)")
    print(f"launcher  : {launcher.name}{where}")
    if hw.accelerator == "cuda" and launcher.name != "slurm" and not nvidia_gpu_visible():
        print(f"warning   : hardware={hw.name} needs CUDA GPUs and this machine shows none (no NVIDIA driver): a real "
              "run here stops at once; use hardware=cpu, or launcher=slurm to run it on GPU nodes")
    print("dry run: nothing loaded, nothing trained.")


def nvidia_gpu_visible() -> bool:
    """A cheap look for an NVIDIA driver (dry runs import no torch): its /proc entry or nvidia-smi."""
    import os
    import shutil

    return os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi") is not None
