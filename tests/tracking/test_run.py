"""The run-folder contract and lineage resolution, without training anything."""

from __future__ import annotations

import json

import pytest

from rlhf_exp.config.errors import ConfigError
from rlhf_exp.tracking.lineage import latest_run, resolve_parents, resolve_run
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


def fake_run(root, run_id, phase, status="succeeded", model="tiny", data="synthetic", end="2026-01-01T00:00:00"):
    folder = root / "runs" / run_id
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({
        "run_id": run_id, "phase": phase, "status": status, "model": model, "data": data,
        "end_time": end, "checkpoint": str(folder / "checkpoints" / "final")}))
    return folder


def test_latest_successful_run_of_the_same_model_and_data_is_picked(tmp_path):
    fake_run(tmp_path, "a", "sft", end="2026-01-01T00:00:00")
    fake_run(tmp_path, "b", "sft", end="2026-01-02T00:00:00")
    fake_run(tmp_path, "c", "sft", status="failed", end="2026-01-03T00:00:00")
    fake_run(tmp_path, "d", "sft", model="qwen2_5_7b", end="2026-01-04T00:00:00")
    fake_run(tmp_path, "e", "dpo", end="2026-01-05T00:00:00")
    assert latest_run(tmp_path, "sft", "tiny", "synthetic")["run_id"] == "b"


def test_parent_given_by_run_id_or_folder(compose, tmp_path):
    folder = fake_run(tmp_path, "abc_sft", "sft")
    assert resolve_run("abc_sft", tmp_path, "sft", "sft_run")["path"] == str(folder.resolve())
    assert resolve_run(str(folder), tmp_path, "sft", "sft_run")["run_id"] == "abc_sft"
    parents = resolve_parents(compose(["phase=dpo", f"output_root={tmp_path}", "phase.sft_run=abc_sft"]))
    assert parents == [{"phase": "sft", "run_id": "abc_sft", "path": str(folder.resolve()),
                        "checkpoint": str(folder / "checkpoints" / "final")}]


def test_failed_parent_is_refused(tmp_path):
    fake_run(tmp_path, "bad_sft", "sft", status="failed")
    with pytest.raises(ConfigError, match="did not succeed"):
        resolve_run("bad_sft", tmp_path, "sft", "sft_run")
