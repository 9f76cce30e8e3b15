"""Where configs come from: ours, then the user's own folders.

Ours are ``conf/`` and ``sweeps/``. In a clone (and an editable install) they are the folders at the
top of the repository, so an edit there counts at once; an installed wheel carries copies inside the
package (``rlhf_exp/conf``, ``rlhf_exp/sweeps``, mapped in pyproject.toml), used when there is no clone.

A user's presets (a model, a data set, a hardware node, a site, a sweep) live in folders of their own,
named by ``RLHF_EXP_CONFIG_DIR`` (one folder, or several separated by ``os.pathsep``) or by
``--config-dir DIR`` on the command line (the same thing: it is added to the variable, so the processes
a run starts see it too). Such a folder is laid out like ``conf/`` (``model/my_model.yaml``,
``site/local.yaml``, ...) plus ``sweeps/<name>.yaml``. Every reader goes through here: our preflight
compose, ``--help``, the "Valid options" of an error, ``sweep=<name>``; Hydra's own job gets the same
folders as a ``hydra.searchpath`` override on its command line, which Hydra records with the run's
Hydra overrides, so a job that composes again (a SLURM or submitit job, on another machine) finds them
without the variable.

A name means one file: Hydra takes the first match along its search path, and ours come first, so a user
file with the name of one of ours (or of another user folder's) would be silently ignored. Such a clash
is refused with the two paths instead.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ENV_VAR = "RLHF_EXP_CONFIG_DIR"
PACKAGE_DIR = Path(__file__).resolve().parents[1]
# sub-folders of a config folder that are not config groups (recipes are picked from model x phase;
# sweeps/ holds sweep files; hydra/ holds Hydra's own groups)
NOT_GROUPS = ("recipe", "sweeps", "hydra")


def _ours(name: str) -> Path:
    """The clone's folder when rlhf_exp runs from a clone (pyproject.toml beside the package), else the
    copy inside the installed package."""
    clone = PACKAGE_DIR.parent
    if (clone / "pyproject.toml").is_file() and (clone / name).is_dir():
        return clone / name
    return PACKAGE_DIR / name


CONF_DIR = _ours("conf")
SWEEPS_DIR = _ours("sweeps")


def _error(message: str):
    from rlhf_exp.config.errors import ConfigError

    return ConfigError(message)


def user_config_dirs() -> list[Path]:
    """The user's config folders, in search order (from ``RLHF_EXP_CONFIG_DIR``)."""
    dirs: list[Path] = []
    for part in os.environ.get(ENV_VAR, "").split(os.pathsep):
        if not part.strip():
            continue
        path = Path(part).expanduser().resolve()
        if not path.is_dir():
            raise _error(f"{ENV_VAR}={os.environ[ENV_VAR]}: {part} is not a folder. Give folders of your own "
                         f"presets (e.g. <folder>/model/<name>.yaml), separated by '{os.pathsep}'")
        if path != CONF_DIR and path not in dirs:
            dirs.append(path)
    return dirs


def config_dirs() -> list[Path]:
    """Every config folder, in Hydra's search order: ours, then the user's."""
    return [CONF_DIR, *user_config_dirs()]


def sweep_dirs() -> list[Path]:
    return [SWEEPS_DIR, *(d / "sweeps" for d in user_config_dirs() if (d / "sweeps").is_dir())]


def _add_dirs(folders: list[str]) -> None:
    given = [p for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p.strip()]
    for folder in folders:
        path = Path(folder).expanduser().resolve()
        if not path.is_dir():
            raise _error(f"--config-dir {folder}: no such folder ({path}). Give a folder of your own presets "
                         "(e.g. <folder>/model/<name>.yaml)")
        if str(path) not in given:
            given.append(str(path))
    os.environ[ENV_VAR] = os.pathsep.join(given)


