"""Sweeps: named sweep files, and a summary of every multirun.

``sweep=<name>`` on the command line stands for the overrides written in ``sweeps/<name>.yaml`` (ours, or
``<folder>/sweeps/<name>.yaml`` in a user's config folder, see rlhf_exp/config/paths.py; a Hydra
``_global_`` config: ``override /group: option`` defaults, fixed settings, ``hydra.sweeper`` settings and
``hydra.sweeper.params``); the CLI expands it before anything else, so the preflight checks every swept
value and each job's ``.hydra/overrides.yaml`` and manifest record real values. Overrides given on the
command line replace the file's for the same key.

When a multirun ends, :class:`SweepSummary` (a Hydra callback, registered in conf/config.yaml) scans the
job folders under ``hydra.sweep.dir`` and writes ``sweep_summary.json`` and ``sweep_summary.md`` there, and
prints the table. It reads only files on disk (manifest.json, summary.json, .hydra/), so jobs that ran on
SLURM nodes are covered, and it also writes the summary when the sweep stops early (Ctrl-C, a job that
exits, a sweeper that raises: Hydra skips on_multirun_end then).
``python -m rlhf_exp.sweep <sweep folder>`` rebuilds it by hand. No torch here.
"""

from __future__ import annotations

import atexit
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from rlhf_exp.config.errors import ConfigError
from rlhf_exp.config.paths import SWEEPS_DIR as SWEEPS_DIR  # ours, re-exported
from rlhf_exp.config.paths import sweep_dirs
from rlhf_exp.tracking.run import command_line, now_iso, write_json_atomic, write_text_atomic
from rlhf_exp.tracking.secrets import scrub, scrub_files

# the sweep objective, as the Hydra task returns it: gold score (higher is better), else eval loss (lower)
OBJECTIVES = (("gold_score", "maximize"), ("eval_loss", "minimize"))
# metrics shown in the table besides the objective, when jobs have them
SHOWN_METRICS = ("gold_score", "eval_loss", "eval_accuracy", "eval_rewards_accuracies", "kl", "reward")


# ----------------------------------------------------------------------------------- sweep files


def sweep_names() -> list[str]:
    return sorted({p.stem for folder in sweep_dirs() for p in folder.glob("*.yaml")})


def sweep_file(name: str) -> Path | None:
    return next((folder / f"{name}.yaml" for folder in sweep_dirs() if (folder / f"{name}.yaml").is_file()), None)


def _render(value: Any) -> str:
    """A config value in Hydra's override grammar."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(_render(v) for v in value) + "]"
    text = str(value)
    return text if re.fullmatch(r"[\w./:@-]+", text) else "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _leaves(node: Any, prefix: str) -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        return [leaf for k, v in node.items() for leaf in _leaves(v, f"{prefix}.{k}" if prefix else str(k))]
    return [(prefix, node)]


def sweep_overrides(name: str) -> list[str]:
    """``sweeps/<name>.yaml`` as command-line overrides: group choices, fixed values, then swept params."""
    path = sweep_file(name)
    if path is None:
        where = ", ".join(str(folder) for folder in sweep_dirs())
        raise ConfigError(f"sweep={name}: no such sweep. Sweeps (in {where}): {', '.join(sweep_names())}")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    out = []
    for entry in cfg.pop("defaults", []):
        (key, option), = entry.items() if isinstance(entry, dict) else [(entry, None)]
        if not key.startswith("override /") or option is None:
            raise ConfigError(f"{path}: defaults may only hold 'override /<group>: <option>' entries, not {entry!r}")
        out.append(f"{key.removeprefix('override /')}={option}")
    params = cfg.get("hydra", {}).get("sweeper", {}).pop("params", None) or {}
    out += [f"{key}={_render(value)}" for key, value in _leaves(cfg, "")]
    return out + [f"{key}={value}" for key, value in params.items()]


def _override_key(arg: str) -> str:
    return arg.split("=", 1)[0].lstrip("+~")


def expand_sweep(argv: list[str]) -> list[str]:
    """Replace ``sweep=<name>`` in a command line by the sweep file's overrides (the command line's own
    overrides win for the same key)."""
    named = [a for a in argv if a.startswith("sweep=")]
    if not named:
        return argv
    if len(named) > 1:
        raise ConfigError(f"one sweep at a time: {' '.join(named)}")
    own = {_override_key(a) for a in argv if "=" in a and not a.startswith(("-", "sweep="))}
    expanded = [o for o in sweep_overrides(named[0].split("=", 1)[1]) if _override_key(o) not in own]
    i = argv.index(named[0])
    return argv[:i] + expanded + argv[i + 1:]


# ----------------------------------------------------------------------------------- the summary


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _parse(overrides: list[str]) -> dict[str, Any]:
    """key -> value of each override (typed as Hydra reads it); sweeps and unparsable ones stay text."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, out = OverridesParser.create(), {}
    for text in overrides:
        try:
            override = parser.parse_overrides([text])[0]
            value = override.value() if not override.is_sweep_override() else text.split("=", 1)[1]
            out[override.key_or_group] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        except Exception:  # a malformed line in a hand-edited file: keep it as text
            key, _, value = text.partition("=")
            out[key.lstrip("+~")] = value
    return out


