"""Find runs under ``output_root`` and resolve the parents a phase starts from.

A parent is given as a run folder or a run id (the folder's name). When it is not given, the latest
successful run of the parent phase with the same model settings and the same data settings (less those
that only shape preference data, which SFT never reads) is used, and the choice is printed. So a DPO
run with another annotator noise level reuses the SFT run of the same task, while one on 7-digit
prompts never picks an SFT run trained on 5.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
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
                   "synthetic.annotator_agreement", "synthetic.drop_ties",
                   # extra simulated annotators add labels for agreement statistics; the pairs trained on are the same
                   "synthetic.num_annotators")


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


# manifest.json files already reported unreadable by this process (each is named once)
_WARNED: set[str] = set()


def load_manifest(run_dir: Path) -> tuple[dict | None, str | None]:
    """(manifest, None); (None, why it cannot be read); (None, None) when there is no manifest.json."""
    file = Path(run_dir) / "manifest.json"
    try:
        text = file.read_text()
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"cannot be read ({getattr(exc, 'strerror', None) or exc})"
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}: truncated?)"
    if not isinstance(manifest, dict):
        return None, "does not hold a JSON object"
    manifest["path"] = str(Path(run_dir).resolve())
    return manifest, None


def read_manifest(run_dir: Path) -> dict | None:
    """The run's manifest (with its folder as ``path``), or None when it is missing or unreadable."""
    return load_manifest(run_dir)[0]


def scan_runs(output_root: str | Path) -> tuple[list[dict], list[tuple[Path, str]]]:
    root = Path(output_root)
    if not root.is_dir():
        return [], []
    runs, unreadable = [], []
    for file in sorted(root.rglob("manifest.json")):
        manifest, problem = load_manifest(file.parent)
        if manifest is not None:
            runs.append(manifest)
        elif problem is not None:
            unreadable.append((file, problem))
    return runs, unreadable


def find_runs(output_root: str | Path) -> list[dict]:
    """Every readable run under ``output_root``; an unreadable manifest.json is skipped with one warning."""
    runs, unreadable = scan_runs(output_root)
    for file, problem in unreadable:
        if str(file) not in _WARNED:
            _WARNED.add(str(file))
            print(f"rlhf_exp: warning: skipping the run in {file.parent}: its manifest.json {problem}", file=sys.stderr)
    return runs


def end_timestamp(manifest: dict) -> float:
    """When the run ended, as seconds since the epoch: manifests store local times with their UTC offset
    (tracking.run.now_iso), so runs written under different time zones compare by the instant, not the
    string. A time without an offset is taken as this machine's local time; none at all sorts first."""
    try:
        return dt.datetime.fromisoformat(str(manifest.get("end_time"))).timestamp()
    except (TypeError, ValueError, OverflowError):
        return float("-inf")


def resolve_run(ref: str, output_root: str | Path, phase: str, key: str) -> dict:
    path = Path(ref).expanduser()
    runs: list[dict] = []
    if path.is_dir():
        manifest, problem = load_manifest(path)
    else:  # a run id: when no readable run has it, its folder's manifest may be the unreadable one
        runs, unreadable = scan_runs(output_root)
        manifest, problem = None, None
        if not any(m.get("run_id") == ref for m in runs):
            problem = next((f"{why} (in {file.parent})" for file, why in unreadable if file.parent.name == ref), None)
    if problem is not None:
        raise ConfigError(f"phase.{key}={ref} is unreadable: its manifest.json {problem}. Give another run of "
                          f"phase={phase}, or leave phase.{key} out to use the latest.")
    if manifest is None:
        matches = [m for m in runs if m.get("run_id") == ref]
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


def _matching(manifests: list[dict], phase: str, keys: dict[str, str], where=None) -> list[dict]:
    return [m for m in manifests if m.get("phase") == phase and m.get("status") == "succeeded"
            and all(m.get(k) == v for k, v in keys.items()) and (where is None or where(m))]


def _candidates(output_root: str | Path, phase: str, keys: dict[str, str], where=None) -> list[dict]:
    return _matching(find_runs(output_root), phase, keys, where)


def _latest(runs: list[dict]) -> dict | None:
    return max(runs, key=lambda m: (end_timestamp(m), m["run_id"]), default=None)


