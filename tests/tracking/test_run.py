"""The run-folder contract and lineage resolution, without training anything."""

from __future__ import annotations

import json

import pytest

from rlhf_exp.config.errors import ConfigError
from rlhf_exp.tracking.lineage import latest_run, lineage_keys, resolve_parents, resolve_run
from rlhf_exp.tracking.run import Run, config_hash


def test_run_writes_config_manifest_metrics_and_summary(compose, tmp_path):
    cfg = compose([f"output_root={tmp_path}"])
    with Run(tmp_path / "r1_sft", cfg) as run:
        manifest = json.loads((run.dir / "manifest.json").read_text())
        assert manifest["status"] == "running" and manifest["end_time"] is None
        run.log({"train/loss": 2.0}, step=1)
        run.log({"train/loss": float("nan")}, step=2)
        run.finish({"gold_score": 0.5}, checkpoint=run.dir / "checkpoints" / "final")
    lines = [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": "nan"}]
    summary = json.loads((run.dir / "summary.json").read_text())
    assert summary["phase"] == "sft" and summary["metrics"] == {"gold_score": 0.5}
    assert summary["checkpoint"].endswith("checkpoints/final")
    manifest = json.loads((run.dir / "manifest.json").read_text())
    for key in ("run_id", "phase", "config_hash", "parents", "git_commit", "start_time", "end_time", "status"):
        assert key in manifest
    assert manifest["status"] == "succeeded" and manifest["run_id"] == "r1_sft"
    assert manifest["config_hash"] == config_hash(cfg)
    assert "phase:\n  name: sft" in (run.dir / "config.yaml").read_text()


def test_stages_are_timed_into_the_summary(compose, tmp_path):
    """summary.json "timings": wall and CPU seconds per stage, added up per name; a part of a stage ("train/x") is
    left out of "other", which is the run's time in no stage."""
    import time

    def spin(seconds: float) -> None:  # this much CPU time (and at least as much wall time)
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass

    cfg = compose([f"output_root={tmp_path}"])
    with Run(tmp_path / "r3_sft", cfg) as run:
        spin(0.05)  # in no stage
        for _ in range(2):
            with run.stage("train"):
                spin(0.1)
                with run.stage("train/evaluate"):
                    spin(0.05)
        with run.stage("save"):
            spin(0.05)
        run.finish({}, checkpoint=None)
    t = json.loads((run.dir / "summary.json").read_text())["timings"]
    assert set(t) == {"before_run", "train", "train/evaluate", "save", "other", "total"}
    assert t["train"]["cpu_s"] >= 0.3 and t["train/evaluate"]["cpu_s"] >= 0.1 and t["save"]["cpu_s"] >= 0.05
    assert t["train"]["wall_s"] >= t["train"]["cpu_s"] - 0.01 and t["before_run"]["cpu_s"] > 0
    for k in ("wall_s", "cpu_s"):
        assert t["other"][k] == pytest.approx(t["total"][k] - t["train"][k] - t["save"][k], abs=0.002)
    assert t["other"]["cpu_s"] >= 0.05


def test_a_crash_marks_the_run_failed_with_the_error(compose, tmp_path):
    cfg = compose([f"output_root={tmp_path}"])
    with pytest.raises(RuntimeError):
        with Run(tmp_path / "r2_sft", cfg):
            raise RuntimeError("out of memory")
    manifest = json.loads((tmp_path / "r2_sft" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "out of memory" in manifest["error"]
    assert not (tmp_path / "r2_sft" / "summary.json").exists()


def test_config_hash_ignores_where_the_run_is_written_but_not_what_it_does(compose):
    assert config_hash(compose(["output_root=/a"])) == config_hash(compose(["output_root=/b"]))
    assert config_hash(compose(["seed=1"])) != config_hash(compose(["seed=2"]))


KEYS = {"model_key": "m1", "data_key": "d1"}


def fake_run(root, run_id, phase, status="succeeded", keys=KEYS, end="2026-01-01T00:00:00", where="runs"):
    folder = root / where / run_id
    (folder / "checkpoints" / "final").mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({
        "run_id": run_id, "phase": phase, "status": status, "model": "tiny", "data": "synthetic",
        "end_time": end, "checkpoint": str(folder / "checkpoints" / "final"), **keys}))
    return folder


def test_latest_successful_run_with_the_same_settings_is_picked(tmp_path):
    fake_run(tmp_path, "a", "sft", end="2026-01-01T00:00:00")
    fake_run(tmp_path, "b", "sft", end="2026-01-02T00:00:00")
    fake_run(tmp_path, "c", "sft", status="failed", end="2026-01-03T00:00:00")
    fake_run(tmp_path, "d", "sft", keys={**KEYS, "model_key": "other"}, end="2026-01-04T00:00:00")
    fake_run(tmp_path, "e", "sft", keys={**KEYS, "data_key": "other"}, end="2026-01-04T00:00:00")
    fake_run(tmp_path, "f", "dpo", end="2026-01-05T00:00:00")
    assert latest_run(tmp_path, "sft", KEYS)["run_id"] == "b"


def test_lineage_keys_ignore_preference_only_data_settings(compose):
    base = lineage_keys(compose(["phase=dpo"]))
    assert lineage_keys(compose(["phase=dpo", "data.synthetic.annotator_agreement=0.9"])) == base
    assert lineage_keys(compose(["phase=dpo", "data.synthetic.num_digits=6", "phase.max_length=32"]))["data_key"] != \
        base["data_key"]
    assert lineage_keys(compose(["phase=dpo", "model.embedded.hidden_size=32"]))["model_key"] != base["model_key"]


def test_default_parent_with_other_settings_is_not_picked_and_the_error_says_so(compose, tmp_path):
    fake_run(tmp_path, "x_sft", "sft", keys={"model_key": "m", "data_key": "d"})
    with pytest.raises(ConfigError, match="1 sft run.* exist with other model or data settings"):
        resolve_parents(compose(["phase=dpo", f"output_root={tmp_path}"]))


def test_ambiguous_run_id_is_refused(tmp_path):
    fake_run(tmp_path, "same_sft", "sft", where="sweeps/a")
    fake_run(tmp_path, "same_sft", "sft", where="sweeps/b")
    with pytest.raises(ConfigError, match="names 2 runs"):
        resolve_run("same_sft", tmp_path, "sft", "sft_run")


def test_parent_whose_checkpoint_is_gone_is_refused(compose, tmp_path):
    folder = fake_run(tmp_path, "gone_sft", "sft")
    (folder / "checkpoints" / "final").rmdir()
    with pytest.raises(ConfigError, match="has no checkpoint"):
        resolve_parents(compose(["phase=dpo", f"output_root={tmp_path}", "phase.sft_run=gone_sft"]))


def test_parent_given_by_run_id_or_folder(compose, tmp_path):
    folder = fake_run(tmp_path, "abc_sft", "sft")
    (folder / "checkpoints" / "final" / "config.json").write_text("{}")  # what the parent check reads: a config
    (folder / "checkpoints" / "final" / "model.safetensors").write_bytes(b"\x02" + bytes(7) + b"{}")  # and weights
    assert resolve_run("abc_sft", tmp_path, "sft", "sft_run")["path"] == str(folder.resolve())
    assert resolve_run(str(folder), tmp_path, "sft", "sft_run")["run_id"] == "abc_sft"
    parents = resolve_parents(compose(["phase=dpo", f"output_root={tmp_path}", "phase.sft_run=abc_sft"]))
    assert parents == [{"phase": "sft", "run_id": "abc_sft", "path": str(folder.resolve()),
                        "checkpoint": str(folder / "checkpoints" / "final")}]


def test_failed_parent_is_refused(tmp_path):
    fake_run(tmp_path, "bad_sft", "sft", status="failed")
    with pytest.raises(ConfigError, match="did not succeed"):
        resolve_run("bad_sft", tmp_path, "sft", "sft_run")