def _swept_keys(config: DictConfig | dict | None) -> list[str]:
    """Keys the multirun's command line or hydra.sweeper.params sweep (choice, range, interval, ...)."""
    if config is None:
        return []
    hydra_cfg = config.get("hydra") or {}
    task = list((hydra_cfg.get("overrides") or {}).get("task") or [])
    params = (hydra_cfg.get("sweeper") or {}).get("params") or {}
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, keys = OverridesParser.create(), []
    for text in [*task, *(f"{k}={v}" for k, v in params.items())]:
        try:
            override = parser.parse_overrides([text])[0]
        except Exception:
            continue
        if override.is_sweep_override() and override.key_or_group not in keys:
            keys.append(override.key_or_group)
    return keys


def _job(folder: Path) -> dict[str, Any]:
    manifest = _read_json(folder / "manifest.json")
    summary = _read_json(folder / "summary.json") or {}
    hydra_cfg = _read_yaml(folder / ".hydra" / "hydra.yaml") or {}
    num = ((hydra_cfg.get("hydra") or {}).get("job") or {}).get("num")
    job = {
        "job": num if isinstance(num, int) else None,
        "run_id": (manifest or {}).get("run_id", folder.name),
        "path": str(folder.resolve()),
        "status": manifest.get("status", "unknown") if manifest else "unknown",
        "overrides": _read_yaml(folder / ".hydra" / "overrides.yaml") or [],
        "metrics": summary.get("metrics") or {},
    }
    if manifest is None:
        job["error"] = "no manifest.json: the job did not start its run (it failed before, or never ran)"
    elif manifest.get("error"):
        job["error"] = manifest["error"]
    return job


