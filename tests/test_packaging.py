"""Installed like a library, extended without forking: a wheel carries conf/ and sweeps/, and a user's own
config folder (RLHF_EXP_CONFIG_DIR or --config-dir, outside the repository) adds presets and sweeps that
every entry path sees: our compose and checks, --help, the "Valid options" of an error, sweep=<name>,
and Hydra's own job, also when it composes again elsewhere (SLURM, submitit) without the variable."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from rlhf_exp.config import paths
from rlhf_exp.config.errors import ConfigError
from tests.conftest import ROOT, run_cli

MY_MODEL = """\
# python -m rlhf_exp model=my_model   (a user's preset, outside the repository)
defaults:
  - base_model

name: my_model
path: my-org/my-model-1b
dtype: float32
"""

MY_SWEEP = """\
# python -m rlhf_exp -m sweep=my_lr
# @package _global_
defaults:
  - override /model: my_model

hydra:
  sweeper:
    params:
      phase.learning_rate: 1e-5,3e-5
"""


@pytest.fixture
def user_dir(tmp_path) -> Path:
    """A user's config folder outside the repository: model/my_model.yaml and sweeps/my_lr.yaml."""
    folder = tmp_path / "my_configs"
    (folder / "model").mkdir(parents=True)
    (folder / "sweeps").mkdir()
    (folder / "model" / "my_model.yaml").write_text(MY_MODEL)
    (folder / "sweeps" / "my_lr.yaml").write_text(MY_SWEEP)
    assert not folder.resolve().is_relative_to(ROOT)
    return folder


@pytest.fixture
def with_user_dir(user_dir, monkeypatch) -> Path:
    monkeypatch.setenv(paths.ENV_VAR, str(user_dir))
    return user_dir


def no_user_dir(**env) -> dict:
    """Environment for run_cli: no config folder of the caller's leaks in."""
    return {paths.ENV_VAR: "", "OMP_NUM_THREADS": "1", **env}


# ------------------------------------------------------------------------------- where ours are


def test_a_clone_reads_its_own_folders():
    assert paths.CONF_DIR == ROOT / "conf" and paths.SWEEPS_DIR == ROOT / "sweeps"


def test_the_wheel_lists_every_package_and_config_folder():
    """pyproject.toml names its packages (discovery cannot map conf/ to rlhf_exp.conf): a new package
    or config group folder must be added there, or a wheel would ship it with a warning or not at all."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    assert config["package-dir"] == {"rlhf_exp.conf": "conf", "rlhf_exp.sweeps": "sweeps"}
    expected = {"rlhf_exp.conf", "rlhf_exp.sweeps"}
    for folder, prefix in ((ROOT / "rlhf_exp", "rlhf_exp"), (ROOT / "conf", "rlhf_exp.conf")):
        for path in [folder, *folder.rglob("*")]:
            if path.is_dir() and path.name != "__pycache__" and any(p.is_file() for p in path.iterdir()):
                expected.add(".".join([prefix, *path.relative_to(folder).parts]))
    assert listed == expected, f"add to / remove from [tool.setuptools] packages: {sorted(expected ^ listed)}"


# ------------------------------------------------------------------------------- a user's folder


def test_a_user_preset_composes_and_validates(with_user_dir, compose):
    from rlhf_exp.config.validate import validate

    cfg = compose(["model=my_model"])
    validate(cfg)
    assert (cfg.model.name, cfg.model.path, cfg.model.dtype.value) == ("my_model", "my-org/my-model-1b", "float32")
    assert cfg.model.lora_target_modules == ["all-linear"]  # the schema's default, through base_model


def test_a_bad_key_in_a_user_preset_names_the_users_file(with_user_dir, compose):
    (with_user_dir / "model" / "typo.yaml").write_text("defaults:\n  - base_model\n\nname: typo\ndtyp: float32\n")
    with pytest.raises(ConfigError) as info:
        compose(["model=typo"])
    assert str(info.value).startswith(f"in {with_user_dir / 'model' / 'typo.yaml'}: unknown key 'model.dtyp'")


def test_a_user_preset_through_the_cli(user_dir, tmp_path):
    """From a folder outside the clone, with the variable, with --config-dir, and with flags first."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = f"output_root={tmp_path / 'out'}"
    runs = {
        "env": run_cli(["dry_run=true", "model=my_model", out], cwd=elsewhere,
                       env=no_user_dir(**{paths.ENV_VAR: str(user_dir)})),
        "--config-dir": run_cli(["--config-dir", str(user_dir), "dry_run=true", "model=my_model", out], cwd=elsewhere,
                                env=no_user_dir()),
        "-cd, flags first": run_cli(["--cfg", "job", "-cd", str(user_dir), "model=my_model"], cwd=elsewhere,
                                    env=no_user_dir()),
    }
    for how, proc in runs.items():
        assert proc.returncode == 0, (how, proc.stderr[-2000:])
        assert "my_model" in proc.stdout and "my-org/my-model-1b" in proc.stdout, (how, proc.stdout[-2000:])
    assert "model     : my_model (hub: my-org/my-model-1b)" in runs["env"].stdout
    assert not (tmp_path / "out").exists(), "a dry run leaves nothing behind"


