"""``python -m rlhf_exp pipeline=rlhf``: the whole chain in one command, and the lineage it leaves."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, read_json, run_cli


@pytest.mark.slow
def test_rlhf_pipeline_runs_the_chain_in_subfolders_and_tabulates_it(tmp_path):
    proc = run_cli(["pipeline=rlhf", f"output_root={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (root,) = list((tmp_path / "pipelines").iterdir())
    summary = read_json(root / "pipeline_summary.json")
    assert summary["status"] == "succeeded" and [p["phase"] for p in summary["phases"]] == ["sft", "rm", "ppo", "dpo"]
    for phase in ("sft", "rm", "ppo", "dpo"):
        assert read_json(root / phase / "manifest.json")["status"] == "succeeded"
        assert (root / phase / "metrics.jsonl").is_file() and (root / phase / "summary.json").is_file()
    rows = {p["phase"]: p["metrics"] for p in summary["phases"]}
    assert rows["rm"]["accuracy"] >= 0.65
    assert rows["ppo"]["gold"] >= rows["sft"]["gold"] + 0.05 and rows["ppo"]["KL"] < 2.0
    assert rows["dpo"]["gold"] > rows["sft"]["gold"]
    assert "phase  status" in proc.stdout and "ppo    succeeded  gold" in proc.stdout
    parents = {p["phase"]: p["path"] for p in read_json(root / "ppo" / "manifest.json")["parents"]}
    assert parents == {"sft": str(root / "sft"), "rm": str(root / "rm")}
    lineage = subprocess.run([sys.executable, "-m", "rlhf_exp.lineage", str(root / "ppo")], cwd=ROOT,
                             capture_output=True, text=True)
    assert lineage.returncode == 0
    assert [line.lstrip("├└─│ ").split()[0] for line in lineage.stdout.splitlines()] == ["ppo", "sft", "rm", "sft"]


def test_pipeline_phase_settings_are_checked_before_anything_trains(tmp_path):
    proc = run_cli(["pipeline=rlhf", "pipeline.ppo.kl_cof=0.1", f"output_root={tmp_path}"])
    assert proc.returncode == 2 and "pipeline.ppo: unknown key 'phase.kl_cof'" in proc.stderr
    assert "Did you mean 'phase.kl_coef'?" in proc.stderr and not list(tmp_path.iterdir())
    proc = run_cli(["pipeline=rlhf", "phase.beta=0.2", f"output_root={tmp_path}"])
    assert proc.returncode == 2 and "set a phase's values as pipeline.<phase>.<key>=value" in proc.stderr


def test_pipeline_dry_run_prints_each_phase_command(tmp_path):
    proc = run_cli(["pipeline=rlhf", "dry_run=true", "pipeline.ppo.kl_coef=0.1", f"output_root={tmp_path}"])
    assert proc.returncode == 0
    assert f"python -m rlhf_exp phase=ppo output_root={tmp_path} phase.kl_coef=0.1" in proc.stdout
    assert not list(tmp_path.iterdir())


def test_lineage_of_an_unknown_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rlhf_exp.lineage", "nope", "--root", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "neither a run folder nor a run id" in proc.stderr