def take_config_dirs(argv: list[str]) -> list[str]:
    """Move ``--config-dir DIR`` (``-cd DIR``, ``--config-dir=DIR``) and ``hydra.searchpath=[file://...]``
    from the command line into ``RLHF_EXP_CONFIG_DIR``; returns the rest of the command line.
    ``hydra.searchpath`` is what rlhf_exp itself hands Hydra, so a command copied from a manifest runs."""
    rest, folders = [], []
    args = iter(argv)
    for arg in args:
        if arg in ("--config-dir", "-cd"):
            folder = next(args, None)
            if folder is None or folder.startswith("-"):
                raise _error(f"{arg} needs a folder: {arg} <folder of your own presets>")
            folders.append(folder)
        elif arg.startswith("--config-dir="):
            folders.append(arg.split("=", 1)[1])
        elif arg.split("=", 1)[0] == "hydra.searchpath":
            folders += _searchpath_folders(arg)
        else:
            rest.append(arg)
    if folders:
        _add_dirs(folders)
    return rest


def _searchpath_folders(arg: str) -> list[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        value = OverridesParser.create().parse_overrides([arg])[0].value()
    except Exception as exc:
        raise _error(f"{arg}: {str(exc).splitlines()[0]}") from None
    entries = value if isinstance(value, list) else [value]
    if not all(isinstance(e, str) and e.startswith("file://") for e in entries):
        raise _error(f"{arg}: only folders (file://...) can be added; give them as {ENV_VAR}=<folder> or "
                     "--config-dir <folder>")
    return [e.removeprefix("file://") for e in entries]


def _quote(text: str) -> str:
    """A value in Hydra's override grammar (quoted only when it must be)."""
    if re.fullmatch(r"[\w./:@+~-]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def searchpath_overrides() -> list[str]:
    """The Hydra override that adds the user's folders (none without them)."""
    dirs = user_config_dirs()
    return [f"hydra.searchpath=[{','.join(_quote(f'file://{d}') for d in dirs)}]"] if dirs else []


def _yaml_names(folder: Path, skip: tuple[str, ...]) -> dict[str, Path]:
    """``group/option`` (or ``config``) -> file, for each YAML file under a config folder."""
    names = {}
    for path in sorted(folder.rglob("*.yaml")):
        rel = path.relative_to(folder)
        if rel.parts[0] in skip or any(p.startswith(".") for p in rel.parts):
            continue
        names[rel.with_suffix("").as_posix()] = path
    return names


def _stored_names() -> list[str]:
    """The schemas registered in Hydra's ConfigStore (``base_config``, ``model/base_model``, ...)."""
    from hydra.core.config_store import ConfigStore

    def walk(node: dict, prefix: str):
        for key, value in node.items():
            if isinstance(value, dict):
                if prefix or key != "hydra":
                    yield from walk(value, f"{prefix}{key}/")
            elif key.endswith(".yaml"):
                yield prefix + key.removesuffix(".yaml")

    return list(walk(ConfigStore.instance().repo, ""))


def check_config_dirs() -> None:
    """Ours are there, the user's folders exist, and no user file has the name of another config."""
    if not (CONF_DIR / "config.yaml").is_file():
        raise _error(f"no configs at {CONF_DIR}: this copy of rlhf_exp lacks its conf/ folder. Reinstall it "
                     "(pip install <wheel>, or pip install -e . in a clone)")
    users = user_config_dirs()
    if not users:
        return
    owner = {name: str(path) for name, path in _yaml_names(CONF_DIR, ("hydra",)).items()}
    owner.update({name: f"rlhf_exp's schema ({name})" for name in _stored_names() if name not in owner})
    owner.update({f"sweeps/{p.stem}": str(p) for p in SWEEPS_DIR.glob("*.yaml")})
    for folder in users:
        names = _yaml_names(folder, ("hydra", "sweeps"))
        names.update({f"sweeps/{p.stem}": p for p in (folder / "sweeps").glob("*.yaml")})
        for name, path in names.items():
            if name in owner:
                group, _, option = name.rpartition("/")
                what = f"sweep={option}" if group == "sweeps" else f"{group}={option}" if group else f"'{name}'"
                raise _error(f"{path}: {what} is already defined by {owner[name]}. A name means one file: rename "
                             f"yours (e.g. {option}_mine.yaml) and pick it by that name")
            owner[name] = str(path)


def config_file(name: str) -> Path | None:
    """The file Hydra reads for ``group/option`` (the first along the search path)."""
    for folder in config_dirs():
        if (folder / f"{name}.yaml").is_file():
            return folder / f"{name}.yaml"
    return None