def test_help_and_a_misspelled_option_list_the_users_preset(user_dir):
    env = no_user_dir(**{paths.ENV_VAR: str(user_dir)})
    help_text = run_cli(["--help"], env=env)
    assert help_text.returncode == 0, help_text.stderr[-2000:]
    (models,) = [line for line in help_text.stdout.splitlines() if line.startswith("model: ")]
    assert "my_model" in models.split(": ", 1)[1].split(", ") and "tiny" in models
    assert f"searched in this order: {paths.CONF_DIR}, {user_dir.resolve()}" in help_text.stdout

    typo = run_cli(["model=my_modle"], env=env)
    assert typo.returncode == 2
    assert typo.stderr.startswith("rlhf_exp: error: model=my_modle: no such option. Valid options for model: ")
    assert "my_model" in typo.stderr.split("Valid options for model: ")[1].strip().split(", ")
    assert "Traceback" not in typo.stderr


def test_a_user_sweep_is_found(user_dir, tmp_path):
    proc = run_cli(["-m", "sweep=my_lr", "dry_run=true", f"output_root={tmp_path / 'out'}"],
                   env=no_user_dir(**{paths.ENV_VAR: str(user_dir)}))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("model     : my_model (hub: my-org/my-model-1b)") == 2, proc.stdout[-3000:]
    assert "lr=1e-05" in proc.stdout and "lr=3e-05" in proc.stdout


def test_an_unknown_sweep_lists_the_users_too(with_user_dir):
    from rlhf_exp.sweep import sweep_overrides

    with pytest.raises(ConfigError, match=r"no such sweep\. Sweeps \(in .*my_configs/sweeps\): dpo_beta, my_lr"):
        sweep_overrides("nope")
    assert sweep_overrides("my_lr") == ["model=my_model", "phase.learning_rate=1e-5,3e-5"]


def test_the_folders_travel_in_hydras_overrides(with_user_dir, monkeypatch):
    """A SLURM or submitit job composes again on its node from the sweep's Hydra overrides
    (load_sweep_config), where RLHF_EXP_CONFIG_DIR may not be set: the search path is among them."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import rlhf_exp.cli  # noqa: F401  (registers the schemas)

    searchpath = paths.searchpath_overrides()
    assert searchpath == [f"hydra.searchpath=[file://{with_user_dir.resolve()}]"]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(paths.CONF_DIR), version_base="1.3", job_name="rlhf_exp"):
            master = compose(config_name="config", overrides=[*searchpath, "model=my_model"], return_hydra_config=True)
            assert searchpath[0] in master.hydra.overrides.hydra
            monkeypatch.delenv(paths.ENV_VAR)
            job = GlobalHydra.instance().config_loader().load_sweep_config(master, ["model=my_model"])
    finally:
        GlobalHydra.instance().clear()
    assert job.model.name == "my_model"


def test_config_dir_flags_become_the_variable(user_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(paths.ENV_VAR, "")  # restored after the test
    other = tmp_path / "team_configs"
    other.mkdir()
    rest = paths.take_config_dirs(["-cd", str(user_dir), "model=x", f"--config-dir={other}", "-m",
                                   f"hydra.searchpath=[file://{user_dir}]"])
    assert rest == ["model=x", "-m"]
    assert paths.user_config_dirs() == [user_dir.resolve(), other.resolve()]
    with pytest.raises(ConfigError, match="--config-dir needs a folder"):
        paths.take_config_dirs(["--config-dir"])
    with pytest.raises(ConfigError, match="no such folder"):
        paths.take_config_dirs(["--config-dir", str(tmp_path / "nope")])
    with pytest.raises(ConfigError, match=r"only folders \(file://\.\.\.\) can be added"):
        paths.take_config_dirs(["hydra.searchpath=[pkg://somewhere]"])
    monkeypatch.setenv(paths.ENV_VAR, str(tmp_path / "gone"))
    with pytest.raises(ConfigError, match=f"{paths.ENV_VAR}=.*gone is not a folder"):
        paths.user_config_dirs()


@pytest.mark.parametrize("name", ["model/tiny", "model/base_model", "config", "sweeps/dpo_beta"])
def test_a_name_of_ours_is_refused(with_user_dir, name):
    """Hydra would read ours and ignore the user's file without a word: refused, naming both files."""
    (with_user_dir / f"{name}.yaml").write_text("name: mine\n")
    with pytest.raises(ConfigError) as info:
        paths.check_config_dirs()
    message = str(info.value)
    assert message.startswith(f"{with_user_dir.resolve() / name}.yaml: ") and "already defined by" in message
    assert "rename yours" in message and "\n" not in message


