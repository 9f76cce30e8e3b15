"""``pipeline=rlhf``: several phases in one command, each a normal run in a subfolder.

    <output_root>/pipelines/<time>_<name>/
        sft/ rm/ ppo/ dpo/        each with the run-folder contract (summary, metrics, manifest)
        pipeline_summary.json     the phases' key numbers (also printed as a table)

Every phase is composed and checked before the first one starts (a typo in ``pipeline.ppo.kl_coef``
fails at once, not after SFT and RM have trained). Each phase then runs as ``python -m rlhf_exp``
in a fresh process, with its parents pointed at the sibling folders.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rlhf_exp.config.errors import ConfigError
from rlhf_exp.tracking.lineage import PARENTS
from rlhf_exp.tracking.run import write_json_atomic

# what the table shows for each phase (summary.json metric -> column)
COLUMNS = {
    "sft": {"gold_score": "gold", "eval_perplexity": "eval ppl"},
    "rm": {"eval_accuracy": "accuracy", "gold_accuracy": "gold accuracy"},
    "ppo": {"gold_score": "gold", "kl": "KL", "reward": "RM score"},
    "dpo": {"gold_score": "gold", "eval_rewards_accuracies": "pref. accuracy"},
}


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _value(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def common_overrides(overrides: list[str]) -> list[str]:
    """The user's overrides that apply to every phase; phase settings must go through pipeline.<phase>."""
    common = []
    for o in overrides:
        key = _key(o)
        if key == "phase" or key.startswith("phase."):
            raise ConfigError(f"{o}: pipeline=... chooses the phases; set a phase's values as "
                              f"pipeline.<phase>.<key>=value (e.g. pipeline.ppo.kl_coef=0.1)")
        if key != "pipeline" and not key.startswith("pipeline."):
            common.append(o)
    return common


def phase_args(cfg: DictConfig, phase: str, common: list[str], folder: Path | None) -> list[str]:
    args = [f"phase={phase}", *common]
    args += [f"phase.{k}={_value(v)}" for k, v in cfg.pipeline[phase].items()]
    if folder is not None:
        for parent, key in PARENTS[phase]:
            args.append(f"phase.{key}={folder.parent / parent}")
        args.append(f"hydra.run.dir={folder}")
    return args


def check(cfg: DictConfig, overrides: list[str]) -> None:
    """Compose and validate every phase's command before anything trains."""
    from rlhf_exp.cli import compose
    from rlhf_exp.config.validate import validate

    unknown = [p for p in cfg.pipeline.phases if p not in PARENTS]
    if unknown:
        raise ConfigError(f"pipeline.phases: unknown phase(s) {unknown}; phases: {', '.join(PARENTS)}")
    common = common_overrides(overrides)
    for i, phase in enumerate(cfg.pipeline.phases):
        missing = [p for p, _ in PARENTS[phase] if p not in cfg.pipeline.phases[:i]]
        if missing:
            raise ConfigError(f"pipeline.phases: {phase} needs {', '.join(missing)} to run before it")
        try:
            validate(compose(phase_args(cfg, phase, common, None)))
        except ConfigError as exc:
            raise ConfigError(f"pipeline.{phase}: {exc}") from None


def run(cfg: DictConfig, overrides: list[str]) -> Path:
    check(cfg, overrides)
    common = common_overrides(overrides)
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    root = Path(cfg.output_root) / "pipelines" / f"{stamp}_{cfg.pipeline.name}"
    root.mkdir(parents=True)
    rows = []
    status = "succeeded"
    for phase in cfg.pipeline.phases:
        folder = (root / phase).resolve()
        print(f"rlhf_exp: pipeline {cfg.pipeline.name}: {phase} -> {folder}", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, "-m", "rlhf_exp", *phase_args(cfg, phase, common, folder)])
        summary_path = folder / "summary.json"
        if proc.returncode != 0 or not summary_path.is_file():
            rows.append({"phase": phase, "path": str(folder), "status": "failed"})
            status = "failed"
            break
        summary = json.loads(summary_path.read_text())
        rows.append({"phase": phase, "run_id": summary["run_id"], "path": str(folder), "status": "succeeded",
                     "metrics": {col: summary["metrics"].get(key) for key, col in COLUMNS[phase].items()}})
    write_json_atomic(root / "pipeline_summary.json", {
        "pipeline": cfg.pipeline.name, "status": status, "config": OmegaConf.to_container(cfg.pipeline),
        "overrides": overrides, "phases": rows})
    print(table(rows))
    print(f"rlhf_exp: pipeline folder {root} (pipeline_summary.json)")
    if status != "succeeded":
        print(f"rlhf_exp: error: pipeline stopped: phase {rows[-1]['phase']} failed (see its output above)",
              file=sys.stderr)
        sys.exit(1)
    return root


def table(rows: list[dict]) -> str:
    lines = [f"{'phase':<6} {'status':<10} key numbers", f"{'-' * 6} {'-' * 10} {'-' * 50}"]
    for row in rows:
        numbers = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in row.get("metrics", {}).items() if v is not None)
        lines.append(f"{row['phase']:<6} {row['status']:<10} {numbers}")
    return "\n".join(lines)
