"""``python -m rlhf_exp.reward_stats <rm run folder or run id> [--root outputs]``: re-create a reward-model
run's ``reward_stats.json`` (mean/std of its scores on the held-out answers, for PPO's reward normalisation).

It loads the run's saved reward model (``checkpoints/reward_model``) with the run's own config.yaml, scores
the chosen and rejected answers of the eval split as the RM runner does after training
(rlhf_exp.runners.rm.held_out_reward_stats), and writes the file atomically (whole or not at all).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROG = "python -m rlhf_exp.reward_stats"


def run_config(run_dir: Path):
    """The typed RunConfig a run used, from its config.yaml (fully resolved when it was written)."""
    from omegaconf import OmegaConf

    from rlhf_exp.config.schema import PHASE_SCHEMAS, RunConfig

    raw = OmegaConf.load(run_dir / "config.yaml")
    base = OmegaConf.structured(RunConfig)
    base.phase = OmegaConf.structured(PHASE_SCHEMAS[raw.phase.name])
    return OmegaConf.to_object(OmegaConf.merge(base, raw))


def recreate(run_dir: Path, checkpoint: Path) -> tuple[Path, dict]:
    """Score the held-out answers with the run's reward model; write and return ``reward_stats.json``."""
    import torch

    from rlhf_exp.config.errors import ConfigError
    from rlhf_exp.models import load_reward_model, load_tokenizer
    from rlhf_exp.runners.common import phase_data, quiet_libraries
    from rlhf_exp.runners.rm import held_out_reward_stats, write_reward_stats

    cfg = run_config(run_dir)
    quiet_libraries()
    tokenizer = load_tokenizer(cfg.model, checkpoint=str(checkpoint))
    data = phase_data(cfg, tokenizer, preferences=True)
    if data.eval is None:
        raise ConfigError(f"{run_dir} has no held-out preference pairs (its data config gives no eval split): "
                          "nothing to measure; run PPO with phase.normalize_reward=false")
    model = load_reward_model(cfg.model, cfg.hardware, tokenizer, str(checkpoint), trained=True)
    if str(cfg.hardware.accelerator) != "cpu" and torch.cuda.is_available():
        model.to("cuda")
    with torch.no_grad():
        stats, _, _ = held_out_reward_stats(model, tokenizer, data.eval, cfg.phase.per_device_eval_batch_size)
    return write_reward_stats(run_dir, stats), stats


def main(argv: list[str] | None = None) -> int:
    from rlhf_exp.config.errors import ConfigError
    from rlhf_exp.lineage import find
    from rlhf_exp.tracking.lineage import checkpoint_problem

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("run", help="reward-model run folder or run id")
    parser.add_argument("--root", default="outputs", help="where to look up run ids (default: outputs)")
    args = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"rlhf_exp.reward_stats: error: {message}", file=sys.stderr)
        return 2

    manifest, problem = find(args.run, args.root)
    if manifest is None:
        return fail(problem)
    run_dir = Path(manifest["path"])
    if manifest.get("phase") != "rm":
        return fail(f"{run_dir} is a run of phase={manifest.get('phase')}; give a reward-model run (phase=rm)")
    if manifest.get("status") != "succeeded":
        return fail(f"{run_dir} did not succeed (status: {manifest.get('status')}): it saved no reward model")
    checkpoint = Path(manifest.get("checkpoint") or run_dir / "checkpoints" / "reward_model")
    if not checkpoint.is_dir():
        return fail(f"{run_dir} has no reward model at {checkpoint} (deleted or moved?)")
    problem = checkpoint_problem(checkpoint)
    if problem:
        return fail(f"{run_dir} has a damaged reward model: {problem}")
    if not (run_dir / "config.yaml").is_file():
        return fail(f"{run_dir / 'config.yaml'} is missing: the held-out data cannot be rebuilt without it")
    try:
        path, stats = recreate(run_dir, checkpoint)
    except ConfigError as exc:
        return fail(str(exc))
    print(f"rlhf_exp.reward_stats: wrote {path}: mean {stats['mean']:.6g}, std {stats['std']:.6g} over "
          f"{stats['n']} held-out answers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