def test_a_name_in_two_user_folders_is_refused_through_the_cli(user_dir, tmp_path):
    second = tmp_path / "second" / "model"
    second.mkdir(parents=True)
    (second / "my_model.yaml").write_text(MY_MODEL)
    proc = run_cli(["dry_run=true"], env=no_user_dir(**{paths.ENV_VAR: os.pathsep.join([str(user_dir), str(second.parent)])}))
    assert proc.returncode == 2
    assert proc.stderr == (f"rlhf_exp: error: {second / 'my_model.yaml'}: model=my_model is already defined by "
                           f"{user_dir.resolve() / 'model' / 'my_model.yaml'}. A name means one file: rename yours "
                           "(e.g. my_model_mine.yaml) and pick it by that name\n")


# ------------------------------------------------------------------------------- the wheel


def _build_wheel(tmp_path: Path) -> Path:
    """A wheel of the repository's files, built from a copy (pip builds in the source tree, and the clone
    is shared); a site's local.yaml is planted in the copy to check that it stays out."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("rlhf_exp", "conf", "sweeps"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    (src / "conf" / "site" / "local.yaml").write_text("# @package _global_\nlauncher:\n  account: secret\n")
    # offline when this venv can build the wheel itself (setuptools >= 70.1 carries bdist_wheel)
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", *isolation, "-w",
                           str(tmp_path / "dist"), "-q"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("rlhf_exp-*.whl")
    return wheel


@pytest.mark.slow
def test_a_wheel_carries_the_configs_and_runs_from_any_folder(tmp_path, user_dir):
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    ours = {f"rlhf_exp/conf/{p.relative_to(ROOT / 'conf').as_posix()}" for p in (ROOT / "conf").rglob("*")
            if p.is_file() and p.suffix in (".yaml", ".md") and p != ROOT / "conf" / "site" / "local.yaml"}
    ours |= {f"rlhf_exp/sweeps/{p.name}" for p in (ROOT / "sweeps").glob("*.yaml")}
    ours |= {f"rlhf_exp/templates/{p.name}" for p in (ROOT / "rlhf_exp" / "templates").glob("*.jinja")}
    assert ours <= names, sorted(ours - names)
    assert "rlhf_exp/conf/site/local.yaml" not in names

    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel), "-q"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = no_user_dir(PYTHONPATH=str(site))
    where = subprocess.run([sys.executable, "-c", "import rlhf_exp; from rlhf_exp.config import paths; "
                            "print(rlhf_exp.__file__, paths.CONF_DIR, paths.SWEEPS_DIR, sep='\\n')"],
                           cwd=elsewhere, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr[-2000:]
    assert where.stdout.split() == [str(site / "rlhf_exp" / "__init__.py"), str(site / "rlhf_exp" / "conf"),
                                    str(site / "rlhf_exp" / "sweeps")]

    out = f"output_root={tmp_path / 'out'}"
    plain = run_cli(["dry_run=true", out], cwd=elsewhere, env=env)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert "model     : tiny (embedded)" in plain.stdout and "dry run: nothing loaded" in plain.stdout
    mine = run_cli(["-m", "sweep=my_lr", "dry_run=true", out], cwd=elsewhere,
                   env={**env, paths.ENV_VAR: str(user_dir)})
    assert mine.returncode == 0, mine.stderr[-2000:]
    assert mine.stdout.count("model     : my_model (hub: my-org/my-model-1b)") == 2
    assert not (tmp_path / "out").exists() and not list(elsewhere.iterdir())
