"""Secrets (hub and W&B tokens) never reach a run's files, its log lines, or W&B."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_exp.tracking.secrets import scrub
from tests.conftest import run_cli

HF = "hf_TESTSECRET_0123456789abcdef"
WANDB = "wandbTESTSECRET0123456789abcdef0123456789"


def test_scrub_masks_secret_env_values_everywhere(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", HF)
    monkeypatch.setenv("SHORT_TOKEN", "1")  # too short to mask safely
    record = {"command": f"python -m rlhf_exp tag={HF}", "list": [HF, "x"], "n": 3, "flag": "1"}
    assert scrub(record) == {"command": "python -m rlhf_exp tag=***", "list": ["***", "x"], "n": 3, "flag": "1"}


@pytest.mark.slow
def test_a_secret_in_the_config_or_command_line_is_written_nowhere(tmp_path):
    env = {"HF_TOKEN": HF, "WANDB_API_KEY": WANDB}
    # a value interpolating a token, and a token pasted on the command line, in a sweep logged to W&B
    proc = run_cli(["-m", "tag=${oc.env:HF_TOKEN}," + WANDB, "phase.max_steps=2", "logger=wandb", "logger.mode=offline",
                    f"output_root={tmp_path}"], env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert HF not in proc.stdout + proc.stderr and WANDB not in proc.stdout + proc.stderr
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "manifest.json" for p in files) and any(p.suffix == ".wandb" for p in files)
    leaked = [str(p) for p in files if HF.encode() in p.read_bytes() or WANDB.encode() in p.read_bytes()]
    assert not leaked, leaked
    assert "tag: '***'" in Path(next(p for p in files if p.name == "config.yaml")).read_text()