def latest_run(output_root: str | Path | None, phase: str, keys: dict[str, str], where=None,
               among: list[dict] | None = None) -> dict | None:
    """The successful run of ``phase`` under ``output_root`` (or ``among`` these manifests) with these lineage keys
    (and for which ``where(manifest)`` holds) that ended last, by the instant its end_time names (see
    end_timestamp)."""
    if among is not None:
        return _latest(_matching(among, phase, keys, where))
    return _latest(_candidates(output_root, phase, keys, where))


def sft_parent(rm: dict) -> dict | None:
    """The SFT parent a reward-model run's manifest records (run_id, path), or None."""
    return next((p for p in rm.get("parents") or [] if isinstance(p, dict) and p.get("phase") == "sft"), None)


def descends(rm: dict, sft: dict) -> bool:
    """Whether reward-model run ``rm`` was trained from SFT run ``sft``: its recorded SFT parent is that run
    (the same run id, or the same folder)."""
    parent = sft_parent(rm)
    if parent is None:
        return False
    if parent.get("run_id") and parent.get("run_id") == sft.get("run_id"):
        return True
    return bool(parent.get("path")) and Path(parent["path"]).resolve() == Path(sft["path"]).resolve()


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


def _safetensors_problem(file: Path) -> str | None:
    """Whether a .safetensors file is whole, from its header alone: 8 bytes giving the header's length, a
    JSON header, and data exactly as long as the header's offsets say (a cut-off copy is shorter)."""
    size = file.stat().st_size
    try:
        with file.open("rb") as fh:
            length = int.from_bytes(fh.read(8), "little")
            if size < 8 or length > size - 8:
                return "is truncated (its header is cut off)"
            header = json.loads(fh.read(length))
    except (OSError, ValueError) as exc:
        return f"cannot be read as safetensors ({exc})"
    if not isinstance(header, dict):
        return "cannot be read as safetensors (its header is not a JSON object)"
    ends = [t["data_offsets"][1] for name, t in header.items() if name != "__metadata__" and isinstance(t, dict)
            and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2]
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        return f"is truncated ({size} bytes, its header says {expected})"
    return None


def checkpoint_problem(folder: str | Path) -> str | None:
    """What is wrong with a saved model folder, found cheaply before loading it (names the file), or None:
    config.json must be readable JSON, and the weights (model.safetensors, its shards as
    model.safetensors.index.json lists them, or pytorch_model.bin) present, not empty, and safetensors whole."""
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        return f"{config} is missing"
    try:
        json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{config} is unreadable ({exc})"
    index = next((folder / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                  if (folder / n).is_file()), None)
    if index is not None:
        try:
            weights = sorted({folder / shard for shard in json.loads(index.read_text())["weight_map"].values()})
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return f"{index} is unreadable ({exc})"
    elif (folder / "pytorch_model.bin").is_file() and not (folder / "model.safetensors").exists():
        weights = [folder / "pytorch_model.bin"]
    else:
        weights = [folder / "model.safetensors"]
    for file in weights:
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size == 0:
            return f"{file} is empty"
        if file.suffix == ".safetensors":
            problem = _safetensors_problem(file)
            if problem:
                return f"{file} {problem}"
    return None


def _check_checkpoint(manifest: dict, key: str) -> None:
    checkpoint = manifest.get("checkpoint")
    if not checkpoint or not Path(checkpoint).is_dir():
        raise ConfigError(f"phase.{key}: run {manifest['path']} has no checkpoint at {checkpoint} (deleted or moved?); "
                          f"pick another run with phase.{key}=<run folder>")
    problem = checkpoint_problem(checkpoint)
    if problem:
        raise ConfigError(f"phase.{key}: run {manifest['path']} has a damaged checkpoint: {problem}; pick another run "
                          f"with phase.{key}=<run folder>, or train that {manifest.get('phase')} run again")


def reward_stats_problem(rm_run: str | Path) -> tuple[dict | None, str | None]:
    """(stats, None) when ``<rm run>/reward_stats.json`` holds a finite mean and a finite std > 0, else
    (None, what is wrong with it)."""
    file = Path(rm_run) / "reward_stats.json"
    if not file.is_file():
        return None, f"{file} is missing"
    try:
        stats = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{file} is unreadable ({exc}: truncated?)"
    if not isinstance(stats, dict):
        return None, f"{file} does not hold a JSON object"
    for name in ("mean", "std"):
        value = stats.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None, f"{file} has {name}={json.dumps(value)} (a finite number is needed)"
    if stats["std"] <= 0:
        return None, f"{file} has std={stats['std']} (PPO divides rewards by it: it must be > 0)"
    return stats, None


