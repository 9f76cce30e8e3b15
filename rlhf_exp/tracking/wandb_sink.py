"""Mirror a run's metrics and resolved config to Weights & Biases, never at the cost of training.

With ``logger.mode=auto`` the run is online when an API key is available (WANDB_API_KEY or a
``wandb login`` netrc entry) and offline otherwise, said once. Any W&B error is reported once and
W&B logging stops; the run folder's own files are unaffected.

How runs line up in W&B (:func:`identity`, docs/wandb.md): ``group`` is ``logger.group``, else the sweep's
name (``sweep=<name>``), else the sweep folder's name for a multirun job, else the pipeline folder's name for a
pipeline's phase; ``job_type`` is the phase; the display name is the job's overrides (``ppo kl_coef=0.05
seed=2``; the swept ones only, in a sweep), else the run id; tags are ``logger.tags`` plus the phase and the
model. The W&B run id is always the run id (a resumed run continues its W&B run). With ``logger.log_artifacts``
the final checkpoint is logged as an artifact ``<phase>-<run id>`` whose metadata holds its lineage
(:meth:`WandbSink.log_checkpoint`).
"""

from __future__ import annotations

import netrc
import os
import sys
from pathlib import Path
from typing import Any

_warned_offline = False

# set by the CLI for the jobs of ``sweep=<name>`` (rlhf_exp/cli.py): the W&B group of its jobs
SWEEP_ENV = "RLHF_EXP_SWEEP"
# the artifact type of each phase's checkpoint (others: "model")
ARTIFACT_TYPES = {"rm": "reward_model"}
# overrides that say where or how a run is written, not what it trains: left out of the W&B run name
_NOT_IN_NAME = ("logger", "output_root", "resume", "dry_run", "launcher", "tag")
NAME_MAX = 128  # W&B shows longer display names cut anyway


def secret_on_command_line() -> bool:
    import sys

    from rlhf_exp.tracking.secrets import scrub

    line = " ".join(sys.argv)
    return scrub(line) != line


def has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _say(message: str) -> None:
    print(f"rlhf_exp: W&B: {message}", file=sys.stderr)


# ------------------------------------------------------------------------- run identity


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def job_overrides(run_dir: Path) -> tuple[list[str], bool]:
    """The job's own overrides (Hydra's ``.hydra/overrides.yaml`` in the run folder, which every process of the
    run sees, torchrun's workers and SLURM's tasks included) and whether it is a multirun (sweep) job."""
    run_dir = Path(run_dir)
    overrides = _read_yaml(run_dir / ".hydra" / "overrides.yaml")
    hydra_cfg = (_read_yaml(run_dir / ".hydra" / "hydra.yaml") or {}).get("hydra") or {}
    multirun = str(hydra_cfg.get("mode", "")).endswith("MULTIRUN")
    return [str(o) for o in overrides] if isinstance(overrides, list) else [], multirun


def swept_keys(sweep_dir: Path) -> list[str]:
    """The keys a sweep varies, from the ``multirun.yaml`` Hydra writes in the sweep folder ([] when unknown)."""
    from rlhf_exp.sweep import _swept_keys

    config = _read_yaml(Path(sweep_dir) / "multirun.yaml")
    try:
        return _swept_keys(config) if isinstance(config, dict) else []
    except Exception:  # a hand-edited or foreign file: the name keeps every override
        return []


def derive_group(group: str | None, run_dir: Path, multirun: bool) -> str | None:
    """``logger.group``; else a sweep job's sweep name (``sweep=<name>``) or sweep folder name; else a pipeline
    phase's pipeline folder name; else None (a single run has no group)."""
    if group:
        return str(group)
    run_dir = Path(run_dir)
    if multirun:
        return os.environ.get(SWEEP_ENV) or run_dir.parent.name
    if (run_dir.parent / "pipeline.json").is_file():
        return run_dir.parent.name
    return None


