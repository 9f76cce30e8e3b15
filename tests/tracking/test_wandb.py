"""W&B mirroring: offline without a key (said once), and never fatal."""

from __future__ import annotations

import os
import sys
import types

import pytest
from omegaconf import OmegaConf

from rlhf_exp.tracking import wandb_sink
from rlhf_exp.tracking.wandb_sink import WandbSink


def logger_cfg(**kw):
    return OmegaConf.create({"project": "p", "entity": None, "group": None, "tags": [], "mode": "auto", **kw})


class FakeRun:
    def __init__(self):
        self.logged, self.summary, self.finished = [], {}, None

    def log(self, metrics, step):
        self.logged.append((step, metrics))

    def finish(self, exit_code):
        self.finished = exit_code


def fake_wandb(monkeypatch, init):
    module = types.SimpleNamespace(init=init, Settings=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "wandb", module)


def test_offline_without_api_key_said_once(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setattr(wandb_sink, "has_api_key", lambda: False)
    monkeypatch.setattr(wandb_sink, "_warned_offline", False)
    modes = []
    fake_wandb(monkeypatch, lambda **kw: modes.append(kw["mode"]) or FakeRun())
    sink = WandbSink(logger_cfg(), "run1", tmp_path, {"a": 1})
    WandbSink(logger_cfg(), "run2", tmp_path, {"a": 1})
    assert modes == ["offline", "offline"]
    assert capsys.readouterr().err.count("no API key found, logging offline") == 1
    sink.log({"train/loss": 1.0}, step=3)
    sink.close(failed=False)
    assert sink.run.logged == [(3, {"train/loss": 1.0})] and sink.run.finished == 0


def test_online_with_api_key(monkeypatch, tmp_path):
    monkeypatch.setattr(wandb_sink, "has_api_key", lambda: True)
    modes = []
    fake_wandb(monkeypatch, lambda **kw: modes.append(kw["mode"]) or FakeRun())
    WandbSink(logger_cfg(), "run", tmp_path, {})
    assert modes == ["online"]


def test_wandb_errors_never_stop_training(monkeypatch, tmp_path, capsys):
    def broken_init(**kw):
        raise ConnectionError("api.wandb.ai unreachable")

    fake_wandb(monkeypatch, broken_init)
    sink = WandbSink(logger_cfg(mode="online"), "run", tmp_path, {})
    sink.log({"x": 1.0}, step=1)
    sink.summary({"x": 1.0})
    sink.close(failed=False)
    err = capsys.readouterr().err
    assert err.count("disabled after an error") == 1 and "ConnectionError" in err


def test_error_while_logging_disables_wandb_once(monkeypatch, tmp_path, capsys):
    run = FakeRun()
    run.log = lambda *a, **k: (_ for _ in ()).throw(OSError("disk full"))
    fake_wandb(monkeypatch, lambda **kw: run)
    sink = WandbSink(logger_cfg(mode="online"), "run", tmp_path, {})
    sink.log({"x": 1.0}, step=1)
    sink.log({"x": 2.0}, step=2)
    assert capsys.readouterr().err.count("disabled after an error") == 1


def test_a_resumed_run_continues_its_wandb_run(monkeypatch, tmp_path, compose):
    """The W&B run's id is the run id; resuming re-attaches to it (resume="allow") and mirrors again."""
    import json

    from rlhf_exp.tracking.run import Run

    monkeypatch.setattr(wandb_sink, "has_api_key", lambda: True)
    inits = []
    fake_wandb(monkeypatch, lambda **kw: inits.append(kw) or FakeRun())
    cfg = compose(["logger=wandb"])
    with Run(tmp_path / "run", cfg) as run:
        run.log({"train/loss": 2.0}, step=1)
    assert inits[0]["id"] == "run" and inits[0]["resume"] is None
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "failed"  # no summary: resumable
    with Run(tmp_path / "run", cfg, resume=True) as run:
        run.log({"train/loss": 1.0}, step=2)
        sink_run = run._sinks[0].run
    assert inits[1]["id"] == "run" and inits[1]["resume"] == "allow"
    assert sink_run.logged == [(2, {"train/loss": 1.0})]


# ----------------------------------------------------------------------------- names and groups

from rlhf_exp.tracking.wandb_sink import derive_group, derive_name, derive_tags, identity, sync_command  # noqa: E402


def test_run_name_from_the_overrides():
    overrides = ["phase=ppo", "phase.kl_coef=0.05", "seed=2", "logger=wandb", "logger.log_artifacts=true",
                 "phase.sft_run='/x/sft'", "phase.reward_run=/x/rm", "output_root=/tmp/o", "+data.max_samples=64"]
    assert derive_name(overrides, "RID", "ppo") == "ppo kl_coef=0.05 seed=2 data.max_samples=64"
    # a sweep job: the swept keys only (the rest is the same in every job of the group)
    assert derive_name(overrides, "RID", "ppo", swept=["phase.kl_coef"]) == "ppo kl_coef=0.05"
    # nothing that says what is trained: the run id
    assert derive_name(["phase=sft", "logger=wandb"], "RID", "sft") == "RID"
    assert len(derive_name([f"phase.k{i}={'x' * 20}" for i in range(20)], "RID", "sft")) == 128


def test_group_from_logger_sweep_or_pipeline(tmp_path, monkeypatch):
    monkeypatch.delenv("RLHF_EXP_SWEEP", raising=False)
    job = tmp_path / "2026-01-01_sweepfolder" / "job0"
    assert derive_group("mine", job, multirun=True) == "mine"
    assert derive_group(None, job, multirun=True) == "2026-01-01_sweepfolder"
    monkeypatch.setenv("RLHF_EXP_SWEEP", "ppo_kl_coef")
    assert derive_group(None, job, multirun=True) == "ppo_kl_coef"
    assert derive_group(None, tmp_path / "runs" / "r1", multirun=False) is None  # a single run
    pipe = tmp_path / "2026-01-01_rlhf"
    pipe.mkdir()
    (pipe / "pipeline.json").write_text("{}")
    assert derive_group(None, pipe / "ppo", multirun=False) == "2026-01-01_rlhf"


def test_tags_add_phase_and_model():
    assert derive_tags(["mine", "ppo"], "ppo", "tiny") == ["mine", "ppo", "tiny"]
    assert derive_tags([], "sft", "/models/qwen_small/") == ["sft", "qwen_small"]


def _hydra_job(job: Path, overrides: list[str], mode: str, sweep_task: list[str] | None = None) -> None:
    import yaml

    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"mode": mode}}))
    if sweep_task is not None:
        (job.parent / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": sweep_task}}}))


def test_identity_of_a_sweep_job_from_its_hydra_files(tmp_path, monkeypatch):
    monkeypatch.delenv("RLHF_EXP_SWEEP", raising=False)
    job = tmp_path / "sw" / "j1"
    _hydra_job(job, ["phase=ppo", "phase.kl_coef=0.05", "seed=2"], "MULTIRUN",
               sweep_task=["phase=ppo", "phase.kl_coef=0.01,0.05", "seed=1,2"])
    ident = identity(logger_cfg(tags=["t"]), job, "j1", "ppo", "tiny")
    assert ident == {"group": "sw", "job_type": "ppo", "name": "ppo kl_coef=0.05 seed=2", "tags": ["t", "ppo", "tiny"]}
    assert sync_command(job) == f"wandb sync {tmp_path / 'sw'}/*/wandb/offline-run-*"


# ----------------------------------------------------------------------------- real offline runs

import struct  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def wandb_records(path: Path) -> list:
    """The records of an offline run's .wandb file (W&B's LevelDB-style log: 7-byte header, 32 KiB blocks, each
    record a protobuf cut into FULL/FIRST/MIDDLE/LAST chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # the zero padding at a block's end
            pos += left
            continue
        if pos + 7 + length > len(data):  # a record still being written
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
    return out


def _kind(records, kind):
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Real wandb, offline, with its caches under tmp_path."""
    for var in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("RLHF_EXP_SWEEP", raising=False)
    monkeypatch.setattr(wandb_sink, "has_api_key", lambda: False)
    monkeypatch.setattr(wandb_sink, "_warned_offline", False)


def _offline_run(job: Path, cfg, parents=None, metrics=None):
    from rlhf_exp.tracking.run import Run

    checkpoint = job / "checkpoints" / "final"
    with Run(job, cfg, parents) as run:
        checkpoint.mkdir(parents=True)
        (checkpoint / "model.safetensors").write_bytes(b"weights")
        run.log({"train/loss": 2.5}, step=1)
        run.log({"train/loss": 1.25}, step=2)
        run.finish(metrics or {"gold_score": 0.75}, checkpoint)
    files = list((job / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    # wandb's writer (its own process) may flush the file just after finish() returns: wait for the exit record
    deadline = time.monotonic() + 20
    while True:
        records = wandb_records(files[0])
        if _kind(records, "exit") or time.monotonic() > deadline:
            return records, checkpoint
        time.sleep(0.05)


def test_offline_sweep_job_written_with_group_name_tags_metrics_and_artifact(offline, tmp_path, compose, capsys):
    import json
    import subprocess

    job = tmp_path / "sweeps" / "2026-01-01_kl" / "job1"
    _hydra_job(job, ["phase=ppo", "phase.kl_coef=0.05", "seed=2"], "MULTIRUN",
               sweep_task=["phase=ppo", "phase.kl_coef=0.01,0.05", "seed=2"])
    cfg = compose(["phase=ppo", "phase.kl_coef=0.05", "seed=2", "logger=wandb", "logger.log_artifacts=true",
                   "logger.tags=[mine]"])
    parents = [{"phase": "sft", "run_id": "sft_r0", "path": "/x/sft", "checkpoint": "/x/sft/ck"},
               {"phase": "rm", "run_id": "rm_r0", "path": "/x/rm", "checkpoint": "/x/rm/ck"}]
    records, checkpoint = _offline_run(job, cfg, parents)

    (run,) = _kind(records, "run")
    assert run.run_id == "job1"  # the run id (resume relies on it)
    assert run.run_group == "2026-01-01_kl" and run.job_type == "ppo"
    assert run.display_name == "ppo kl_coef=0.05"
    assert list(run.tags) == ["mine", "ppo", "tiny"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["phase"]["kl_coef"] == 0.05 and config["seed"] == 2
    losses = [json.loads(i.value_json) for h in _kind(records, "history") for i in h.item
              if (i.key or "/".join(i.nested_key)) == "train/loss"]
    assert losses == [2.5, 1.25]

    (artifact,) = _kind(records, "artifact")
    assert artifact.name == "ppo-job1" and artifact.type == "model"
    meta = json.loads(artifact.metadata)
    assert [(p["phase"], p["run_id"], p["artifact"]) for p in meta["parents"]] == [
        ("sft", "sft_r0", "sft-sft_r0"), ("rm", "rm_r0", "rm-rm_r0")]
    manifest = json.loads((job / "manifest.json").read_text())
    assert meta["config_hash"] == manifest["config_hash"] and meta["metrics"] == {"gold_score": 0.75}
    (entry,) = artifact.manifest.contents
    assert entry.path == "checkpoint/model.safetensors" and entry.ref == (checkpoint / "model.safetensors").as_uri()
    # W&B refuses use_artifact offline: no use record, no error; the parents are in the metadata
    assert _kind(records, "use_artifact") == []
    err = capsys.readouterr().err
    assert "not logged" not in err and "not used" not in err
    assert manifest["wandb"]["name"] == "ppo kl_coef=0.05"  # kept for a resume

    # the sync command said is the one for this layout: wandb finds the run through it
    said = next(line for line in err.splitlines() if "wandb sync" in line).split("`")[1]
    assert said == f"wandb sync {job.parent}/*/wandb/offline-run-*"
    wandb_cli = Path(sys.executable).parent / "wandb"
    out = subprocess.run(f"{wandb_cli} sync --dry-run {said.removeprefix('wandb sync ')}", shell=True,
                         capture_output=True, text=True, timeout=60)
    assert "Would sync 1 run(s)" in out.stdout + out.stderr and "run-job1.wandb" in out.stdout + out.stderr


def test_offline_upload_mode_and_reward_model_type(offline, tmp_path, compose):
    job = tmp_path / "runs" / "rm1"
    _hydra_job(job, ["phase=rm"], "RUN")
    cfg = compose(["phase=rm", "logger=wandb", "logger.log_artifacts=true", "logger.artifact_mode=upload"])
    records, _ = _offline_run(job, cfg)
    (run,) = _kind(records, "run")
    assert run.run_group == "" and run.job_type == "rm" and run.display_name == "rm1"
    (artifact,) = _kind(records, "artifact")
    assert artifact.name == "rm-rm1" and artifact.type == "reward_model"
    (entry,) = artifact.manifest.contents
    assert entry.path == "checkpoint/model.safetensors" and entry.ref == ""  # the file itself, uploaded on sync


def test_no_artifact_unless_asked(offline, tmp_path, compose):
    job = tmp_path / "runs" / "sft1"
    _hydra_job(job, ["phase=sft"], "RUN")
    records, _ = _offline_run(job, compose(["logger=wandb"]))
    assert _kind(records, "run") and _kind(records, "artifact") == []


# ----------------------------------------------------------------------------- online lineage (fake W&B)


class FakeArtifact:
    def __init__(self, name, type, metadata):
        self.name, self.type, self.metadata, self.refs = name, type, metadata, []

    def add_reference(self, uri, name=None):
        self.refs.append((uri, name))


def test_online_ppo_uses_its_parents_artifacts(monkeypatch, tmp_path, capsys):
    run = FakeRun()
    run.used, run.logged_artifacts = [], []

    def use_artifact(name, type=None):
        if name.startswith("rm-"):
            raise ValueError("artifact not found")  # a parent that ran without log_artifacts
        run.used.append((name, type))

    run.use_artifact = use_artifact
    run.log_artifact = run.logged_artifacts.append
    module = types.SimpleNamespace(init=lambda **kw: run, Settings=lambda **kw: kw, Artifact=FakeArtifact)
    monkeypatch.setitem(sys.modules, "wandb", module)
    sink = WandbSink(logger_cfg(mode="online"), "ppo1", tmp_path, {})
    (tmp_path / "ck").mkdir()
    parents = [{"phase": "sft", "run_id": "s0"}, {"phase": "rm", "run_id": "r0"}]
    sink.log_checkpoint(tmp_path / "ck", "ppo", "ppo1", {"parents": parents}, parents)
    assert run.used == [("sft-s0:latest", "model")]
    (artifact,) = run.logged_artifacts
    assert artifact.name == "ppo-ppo1" and artifact.refs == [((tmp_path / "ck").as_uri(), "checkpoint")]
    err = capsys.readouterr().err
    assert err.count("rm-r0:latest not used") == 1
    # a missing checkpoint: one warning, nothing raised
    sink.log_checkpoint(tmp_path / "nope", "ppo", "ppo1", {}, [])
    assert "checkpoint artifact not logged" in capsys.readouterr().err and sink.run is run


def test_a_resumed_run_keeps_its_wandb_identity(monkeypatch, tmp_path, compose):
    """A sweep job resumed with resume=<its folder> runs as a single run: its group and name come from the manifest."""
    import json

    from rlhf_exp.tracking.run import Run

    monkeypatch.setattr(wandb_sink, "has_api_key", lambda: True)
    monkeypatch.delenv("RLHF_EXP_SWEEP", raising=False)
    inits = []
    fake_wandb(monkeypatch, lambda **kw: inits.append(kw) or FakeRun())
    job = tmp_path / "sw" / "j1"
    _hydra_job(job, ["phase=sft", "seed=3"], "MULTIRUN")
    cfg = compose(["logger=wandb", "seed=3"])
    with Run(job, cfg):
        pass
    assert (inits[0]["group"], inits[0]["name"], inits[0]["job_type"]) == ("sw", "sft seed=3", "sft")
    _hydra_job(tmp_path / "j1_again", [], "RUN")  # as the resumed run's .hydra says: a single run
    (job / ".hydra" / "hydra.yaml").write_text((tmp_path / "j1_again" / ".hydra" / "hydra.yaml").read_text())
    (job / ".hydra" / "overrides.yaml").write_text("[]\n")
    with Run(job, cfg, resume=True):
        pass
    assert (inits[1]["group"], inits[1]["name"]) == ("sw", "sft seed=3")
    assert json.loads((job / "manifest.json").read_text())["wandb"]["group"] == "sw"


def test_cli_hands_the_sweep_name_to_its_jobs(monkeypatch):
    from rlhf_exp import cli

    monkeypatch.setenv("RLHF_EXP_SWEEP", "stale")
    cli.hand_sweep_name(["-m", "sweep=dpo_beta", "seed=1"])
    assert os.environ["RLHF_EXP_SWEEP"] == "dpo_beta"
    cli.hand_sweep_name(["--cfg", "job"])
    assert "RLHF_EXP_SWEEP" not in os.environ