def _check_reward_stats(rm: dict) -> None:
    _, problem = reward_stats_problem(rm["path"])
    if problem:
        raise ConfigError(f"phase.reward_run: {problem}; PPO normalises rewards with it (phase.normalize_reward=true). "
                          f"Re-create it with: python -m rlhf_exp.reward_stats {shlex.quote(rm['path'])} "
                          "(or run without it: phase.normalize_reward=false)")


def _label(cfg: DictConfig) -> str:
    return f"model={cfg.model.name} data={cfg.data.name}"


def _none_found(cfg: DictConfig, phase: str, key: str, extra: str = "") -> ConfigError:
    others = [m for m in find_runs(cfg.output_root) if m.get("phase") == phase
              and m.get("status") == "succeeded" and m.get("model") == model_label(cfg)
              and m.get("data") == cfg.data.name]
    note = (f" ({len(others)} {phase} run(s) of {_label(cfg)} exist with "
            f"other model or data settings; pass one with phase.{key}=<run folder>)") if others else ""
    given = _model_data_overrides()
    settings = f" with {' '.join(given)}" if given else " with their default settings"
    return ConfigError(
        f"phase={cfg.phase.name} starts from an {phase} run of {_label(cfg)}{settings} (every model.* and data.* "
        f"value must match), and there is none under {cfg.output_root}/{note}. Make one with:\n  "
        f"{_make_command(cfg, phase)}{extra}"
    )


def _default_parent(cfg: DictConfig, phase: str, key: str, announce: bool) -> dict:
    manifest = latest_run(cfg.output_root, phase, lineage_keys(cfg))
    if manifest is None:
        raise _none_found(cfg, phase, key)
    if announce:
        print(f"rlhf_exp: phase.{key} not given: using {manifest['path']} "
              f"(latest successful {phase} run of {_label(cfg)})", file=sys.stderr)
    return manifest


def _recorded(parent: dict, output_root: str | Path) -> dict:
    """The run a manifest's parents entry names: its folder when that still holds it, else its run id."""
    path = parent.get("path")
    if path and read_manifest(Path(path)) is not None:
        return resolve_run(path, output_root, "sft", "sft_run")
    return resolve_run(str(parent.get("run_id")), output_root, "sft", "sft_run")