def derive_name(overrides: list[str], run_id: str, phase: str, swept: list[str] | None = None) -> str:
    """A readable W&B display name from the job's overrides: the phase, then ``key=value`` of each override that
    says what is trained (``phase.`` left off the key; the parent run pins, hydra.*, logger.*, output_root,
    launcher, resume and dry_run left out); in a sweep, its swept keys only. The run id when nothing is left."""
    from rlhf_exp.tracking.lineage import PARENTS

    parent_keys = {f"phase.{key}" for pairs in PARENTS.values() for _, key in pairs}
    parts = []
    for text in overrides:
        key, sep, value = text.partition("=")
        key = key.lstrip("+~")
        if not sep or key == "phase" or key in parent_keys or key.startswith("hydra."):
            continue
        if key.split(".")[0] in _NOT_IN_NAME:
            continue
        if swept and key not in swept:
            continue
        parts.append(f"{key.removeprefix('phase.')}={value}")
    if not parts:
        return run_id
    name = " ".join([phase, *parts])
    return name if len(name) <= NAME_MAX else name[:NAME_MAX - 1] + "…"


def derive_tags(tags: list[str], phase: str, model: str) -> list[str]:
    """``logger.tags``, then the phase and the model (a folder's or hub id's last part), each once; W&B takes
    tags of at most 64 characters."""
    model = Path(str(model).rstrip("/")).name or str(model)
    out: list[str] = []
    for tag in [*map(str, tags), phase, model]:
        tag = tag[:64]
        if tag and tag not in out:
            out.append(tag)
    return out


def identity(logger_cfg, run_dir: Path, run_id: str, phase: str, model: str) -> dict[str, Any]:
    """The W&B group, job type, display name and tags of a run (module docstring)."""
    overrides, multirun = job_overrides(run_dir)
    swept = swept_keys(Path(run_dir).parent) if multirun else []
    return {"group": derive_group(logger_cfg.get("group"), run_dir, multirun), "job_type": phase,
            "name": derive_name(overrides, run_id, phase, swept), "tags": derive_tags(list(logger_cfg.tags), phase, model)}


