"""The real CLI: help and config inspection stay light; dry runs resolve the plan without loading."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_cli

PROBE = """
import sys
from rlhf_exp.cli import main
try:
    main({args!r})
except SystemExit as exc:
    code = exc.code
else:
    code = 0
heavy = sorted(m for m in ("torch", "transformers", "trl", "datasets", "peft") if m in sys.modules)
print("HEAVY=" + ",".join(heavy), "CODE=" + str(code))
"""


def probe(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("args", [["--help"], ["--cfg", "job"], ["--info"], ["--cfg", "job", "phase=ppo", "hardware=a100x8"],
                                  ["phase.betta=1"]])
def test_light_paths_import_no_ml_library(args):
    out = probe(args)
    assert "HEAVY= " in out, out[-2000:]


def test_help_lists_groups_and_examples():
    proc = run_cli(["--help"])
    assert proc.returncode == 0
    for text in ("model: ", "phase: ", "hardware: ", "python -m rlhf_exp phase=dpo", "summary.json"):
        assert text in proc.stdout


def test_cfg_job_prints_the_composed_config():
    proc = run_cli(["--cfg", "job", "phase=dpo", "phase.beta=0.25"])
    assert proc.returncode == 0 and "beta: 0.25" in proc.stdout and "name: dpo" in proc.stdout


def test_multirun_dry_run_trains_nothing(tmp_path):
    proc = run_cli(["-m", "dry_run=true", "seed=0,1", f"output_root={tmp_path}"])
    assert proc.returncode == 0 and proc.stdout.count("dry run: nothing loaded") == 2
    assert not list(tmp_path.rglob("manifest.json")) and not list(tmp_path.rglob("checkpoints"))


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path):
    out = probe(["dry_run=true", "phase=dpo", f"output_root={tmp_path}", "hardware.lora=true"])
    assert "HEAVY= " in out and "phase     : dpo" in out and "lora=True" in out
    assert "unresolved" in out and "python -m rlhf_exp phase=sft" in out
    assert not list(tmp_path.iterdir()), "a dry run writes nothing"


def test_dry_run_of_a_gpu_preset_warns_where_no_gpu_is_seen(tmp_path):
    from rlhf_exp import plan

    out = probe(["dry_run=true", "hardware=a100x1", "phase=sft", f"output_root={tmp_path}"])
    assert "HEAVY= " in out, out[-2000:]  # still no ML library imported
    assert ("warning   : hardware=a100x1 needs CUDA GPUs and this machine shows none" in out) != plan.nvidia_gpu_visible()
    slurm = probe(["dry_run=true", "hardware=a100x1", "launcher=slurm", f"output_root={tmp_path}"])
    assert "needs CUDA GPUs" not in slurm  # SLURM runs it on GPU nodes


def test_dry_run_shows_the_first_parsed_record_and_the_counts(tmp_path):
    out = probe(["dry_run=true", f"output_root={tmp_path}"])
    assert "HEAVY= " in out and "records   : train 4096 of 4096 read; eval 256 of 256 read" in out
    assert 'first     : {"prompt": "' in out and " =" in out  # the plain form: "d d d d d ="
    hh = tmp_path / "hh.jsonl"
    turn = "\\n\\nHuman: Hi\\n\\nAssistant:"
    hh.write_text("".join(f'{{"chosen": "{turn} Hello {i}.", "rejected": "{turn} Go away."}}\n' for i in range(20))
                  + f'{{"chosen": "{turn} Same.", "rejected": "{turn} Same."}}\n')
    out = probe(["dry_run=true", "phase=dpo", "model=local", "model.path=org/any", "data=jsonl", f"data.train_file={hh}",
                 "phase.sft_run=none", f"output_root={tmp_path}"])
    assert "records   : train 19 of 20 read (dropped: 1 identical_pair); eval 1 of 1 read" in out, out[-1500:]
    assert 'first     : {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant"' in out
    assert "HEAVY=datasets " in out  # local files are read with the run's own loaders; no torch
    assert not list(tmp_path.glob("runs"))