def _ppo_parents(cfg: DictConfig, announce: bool) -> tuple[dict, dict]:
    """PPO's SFT and reward-model runs, such that the reward model was trained from that SFT run (its
    manifest's SFT parent), unless phase.allow_foreign_reward_model=true:

    - both named: checked, refused when the reward model descends from another SFT run;
    - only the reward model named: the SFT run it was trained from;
    - only the SFT run named: the latest reward model trained from it;
    - neither: the latest SFT run (of the same model and data settings) that has a reward model trained
      from it, and the latest of those reward models.
    """
    root, allow = cfg.output_root, bool(cfg.phase.get("allow_foreign_reward_model", False))
    sft_ref, rm_ref = cfg.phase.get("sft_run"), cfg.phase.get("reward_run")
    sft = resolve_run(str(sft_ref), root, "sft", "sft_run") if sft_ref else None
    rm = resolve_run(str(rm_ref), root, "rm", "reward_run") if rm_ref else None
    if sft is not None and rm is not None:
        if not allow and not descends(rm, sft):
            parent = sft_parent(rm)
            actual = (f"the SFT run {parent.get('run_id')} ({parent.get('path')})" if parent
                      else "no SFT run (its manifest records none)")
            raise ConfigError(
                f"phase.reward_run={rm_ref} was trained from {actual}, not from phase.sft_run={sft_ref} "
                f"({sft['path']}): PPO's reward model must descend from its SFT run. Name a matching pair, "
                "or set phase.allow_foreign_reward_model=true to use them anyway")
        return sft, rm
    if rm is not None:  # the SFT run the reward model was trained from
        parent = sft_parent(rm)
        if parent is None:
            if not allow:
                raise ConfigError(f"phase.sft_run not given, and phase.reward_run={rm_ref} records no SFT parent: name "
                                  "the SFT run with phase.sft_run=<run folder> and set "
                                  "phase.allow_foreign_reward_model=true")
            return _default_parent(cfg, "sft", "sft_run", announce), rm
        try:
            sft = _recorded(parent, root)
        except ConfigError as exc:
            raise ConfigError(f"phase.sft_run not given: phase.reward_run={rm_ref} was trained from the SFT run "
                              f"{parent.get('run_id')} ({parent.get('path')}), which cannot be used: {exc}") from None
        if announce:
            print(f"rlhf_exp: phase.sft_run not given: using {sft['path']} (the SFT run the reward model "
                  f"{rm['run_id']} was trained from)", file=sys.stderr)
        return sft, rm
    keys = lineage_keys(cfg)
    if sft is not None:  # the latest reward model trained from the SFT run
        rm = latest_run(root, "rm", keys, where=lambda m: descends(m, sft))
        if rm is None and allow:
            return sft, _default_parent(cfg, "rm", "reward_run", announce)
        if rm is None:
            raise ConfigError(
                f"phase.reward_run not given, and no successful rm run of {_label(cfg)} under {root}/ was trained "
                f"from phase.sft_run={sft_ref} ({sft['path']}). Make one with:\n  {_make_command(cfg, 'rm')} "
                f"phase.sft_run={shlex.quote(sft['path'])}")
        if announce:
            print(f"rlhf_exp: phase.reward_run not given: using {rm['path']} (latest successful rm run trained "
                  f"from {sft['run_id']})", file=sys.stderr)
        return sft, rm
    sfts = _candidates(root, "sft", keys)
    rms = _candidates(root, "rm", keys)
    pairs = [(s, r) for s in sfts for r in rms if descends(r, s)]
    if not pairs:
        if allow:
            return _default_parent(cfg, "sft", "sft_run", announce), _default_parent(cfg, "rm", "reward_run", announce)
        if not sfts:
            raise _none_found(cfg, "sft", "sft_run")
        if not rms:
            raise _none_found(cfg, "rm", "reward_run")
        raise ConfigError(
            f"phase=ppo needs an rm run trained from an sft run of {_label(cfg)} with the same settings: none of the "
            f"{len(rms)} rm run(s) under {root}/ was trained from one of its {len(sfts)} sft run(s). Name a pair "
            "with phase.sft_run=... phase.reward_run=..., or make a reward model with:\n  "
            f"{_make_command(cfg, 'rm')} phase.sft_run={shlex.quote(_latest(sfts)['path'])}")
    sft = _latest([s for s, _ in pairs])
    rm = _latest([r for s, r in pairs if s is sft])
    if announce:
        print(f"rlhf_exp: phase.sft_run not given: using {sft['path']} (latest successful sft run of {_label(cfg)} "
              "with a reward model trained from it)", file=sys.stderr)
        print(f"rlhf_exp: phase.reward_run not given: using {rm['path']} (latest successful rm run trained from it)",
              file=sys.stderr)
    return sft, rm


def resolve_parents(cfg: DictConfig, announce: bool = True) -> list[dict]:
    """The parent runs of cfg's phase, checked: each succeeded and has a loadable-looking checkpoint
    (checkpoint_problem); PPO's reward model descends from its SFT run (_ppo_parents) and, with
    phase.normalize_reward, has a valid reward_stats.json. Raised as one-line ConfigErrors."""
    name = cfg.phase.name
    if name == "ppo":
        found = dict(zip(("sft", "rm"), _ppo_parents(cfg, announce)))
    else:
        found = {phase: resolve_run(str(cfg.phase.get(key)), cfg.output_root, phase, key) if cfg.phase.get(key)
                 else _default_parent(cfg, phase, key, announce) for phase, key in PARENTS.get(name, [])}
    parents = []
    for phase, key in PARENTS.get(name, []):
        manifest = found[phase]
        _check_checkpoint(manifest, key)
        parents.append({"phase": phase, "run_id": manifest["run_id"], "path": manifest["path"],
                        "checkpoint": manifest["checkpoint"]})
    if name == "ppo" and cfg.phase.get("normalize_reward", True):
        _check_reward_stats(found["rm"])
    return parents


def describe_parents(cfg: DictConfig) -> str:
    if not PARENTS.get(cfg.phase.name):
        return "none"
    try:
        return ", ".join(f"{p['phase']}={p['path']}" for p in resolve_parents(cfg, announce=False))
    except ConfigError as exc:
        return f"unresolved ({exc})"