def _select(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        else None


def summarize(sweep_dir: str | Path, config: DictConfig | dict | None = None, command: str | None = None) -> dict:
    """Gather every job folder of a sweep: status, swept values, final metrics, objective, best job.
    ``config`` is the multirun's config (names the swept keys); without it, multirun.yaml in the folder
    is read, and keys whose value differs between jobs count as swept too. ``command`` defaults to the
    first job's manifest's."""
    sweep_dir = Path(sweep_dir).resolve()
    folders = [d for d in sorted(sweep_dir.iterdir()) if d.is_dir() and not d.name.startswith(".")
               and ((d / ".hydra").is_dir() or (d / "manifest.json").is_file())] if sweep_dir.is_dir() else []
    jobs = [_job(d) for d in folders]
    jobs.sort(key=lambda j: (j["job"] is None, j["job"] if j["job"] is not None else 0, j["run_id"]))
    if config is None:
        config = _read_yaml(sweep_dir / "multirun.yaml")
    values = [_parse(j["overrides"]) for j in jobs]
    swept = _swept_keys(config)
    for values_of_job in values:
        for key in values_of_job:
            if key not in swept and len({repr(v.get(key)) for v in values}) > 1:
                swept.append(key)
    for job, values_of_job in zip(jobs, values):
        missing = [key for key in swept if key not in values_of_job]
        resolved = _read_yaml(Path(job["path"]) / "config.yaml") if missing else None
        for key in missing:  # no .hydra/overrides.yaml (hydra.output_subdir=null): the value the run used
            values_of_job[key] = _select(resolved, key)
    metric, direction = next(((m, d) for m, d in OBJECTIVES
                              if any(_number(j["metrics"].get(m)) is not None for j in jobs)), (None, None))
    best = None
    for job, values_of_job in zip(jobs, values):
        job["params"] = {key: values_of_job.get(key) for key in swept}
        job["objective"] = _number(job["metrics"].get(metric)) if metric else None
        if job["status"] == "succeeded" and job["objective"] is not None and (
                best is None or (job["objective"] > best["objective"]) == (direction == "maximize")):
            best = job
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job["status"]] = counts.get(job["status"], 0) + 1
    if command is None:
        command = next((m["command"] for d in folders if (m := _read_json(d / "manifest.json")) and "command" in m), None)
    return {
        "sweep_dir": str(sweep_dir),
        "command": command,
        "written": now_iso(),
        "jobs_total": len(jobs),
        "counts": counts,
        "swept": swept,
        "objective": {"metric": metric, "direction": direction} if metric else None,
        "best": {k: best[k] for k in ("job", "run_id", "path", "params", "objective")} if best else None,
        "jobs": [{k: j[k] for k in ("job", "run_id", "path", "status", "params", "objective", "error", "metrics",
                                    "overrides") if k in j} for j in jobs],
    }


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "" if value is None else str(value)


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a Markdown table, best job marked with *."""
    objective = (summary["objective"] or {}).get("metric")
    shown = [m for m in SHOWN_METRICS if m != objective and any(m in j["metrics"] for j in summary["jobs"])]
    best = (summary["best"] or {}).get("path")
    head = ["job", "run id", "status", *summary["swept"], *([objective] if objective else []), *shown, "note"]
    rows = []
    for j in summary["jobs"]:
        mark = " *" if j["path"] == best else ""
        objective_cell = [_fmt(j["objective"]) + mark] if objective else []
        note = (j.get("error") or "").splitlines()[0][:80] if j.get("error") else ""
        rows.append([_fmt(j["job"]), j["run_id"], j["status"], *(_fmt(j["params"].get(k)) for k in summary["swept"]),
                     *objective_cell, *(_fmt(_number(j["metrics"].get(m))) for m in shown), note.replace("|", "/")])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


LAST_SUMMARY: dict | None = None  # the summary written last in this process (the CLI's exit status reads it)


def write_summary(sweep_dir: str | Path, config: DictConfig | dict | None = None, command: str | None = None,
                  echo: bool = True) -> dict:
    """Write sweep_summary.json and sweep_summary.md into the sweep folder (and print the table)."""
    summary = scrub(summarize(sweep_dir, config, command))
    folder = Path(summary["sweep_dir"])
    scrub_files(folder)  # Hydra's multirun.yaml holds the command line's overrides
    if not folder.is_dir():
        return summary
    counts = ", ".join(f"{n} {status}" for status, n in summary["counts"].items()) or "no jobs"
    best = summary["best"]
    headline = f"sweep {folder}: {counts}"
    if best:
        job = " ".join([f"job {_fmt(best['job'])}" + (":" if best["params"] else ""),
                        *(f"{k}={_fmt(v)}" for k, v in best["params"].items())])
        headline += f"; best {summary['objective']['metric']} {best['objective']:.4g} ({job})"
    table = format_table(summary)
    global LAST_SUMMARY
    LAST_SUMMARY = summary
    write_json_atomic(folder / "sweep_summary.json", summary)
    write_text_atomic(folder / "sweep_summary.md", f"# {headline}\n\n{table}")
    if echo:
        print(f"\nrlhf_exp: {headline}\n{table}rlhf_exp: {folder / 'sweep_summary.json'}", flush=True)
    write_plots(folder, echo)
    return summary


def write_plots(folder: Path, echo: bool = True) -> None:
    """The compare plots of this sweep into <sweep>/plots/ (rlhf_exp/compare.py); a failure is one warning line,
    never the sweep's."""
    try:
        from rlhf_exp.compare import write_sweep_plots

        write_sweep_plots(folder, echo=echo)
    except Exception as exc:  # (no matplotlib, a bad metrics.jsonl, ...: the summary stands)
        first = (str(exc).splitlines() or [""])[0][:200]
        print(f"rlhf_exp: warning: sweep plots not written ({type(exc).__name__}: {first})", file=sys.stderr, flush=True)


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, summarize its job folders (see the module doc)."""

    def __init__(self) -> None:
        self._pending: tuple[Path, DictConfig] | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("dry_run") or config.get("pipeline") is not None:  # a pipeline's job: pipeline_summary.json
            return
        # a failed job makes the sweeper raise, and Hydra then skips on_multirun_end: write at exit instead
        self._pending = (Path(str(config.hydra.sweep.dir)).resolve(), config)
        atexit.register(self._write_pending)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("dry_run") or config.get("pipeline") is not None:
            return
        self._pending = (Path(str(config.hydra.sweep.dir)).resolve(), config)
        atexit.unregister(self._write_pending)
        self._write_pending()

    def _write_pending(self) -> None:
        if self._pending is not None:
            sweep_dir, config = self._pending
            self._pending = None
            write_summary(sweep_dir, config, command=command_line())


def main(argv: list[str] | None = None) -> None:
    folders = sys.argv[1:] if argv is None else argv
    if not folders or folders[0] in ("-h", "--help"):
        print("usage: python -m rlhf_exp.sweep <sweep folder> [...]   (writes sweep_summary.json/.md there)",
              file=sys.stderr)
        sys.exit(2)
    for folder in folders:
        if not Path(folder).is_dir():
            print(f"rlhf_exp: error: {folder}: no such folder", file=sys.stderr)
            sys.exit(2)
        write_summary(folder)


if __name__ == "__main__":
    main()
