"""Shared fixtures: compose configs through the real Hydra path, run the real CLI in a subprocess,
and train the embedded SFT model once per session for the tests that build on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.scaled_fixtures import scaled_model  # noqa: F401  (scaled-down Llama 3.1 / Mistral v0.3 / Qwen2.5)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
_HF_DATASETS_CACHE: list[str] = []


def pytest_configure(config):
    """A datasets cache of this session's own (for the CLIs it starts too): what runs keep there (tokenised data sets,
    data check reports: rlhf_exp.data.loading.on_disk, rlhf_exp.data.check.reused_checks) is shared by the session's
    tests, never read back from a developer's earlier sessions, and removed at the end."""
    import tempfile

    folder = tempfile.mkdtemp(prefix="rlhf_tests_hf_datasets_")
    _HF_DATASETS_CACHE.append(folder)
    os.environ["HF_DATASETS_CACHE"] = folder
    if "datasets.config" in sys.modules:  # imported already: its setting was read at import
        sys.modules["datasets.config"].HF_DATASETS_CACHE = Path(folder)


def pytest_unconfigure(config):
    import shutil

    for folder in _HF_DATASETS_CACHE:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def compose():
    """compose(overrides) -> DictConfig through the CLI's own compose (errors become ConfigError)."""
    from rlhf_exp.cli import compose as _compose

    return _compose


def run_cli(args: list[str], cwd: Path | None = None, env: dict | None = None, timeout: int = 900):
    """Run ``python -m rlhf_exp ARGS`` as a user would; returns the CompletedProcess."""
    # a user's W&B settings must not leak into tests: no key, no forced mode unless a test asks
    full_env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    full_env.update({"PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", **(env or {})})
    return subprocess.run([sys.executable, "-m", "rlhf_exp", *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def only_run(output_root: Path, phase: str) -> Path:
    runs = sorted((output_root / "runs").glob(f"*_{phase}"))
    assert len(runs) == 1, f"expected one {phase} run under {output_root}, found {runs}"
    return runs[0]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory) -> Path:
    """The README's main command (SFT on the embedded default), run once through the CLI."""
    root = tmp_path_factory.mktemp("outputs")
    proc = run_cli([f"output_root={root}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return only_run(root, "sft")


@pytest.fixture(scope="session")
def main_pipeline(tmp_path_factory):
    """The README's main command, ``python -m rlhf_exp pipeline=rlhf``, run once per session through the CLI:
    (the CompletedProcess, the pipeline folder with sft/ rm/ ppo/ dpo/). Tests may add files to its run folders
    (evaluation.json) but must not change what the chain wrote."""
    root = tmp_path_factory.mktemp("main_pipeline")
    proc = run_cli(["pipeline=rlhf", f"output_root={root}"], env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = (root / "pipelines").iterdir()
    return proc, folder


@pytest.fixture(scope="session")
def rm_run(sft_run, tmp_path_factory) -> Path:
    """A reward model trained from ``sft_run`` through the CLI, once per session."""
    root = tmp_path_factory.mktemp("rm_outputs")
    proc = run_cli(["phase=rm", f"phase.sft_run={sft_run}", f"output_root={root}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return only_run(root, "rm")
