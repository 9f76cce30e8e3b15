"""Find runs under ``output_root`` and resolve the parents a phase starts from.

A parent is given as a run folder or a run id (the folder's name). When it is not given, the latest
successful run of the parent phase with the same ``model.name`` and ``data.name`` is used, and the
choice is printed. Matching on names (not on full config hashes) lets a DPO run with, say, another
annotator noise level reuse the SFT run of the same task.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from omegaconf import DictConfig

from rlhf_exp.config.errors import ConfigError

# phase -> (parent phase, config key that names it)
PARENTS: dict[str, list[tuple[str, str]]] = {
    "sft": [],
    "rm": [("sft", "sft_run")],
    "dpo": [("sft", "sft_run")],
    "ppo": [("sft", "sft_run"), ("rm", "reward_run")],
}


def read_manifest(run_dir: Path) -> dict | None:
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    manifest["path"] = str(run_dir.resolve())
    return manifest


def find_runs(output_root: str | Path) -> list[dict]:
    root = Path(output_root)
    if not root.is_dir():
        return []
    runs = (read_manifest(p.parent) for p in root.rglob("manifest.json"))
    return [m for m in runs if m is not None]


def resolve_run(ref: str, output_root: str | Path, phase: str, key: str) -> dict:
    path = Path(ref)
    manifest = read_manifest(path) if path.is_dir() else None
    if manifest is None:
        matches = [m for m in find_runs(output_root) if m.get("run_id") == ref]
        if not matches:
            where = "is a folder without manifest.json" if path.is_dir() else "is neither a run folder nor a run id"
            raise ConfigError(f"phase.{key}={ref} {where} under {output_root}/")
        manifest = matches[0]
    if manifest.get("phase") != phase:
        raise ConfigError(f"phase.{key}={ref} is a run of phase={manifest.get('phase')}; phase.{key} needs a run of "
                          f"phase={phase}")
    if manifest.get("status") != "succeeded":
        raise ConfigError(f"phase.{key}={ref} did not succeed (status: {manifest.get('status')}); pick another run")
    return manifest


def latest_run(output_root: str | Path, phase: str, model: str, data: str) -> dict | None:
    runs = [
        m for m in find_runs(output_root)
        if m.get("phase") == phase and m.get("status") == "succeeded"
        and m.get("model") == model and m.get("data") == data
    ]
    return max(runs, key=lambda m: (m.get("end_time") or "", m["run_id"]), default=None)


def _make_command(cfg: DictConfig, phase: str) -> str:
    args = ["python", "-m", "rlhf_exp", f"phase={phase}", f"model={cfg.model.name}", f"data={cfg.data.name}"]
    if str(cfg.output_root) != "outputs":
        args.append(f"output_root={shlex.quote(str(cfg.output_root))}")
    return " ".join(args)


def resolve_parents(cfg: DictConfig, announce: bool = True) -> list[dict]:
    parents = []
    for phase, key in PARENTS.get(cfg.phase.name, []):
        ref = cfg.phase.get(key)
        if ref:
            manifest = resolve_run(str(ref), cfg.output_root, phase, key)
        else:
            manifest = latest_run(cfg.output_root, phase, cfg.model.name, cfg.data.name)
            if manifest is None:
                raise ConfigError(
                    f"phase={cfg.phase.name} starts from an {phase} run of model={cfg.model.name} "
                    f"data={cfg.data.name}, and there is none under {cfg.output_root}/. Make one with:\n"
                    f"  {_make_command(cfg, phase)}"
                )
            if announce:
                print(f"rlhf_exp: phase.{key} not given: using {manifest['path']} "
                      f"(latest successful {phase} run of model={cfg.model.name} data={cfg.data.name})",
                      file=sys.stderr)
        parents.append({
            "phase": phase,
            "run_id": manifest["run_id"],
            "path": manifest["path"],
            "checkpoint": manifest.get("checkpoint"),
        })
    return parents


def describe_parents(cfg: DictConfig) -> str:
    if not PARENTS.get(cfg.phase.name):
        return "none"
    try:
        return ", ".join(f"{p['phase']}={p['path']}" for p in resolve_parents(cfg, announce=False))
    except ConfigError as exc:
        return f"unresolved ({exc})"