def artifact_name(phase: str, run_id: str) -> str:
    """A run's checkpoint artifact: ``<phase>-<run id>`` (W&B names allow letters, digits, ``-``, ``_``, ``.``)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{phase}-{run_id}")


def sync_command(run_dir: Path, multirun: bool | None = None) -> str:
    """The command that uploads this run's offline W&B data, or with a sweep's or pipeline's folder, all its runs'."""
    run_dir = Path(run_dir)
    if multirun is None:
        multirun = job_overrides(run_dir)[1]
    if multirun or (run_dir.parent / "pipeline.json").is_file():
        return f"wandb sync {run_dir.parent}/*/wandb/offline-run-*"
    return f"wandb sync {run_dir}/wandb/offline-run-*"


# ------------------------------------------------------------------------------- the sink


class WandbSink:
    def __init__(self, logger_cfg, run_id: str, run_dir: Path, config: dict[str, Any], resume: bool = False,
                 ident: dict[str, Any] | None = None):
        global _warned_offline
        self.run = None
        ident = ident or {"group": logger_cfg.get("group"), "job_type": None, "name": run_id,
                          "tags": list(logger_cfg.tags)}
        mode = logger_cfg.mode
        if mode == "auto":
            mode = "online" if has_api_key() else "offline"
            if mode == "offline" and not _warned_offline:
                _warned_offline = True
                _say(f"no API key found, logging offline to {run_dir / 'wandb'}; upload later with "
                     f"`{sync_command(run_dir)}`")
        self.offline = str(mode) in ("offline", "disabled")
        try:
            import wandb

            self.run = wandb.init(
                project=logger_cfg.project,
                entity=logger_cfg.entity,
                group=ident["group"],
                job_type=ident["job_type"],
                tags=list(ident["tags"]),
                name=ident["name"],
                # the W&B run's id is the run id: a resumed run continues the same W&B run (steps it
                # logs again after its checkpoint, W&B already has, with the same values)
                id=run_id,
                resume="allow" if resume else None,
                dir=str(run_dir),
                config=config,
                mode=mode,
                # W&B's run metadata records the command line: left out when a secret is on it
                settings=wandb.Settings(silent=True, console="off", x_disable_meta=secret_on_command_line()),
            )
        except Exception as exc:  # W&B must never stop training
            self._disable(exc)

    def _disable(self, exc: BaseException) -> None:
        if self.run is not False:
            _say(f"disabled after an error ({type(exc).__name__}: {exc}); training continues, "
                 "metrics stay in metrics.jsonl")
        self.run = False

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.run:
            return
        try:
            self.run.log(metrics, step=step)
        except Exception as exc:
            self._disable(exc)

    def summary(self, metrics: dict[str, Any]) -> None:
        if not self.run:
            return
        try:
            for key, value in metrics.items():
                self.run.summary[key] = value
        except Exception as exc:
            self._disable(exc)

    def log_checkpoint(self, checkpoint: str | Path, phase: str, run_id: str, metadata: dict[str, Any],
                       parents: list[dict[str, Any]], mode: str = "reference") -> None:
        """The final checkpoint as the artifact ``<phase>-<run id>`` (type ``reward_model`` for the RM, else
        ``model``): a ``file://`` reference to the folder (``mode=reference``: nothing copied or uploaded, W&B
        records each file's path, size and checksum) or its files (``upload``). ``metadata`` (the lineage: config
        hash, parents' run ids and artifacts, final metrics) goes with it. Online, each parent's artifact
        ``<phase>-<parent run id>:latest`` is declared used (the lineage graph); W&B refuses ``use_artifact``
        offline, so there the parents are in the metadata only. Any error is one warning line; the run goes on."""
        if not self.run:
            return
        try:
            import wandb

            path = Path(checkpoint).resolve()
            if not path.exists():
                raise FileNotFoundError(f"no checkpoint at {path}")
            artifact = wandb.Artifact(artifact_name(phase, run_id), type=ARTIFACT_TYPES.get(phase, "model"),
                                      metadata=metadata)
            if mode == "upload":
                if path.is_dir():
                    artifact.add_dir(str(path), name="checkpoint", policy="immutable")
                else:
                    artifact.add_file(str(path), name=f"checkpoint/{path.name}", policy="immutable")
            else:
                artifact.add_reference(path.as_uri(), name="checkpoint")
            if not self.offline:
                for parent in parents:
                    used = f"{artifact_name(parent['phase'], parent['run_id'])}:latest"
                    try:
                        self.run.use_artifact(used, type=ARTIFACT_TYPES.get(parent["phase"], "model"))
                    except Exception as exc:  # the parent ran without log_artifacts: its run id is in the metadata
                        _say(f"parent artifact {used} not used ({type(exc).__name__}: {exc}); its run id is in "
                             f"{artifact.name}'s metadata")
            self.run.log_artifact(artifact)
        except Exception as exc:
            _say(f"checkpoint artifact not logged ({type(exc).__name__}: {exc}); the checkpoint is in the run folder")

    def alert(self, title: str, text: str) -> None:
        """A W&B alert (the health monitor's alarms: rlhf_exp.monitor). An alert W&B refuses (offline runs have
        no alerts) is said once; logging carries on."""
        if not self.run or getattr(self, "_alerts_off", False):
            return
        try:
            import wandb

            self.run.alert(title=title[:64], text=text, level=wandb.AlertLevel.WARN)
        except Exception as exc:
            self._alerts_off = True
            _say(f"alerts off after an error ({type(exc).__name__}: {exc}); the alarm is in summary.json")

    def close(self, failed: bool) -> None:
        if not self.run:
            return
        try:
            self.run.finish(exit_code=1 if failed else 0)
        except Exception as exc:
            self._disable(exc)
