"""Sweep files (sweeps/*.yaml, run with ``-m sweep=<name>``) and the summary every multirun leaves behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from rlhf_exp.config.errors import ConfigError
from rlhf_exp.sweep import SWEEPS_DIR, SweepSummary, expand_sweep, summarize, sweep_names, sweep_overrides
from tests.conftest import ROOT, read_json, run_cli
from tests.launch.standins import parent_overrides

SWEEPS = sweep_names()
# the grid sweeps and their number of jobs
GRIDS = {"dpo_beta": 5, "ppo_kl_coef": 4, "ppo_kl_target": 4, "overoptimization": 10}


def test_the_sweeps_are_there():
    assert set(SWEEPS) == {*GRIDS, "ppo_optuna"}


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_file_starts_with_its_command(name):
    first = (SWEEPS_DIR / f"{name}.yaml").read_text().splitlines()[0]
    assert first == f"# python -m rlhf_exp -m sweep={name}" or first.startswith(f"# python -m rlhf_exp -m sweep={name} ")


def _swept(name: str) -> dict[str, list]:
    """key -> the values a sweep file's params must reach (each choice; an interval's two ends)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.load(SWEEPS_DIR / f"{name}.yaml").hydra.sweeper.params
    out = {}
    for override in OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()]):
        value = override.value()
        out[override.key_or_group] = [value.start, value.end] if hasattr(value, "start") else list(value.list)
    return out


@pytest.mark.parametrize("name", SWEEPS)
def test_every_swept_value_composes_and_validates(name):
    """What the CLI's preflight does with ``-m sweep=<name>``: each swept value composed and checked."""
    from rlhf_exp.cli import preflight

    cfgs = preflight(sweep_overrides(name), multirun=True, check_rules=True)
    for key, values in _swept(name).items():
        assert sorted({OmegaConf.select(c, key) for c in cfgs}) == pytest.approx(sorted(values)), key
    OmegaConf.to_object(cfgs[0])


