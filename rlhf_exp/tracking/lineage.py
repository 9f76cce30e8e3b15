"""Find runs under ``output_root`` and resolve the parents a phase starts from.

A parent is given as a run folder or a run id (the folder's name). When it is not given, the latest
successful run of the parent phase with the same model settings and the same data settings (less those
that only shape preference data, which SFT never reads) is used, and the choice is printed. So a DPO
run with another annotator noise level reuses the SFT run of the same task, while one on 7-digit
prompts never picks an SFT run trained on 5.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rlhf_exp.config.errors import ConfigError

# phase -> [(parent phase, phase.<key> that names it)]
PARENTS: dict[str, list[tuple[str, str]]] = {
    "sft": [],
    "rm": [("sft", "sft_run")],
    "dpo": [("sft", "sft_run")],
    "ppo": [("sft", "sft_run"), ("rm", "reward_run")],
}
# data settings that only shape preference pairs: an SFT parent is the same whatever they are
PREFERENCE_ONLY = ("pref_train_split", "pref_eval_split", "synthetic.num_pref_train", "synthetic.num_pref_eval",
                   "synthetic.annotator_agreement", "synthetic.drop_ties")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def lineage_keys(cfg: DictConfig) -> dict[str, str]:
    """What a child run matches its default parents on (recorded in every manifest)."""
    data = OmegaConf.to_container(cfg.data, resolve=True, enum_to_str=True)
    for dotted in PREFERENCE_ONLY:
        node = data
        *path, last = dotted.split(".")
        for part in path:
            node = node.get(part) or {}
        node.pop(last, None)
    return {"model_key": _digest(OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True)),
            "data_key": _digest(data)}


def model_label(cfg: DictConfig) -> str:
    """The model as manifests name it: the preset, or for model=local (any folder or hub id) its path."""
    return str(cfg.model.path) if cfg.model.name == "local" else str(cfg.model.name)


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
    path = Path(ref).expanduser()
    manifest = read_manifest(path) if path.is_dir() else None
    if manifest is None:
        matches = [m for m in find_runs(output_root) if m.get("run_id") == ref]
        if not matches:
            where = "is a folder without manifest.json" if path.is_dir() else "is neither a run folder nor a run id"
            raise ConfigError(f"phase.{key}={ref} {where} under {output_root}/. Give a run of phase={phase} (its "
                              f"folder, holding manifest.json, or its run id), or leave phase.{key} out to use the latest.")
        if len(matches) > 1:
            raise ConfigError(f"phase.{key}={ref} names {len(matches)} runs: "
                              f"{', '.join(m['path'] for m in matches)}; give the folder instead")
        manifest = matches[0]
    if manifest.get("phase") != phase:
        raise ConfigError(f"phase.{key}={ref} is a run of phase={manifest.get('phase')}; phase.{key} needs a run of "
                          f"phase={phase}. Give a run of phase={phase}, or leave phase.{key} out to use the latest.")
    if manifest.get("status") != "succeeded":
        raise ConfigError(f"phase.{key}={ref} did not succeed (status: {manifest.get('status')}); pick another run")
    return manifest


def latest_run(output_root: str | Path, phase: str, keys: dict[str, str]) -> dict | None:
    runs = [m for m in find_runs(output_root)
            if m.get("phase") == phase and m.get("status") == "succeeded"
            and all(m.get(k) == v for k, v in keys.items())]
    return max(runs, key=lambda m: (m.get("end_time") or "", m["run_id"]), default=None)


def _model_data_overrides() -> list[str]:
    """The command line's model/data overrides (they set the lineage keys a parent must match)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        given = list(HydraConfig.get().overrides.task)
    except ValueError:  # the entrypoint's checks before Hydra runs: the command line itself
        given = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
    return [o for o in given if o.lstrip("+~").split("=", 1)[0].split(".", 1)[0] in ("model", "data")
            and not o.lstrip("+~").startswith(("model=", "data="))]


def _make_command(cfg: DictConfig, phase: str) -> str:
    args = ["python", "-m", "rlhf_exp", f"phase={phase}", f"model={cfg.model.name}", f"data={cfg.data.name}",
            *(shlex.quote(o) for o in _model_data_overrides())]
    if str(cfg.output_root) != "outputs":
        args.append(f"output_root={shlex.quote(str(cfg.output_root))}")
    return " ".join(args)


def _check_checkpoint(manifest: dict, key: str) -> None:
    checkpoint = manifest.get("checkpoint")
    if not checkpoint or not Path(checkpoint).is_dir():
        raise ConfigError(f"phase.{key}: run {manifest['path']} has no checkpoint at {checkpoint} (deleted or moved?); "
                          f"pick another run with phase.{key}=<run folder>")


def resolve_parents(cfg: DictConfig, announce: bool = True) -> list[dict]:
    parents = []
    for phase, key in PARENTS.get(cfg.phase.name, []):
        ref = cfg.phase.get(key)
        if ref:
            manifest = resolve_run(str(ref), cfg.output_root, phase, key)
        else:
            manifest = latest_run(cfg.output_root, phase, lineage_keys(cfg))
            if manifest is None:
                others = [m for m in find_runs(cfg.output_root) if m.get("phase") == phase
                          and m.get("status") == "succeeded" and m.get("model") == model_label(cfg)
                          and m.get("data") == cfg.data.name]
                note = (f" ({len(others)} {phase} run(s) of model={cfg.model.name} data={cfg.data.name} exist with "
                        f"other model or data settings; pass one with phase.{key}=<run folder>)") if others else ""
                given = _model_data_overrides()
                settings = f" with {' '.join(given)}" if given else " with their default settings"
                raise ConfigError(
                    f"phase={cfg.phase.name} starts from an {phase} run of model={cfg.model.name} "
                    f"data={cfg.data.name}{settings} (every model.* and data.* value must match), and there is "
                    f"none under {cfg.output_root}/{note}. Make one with:\n  {_make_command(cfg, phase)}"
                )
            if announce:
                print(f"rlhf_exp: phase.{key} not given: using {manifest['path']} "
                      f"(latest successful {phase} run of model={cfg.model.name} data={cfg.data.name})",
                      file=sys.stderr)
        _check_checkpoint(manifest, key)
        parents.append({"phase": phase, "run_id": manifest["run_id"], "path": manifest["path"],
                        "checkpoint": manifest["checkpoint"]})
    return parents


def describe_parents(cfg: DictConfig) -> str:
    if not PARENTS.get(cfg.phase.name):
        return "none"
    try:
        return ", ".join(f"{p['phase']}={p['path']}" for p in resolve_parents(cfg, announce=False))
    except ConfigError as exc:
        return f"unresolved ({exc})"
