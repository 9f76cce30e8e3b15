"""W&B mirroring: offline without a key (said once), and never fatal."""

from __future__ import annotations

import sys
import types

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