@pytest.mark.parametrize("name", SWEEPS)
def test_sweeper_settings_reach_hydra(name):
    """The file's hydra.sweeper settings are keys of the sweeper it selects (Optuna's for ppo_optuna)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rlhf_exp.config.errors import CONF_DIR

    fixed = [o for o in sweep_overrides(name) if o.split("=", 1)[0] not in _swept(name)]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=fixed, return_hydra_config=True)
    for key, value in (o.split("=", 1) for o in fixed if o.startswith("hydra.sweeper.")):
        assert OmegaConf.select(cfg, key) == yaml.safe_load(value), key
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper" if name == "ppo_optuna" else "BasicSweeper")
    if name == "ppo_optuna":
        assert (cfg.hydra.sweeper.direction, cfg.hydra.sweeper.sampler.seed) == ("maximize", 0)


def test_command_line_overrides_replace_the_sweep_files():
    assert expand_sweep(["-m", "sweep=dpo_beta", "phase.beta=0.3", "seed=1"]) == ["-m", "phase=dpo", "phase.beta=0.3",
                                                                                   "seed=1"]
    assert expand_sweep(["-m", "seed=0,1"]) == ["-m", "seed=0,1"]
    with pytest.raises(ConfigError, match="no such sweep.*dpo_beta, overoptimization, ppo_kl_coef"):
        expand_sweep(["-m", "sweep=dpo_bta"])


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_sweep_dry_run_through_the_cli(name, tmp_path):
    """Each job planned, from stand-in parent runs (phase.sft_run, and phase.reward_run for PPO: a dry
    run refuses a phase whose parents do not exist), and nothing written under output_root."""
    phase = OmegaConf.load(SWEEPS_DIR / f"{name}.yaml").defaults[0]["override /phase"]
    parents = parent_overrides(phase, tmp_path / "parents")
    out = tmp_path / "out"
    out.mkdir()
    proc = run_cli(["-m", f"sweep={name}", "dry_run=true", *parents, f"output_root={out}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("dry run: nothing loaded") == GRIDS[name]
    assert proc.stdout.count(f"parents   : sft={(tmp_path / 'parents' / 'standin_sft').resolve()}") == GRIDS[name]
    assert not list(out.iterdir()), "a dry run leaves no summary, no folder"


# --------------------------------------------------------------------------------- the summary


def fake_job(sweep: Path, num: int, overrides: list[str], status: str | None, metrics: dict | None = None,
             error: str | None = None) -> Path:
    folder = sweep / f"2026-01-01_00-00-00-00000{num}_{num}_ppo"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num}}}))
    if status is not None:
        manifest = {"run_id": folder.name, "phase": "ppo", "status": status, "command": "python -m rlhf_exp -m x"}
        (folder / "manifest.json").write_text(json.dumps({**manifest, **({"error": error} if error else {})}))
    if metrics is not None:
        (folder / "summary.json").write_text(json.dumps({"phase": "ppo", "metrics": metrics}))
    return folder


def multirun_config(sweep: Path, task: list[str], params: dict | None = None):
    return OmegaConf.create({"dry_run": False, "hydra": {"sweep": {"dir": str(sweep)}, "overrides": {"task": task},
                                                         "sweeper": {"params": params}}})


def test_summary_lists_succeeded_failed_and_unstarted_jobs(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    common = ["phase=ppo", "output_root=/o", "phase.sft_run='/o/runs/sft'"]
    fake_job(sweep, 0, [*common, "phase.kl_coef=0.02"], "succeeded", {"gold_score": 0.91, "kl": 1.2, "steps": 40})
    fake_job(sweep, 1, [*common, "phase.kl_coef=0.05"], "succeeded", {"gold_score": 0.95, "kl": 0.8})
    fake_job(sweep, 2, [*common, "phase.kl_coef=0.1"], "failed", error="RuntimeError: CUDA out of memory")
    fake_job(sweep, 3, [*common, "phase.kl_coef=0.2"], None)
    (sweep / "notes").mkdir()  # not a job folder
    SweepSummary().on_multirun_end(config=multirun_config(sweep, [*common[:2], "phase.kl_coef=0.02,0.05,0.1,0.2"]))

    s = read_json(sweep / "sweep_summary.json")
    assert s["swept"] == ["phase.kl_coef"] and s["jobs_total"] == 4
    assert s["counts"] == {"succeeded": 2, "failed": 1, "unknown": 1}
    assert s["objective"] == {"metric": "gold_score", "direction": "maximize"}
    assert s["best"]["job"] == 1 and s["best"]["params"] == {"phase.kl_coef": 0.05} and s["best"]["objective"] == 0.95
    jobs = s["jobs"]
    assert [j["job"] for j in jobs] == [0, 1, 2, 3]
    assert [j["params"]["phase.kl_coef"] for j in jobs] == [0.02, 0.05, 0.1, 0.2]
    assert [j["status"] for j in jobs] == ["succeeded", "succeeded", "failed", "unknown"]
    assert jobs[0]["metrics"] == {"gold_score": 0.91, "kl": 1.2, "steps": 40} and jobs[0]["objective"] == 0.91
    assert jobs[2]["error"] == "RuntimeError: CUDA out of memory" and jobs[2]["objective"] is None
    assert "no manifest.json" in jobs[3]["error"] and jobs[3]["metrics"] == {}
    assert jobs[0]["overrides"][-1] == "phase.kl_coef=0.02" and s["command"]

    table = (sweep / "sweep_summary.md").read_text()
    out = capsys.readouterr().out
    assert "| job | run id | status | phase.kl_coef | gold_score | kl | note |" in table
    assert "0.95 *" in table and "CUDA out of memory" in table and "2 succeeded, 1 failed, 1 unknown" in out
    assert "best gold_score 0.95 (job 1: phase.kl_coef=0.05)" in out and table.split("\n\n", 1)[1] in out


def test_without_gold_score_eval_loss_is_minimised_and_swept_keys_come_from_the_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    fake_job(sweep, 0, ["phase=sft", "seed=0", "phase.learning_rate=1e-3"], "succeeded", {"eval_loss": 1.5})
    fake_job(sweep, 1, ["phase=sft", "seed=0", "phase.learning_rate=3e-3"], "succeeded", {"eval_loss": 1.2})
    fake_job(sweep, 2, ["phase=sft", "seed=0", "phase.learning_rate=1e-2"], "running", {"eval_loss": 0.1})
    s = summarize(sweep)  # no multirun config: what differs between jobs is what was swept
    assert s["swept"] == ["phase.learning_rate"]
    assert s["objective"] == {"metric": "eval_loss", "direction": "minimize"}
    assert s["best"]["params"] == {"phase.learning_rate": 3e-3}, "only succeeded jobs can be best"


def test_without_hydra_files_swept_values_come_from_the_run_config(tmp_path):
    sweep = tmp_path / "sweep"  # hydra.output_subdir=null: no .hydra/ in job folders
    for num, beta in enumerate([0.1, 0.2]):
        folder = sweep / f"job{num}"
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps({"run_id": folder.name, "status": "succeeded"}))
        (folder / "config.yaml").write_text(yaml.safe_dump({"phase": {"name": "dpo", "beta": beta}}))
    s = summarize(sweep, multirun_config(sweep, ["phase=dpo", "phase.beta=0.1,0.2"]))
    assert [j["params"] for j in s["jobs"]] == [{"phase.beta": 0.1}, {"phase.beta": 0.2}] and s["objective"] is None


def test_summary_is_rebuilt_from_disk_by_hand(tmp_path):
    sweep = tmp_path / "sweep"
    fake_job(sweep, 0, ["seed=0"], "succeeded", {"gold_score": 0.5})
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": ["seed=0,1"]}}}))
    proc = subprocess.run([sys.executable, "-m", "rlhf_exp.sweep", str(sweep)], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert read_json(sweep / "sweep_summary.json")["jobs"][0]["params"] == {"seed": 0}


def test_summary_is_written_when_the_sweep_stops_early(tmp_path):
    """A failed job can make the sweeper raise (or a job exit), and Hydra skips on_multirun_end then."""
    sweep = tmp_path / "sweep"
    fake_job(sweep, 0, ["seed=0"], "failed", error="ValueError: boom")
    config = {"hydra": {"sweep": {"dir": str(sweep)}, "overrides": {"task": ["seed=0,1"]}}}
    script = ("import sys\nfrom omegaconf import OmegaConf\nfrom rlhf_exp.sweep import SweepSummary\n"
              f"SweepSummary().on_multirun_start(config=OmegaConf.create({config!r}))\nsys.exit(2)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "1 failed" in proc.stdout, proc.stderr
    s = read_json(sweep / "sweep_summary.json")
    assert s["jobs"][0]["status"] == "failed" and s["jobs"][0]["error"] == "ValueError: boom" and s["best"] is None


def test_summary_imports_no_torch():
    proc = subprocess.run([sys.executable, "-c", "import sys, rlhf_exp.sweep; print('torch' in sys.modules)"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.stdout.strip() == "False", proc.stderr


# --------------------------------------------------------------------------------- real sweeps

# small and quick: a few steps, 32 gold-scored prompts (the same for parents and children: data settings
# are part of what a child matches its parent on)
QUICK = ["data.synthetic.num_eval_prompts=32", "phase.per_device_train_batch_size=16"]


def only_sweep(output_root: Path) -> Path:
    sweeps = list((output_root / "sweeps").iterdir())
    assert len(sweeps) == 1, sweeps
    return sweeps[0]


@pytest.mark.slow
def test_sft_sweep_leaves_a_summary(tmp_path):
    proc = run_cli(["-m", "phase=sft", "phase.max_steps=2", *QUICK, "seed=0,1", f"output_root={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = only_sweep(tmp_path)
    s = read_json(sweep / "sweep_summary.json")
    assert s["swept"] == ["seed"] and s["counts"] == {"succeeded": 2}
    assert [j["params"] for j in s["jobs"]] == [{"seed": 0}, {"seed": 1}]
    assert all("seed=%d" % i in j["overrides"] and "phase.max_steps=2" in j["overrides"] for i, j in enumerate(s["jobs"]))
    assert all(j["metrics"]["steps"] == 2 and j["objective"] == j["metrics"]["gold_score"] for j in s["jobs"])
    assert s["objective"]["metric"] == "gold_score"
    assert s["best"]["objective"] == max(j["objective"] for j in s["jobs"])
    assert all(Path(j["path"]).parent == sweep and (Path(j["path"]) / "manifest.json").is_file() for j in s["jobs"])
    assert "seed=0,1" in s["command"] and (sweep / "sweep_summary.md").is_file()
    assert "2 succeeded; best gold_score" in proc.stdout and "| job | run id | status | seed | gold_score" in proc.stdout


@pytest.fixture(scope="module")
def quick_parents(tmp_path_factory) -> Path:
    """An SFT and a reward-model run of a few steps: enough for PPO to start from."""
    root = tmp_path_factory.mktemp("parents")
    for phase in ("sft", "rm"):
        proc = run_cli([f"phase={phase}", "phase.max_steps=4", *QUICK, f"output_root={root}"])
        assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.mark.slow
def test_optuna_sweep_runs_trials_and_finds_the_best(quick_parents):
    proc = run_cli(["-m", "sweep=ppo_optuna", "hydra.sweeper.n_trials=2", "phase.max_steps=2",
                    "phase.rollout_batch_size=16", *QUICK, "logger=wandb", f"output_root={quick_parents}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = only_sweep(quick_parents)
    s = read_json(sweep / "sweep_summary.json")
    assert s["counts"] == {"succeeded": 2} and s["swept"] == ["phase.learning_rate", "phase.kl_coef"]
    for job in s["jobs"]:
        assert 2e-5 <= job["params"]["phase.learning_rate"] <= 5e-4 and 0.005 <= job["params"]["phase.kl_coef"] <= 0.3
        assert "phase.kl_ctrl=fixed" in job["overrides"] and job["metrics"]["steps"] == 2
    assert len({j["params"]["phase.learning_rate"] for j in s["jobs"]}) == 2, "each trial samples its own values"
    # W&B (offline here): the jobs share the sweep's name as their group, named by their swept values
    for job in s["jobs"]:
        wandb = read_json(sweep / job["run_id"] / "manifest.json")["wandb"]
        assert wandb["group"] == "ppo_optuna" and wandb["job_type"] == "ppo", wandb
        assert wandb["name"].startswith("ppo ") and "kl_coef=" in wandb["name"] and "learning_rate=" in wandb["name"]
        assert list((sweep / job["run_id"] / "wandb").glob("offline-run-*"))
    optuna = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert optuna["best_value"] == pytest.approx(s["best"]["objective"])
    assert optuna["best_params"] == pytest.approx(s["best"]["params"])
