"""Compare runs: any number of sweep folders and run folders merged into one table, and plots.

``python -m rlhf_exp.compare <sweep folders and/or run folders ...> [--out DIR]`` reads only files on disk
(manifest.json, summary.json, metrics.jsonl, config.yaml, .hydra/; no W&B) and writes into ``--out``:

- ``compare.csv`` / ``compare.md``: one row per run: run id, phase, status, its overrides as ``key=value``
  (only the keys whose value differs between the rows; the phase has its own column), final metrics;
- ``compare.json``: the rows, and the numbers each plot shows (``plots.<name>``);
- PNG plots, each only where its data exists. PPO: ``ppo_frontier.png`` (final proxy reward and gold
  score against final KL, one point per run, the reward-KL Pareto frontier drawn), ``ppo_overoptimisation.png``
  (proxy reward and gold reward against KL and against sqrt(KL) along each run), ``ppo_training_curves.png``
  (reward, KL, gold against step). DPO: ``dpo_beta.png`` (gold score and preference accuracy against beta).

``--out`` defaults to ``<output_root>/compare/<time>/`` when every given folder lies under the same output
root (``<root>/sweeps/...``, ``<root>/runs/...``), else ``./compare/<time>/``. At the end of every sweep,
:func:`write_sweep_plots` draws the sweep's own plots into ``<sweep>/plots/`` (rlhf_exp/sweep.py).
matplotlib is imported only when a plot is drawn; no torch here. See docs/compare.md.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import math
import sys
from pathlib import Path
from typing import Any

from rlhf_exp.sweep import _job, _number, _parse, _read_json, _read_yaml, _render, _select
from rlhf_exp.tracking.run import now_iso, read_metrics, write_json_atomic, write_text_atomic

# metrics first in the table when runs have them; the CSV and JSON hold every numeric final metric
FIRST_METRICS = ("gold_score", "gold_score_initial", "reward", "kl", "eval_rewards_accuracies", "eval_loss",
                 "eval_accuracy", "steps")
# overrides that say where a run wrote, not what it did: never a column
NOT_SETTINGS = ("output_root", "dry_run")
NOT_SETTING_PREFIXES = ("hydra.", "logger.", "wandb.")


# ----------------------------------------------------------------------------------- collecting runs


def is_run_folder(folder: Path) -> bool:
    """A run folder (a single run or a sweep's job): what rlhf_exp.sweep.summarize counts as a job."""
    return folder.is_dir() and ((folder / "manifest.json").is_file() or (folder / ".hydra").is_dir())


def job_folders(sweep_dir: Path) -> list[Path]:
    return [d for d in sorted(sweep_dir.iterdir()) if not d.name.startswith(".") and is_run_folder(d)]


def output_root_of(folder: Path) -> Path | None:
    """``<root>`` of ``<root>/runs/<run>``, ``<root>/sweeps/<time>`` or ``<root>/sweeps/<time>/<job>``."""
    folder = folder.resolve()
    for up in (folder.parent, folder.parent.parent):
        if up.name in ("runs", "sweeps"):
            return up.parent
    return None


def _row(folder: Path, source: str) -> dict[str, Any]:
    job = _job(folder)
    manifest = _read_json(folder / "manifest.json") or {}
    summary = _read_json(folder / "summary.json") or {}
    phase = manifest.get("phase") or summary.get("phase")
    if phase is None:
        choices = ((_read_yaml(folder / ".hydra" / "hydra.yaml") or {}).get("hydra") or {}).get("runtime", {})
        phase = (choices.get("choices") or {}).get("phase")
    return {"run_id": job["run_id"], "phase": phase or "?", "status": job["status"], "source": source,
            "path": job["path"], "job": job["job"], "overrides_all": list(job["overrides"]),
            "metrics": job["metrics"], **({"error": job["error"]} if "error" in job else {})}


def collect(paths: list[str | Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of the given sweep and run folders (in the order given; a sweep's jobs by job number), and
    one warning line per folder that is neither. Each run once, however often it is named."""
    rows, warnings, seen = [], [], set()
    for given in paths:
        path = Path(given)
        if is_run_folder(path):
            folders, source = [path], "run"
        else:
            folders = job_folders(path) if path.is_dir() else []
            source = f"sweep {path.resolve().name}"
            if not folders:
                warnings.append(f"rlhf_exp: warning: {given}: neither a run folder nor a sweep folder, skipped")
                continue
        batch = [_row(f, source) for f in folders if f.resolve() not in seen]
        seen.update(f.resolve() for f in folders)
        batch.sort(key=lambda r: (r["job"] is None, r["job"] if r["job"] is not None else 0, r["run_id"]))
        rows += batch
    _add_params(rows)
    return rows, warnings


def _is_setting(key: str) -> bool:
    return key != "phase" and key not in NOT_SETTINGS and not key.startswith(NOT_SETTING_PREFIXES)


_ABSENT = object()


def _value_in_run(row: dict[str, Any], key: str, cache: dict[str, Any]) -> Any:
    """The value a run used for a key it did not override: a config group's choice (.hydra/hydra.yaml),
    else the resolved config.yaml; ``_ABSENT`` when the run's config has no such key."""
    folder = Path(row["path"])
    if "choices" not in cache:
        hydra_cfg = _read_yaml(folder / ".hydra" / "hydra.yaml") or {}
        cache["choices"] = ((hydra_cfg.get("hydra") or {}).get("runtime") or {}).get("choices") or {}
        cache["config"] = _read_yaml(folder / "config.yaml")
    if key in cache["choices"]:
        return cache["choices"][key]
    node = cache["config"]
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return _ABSENT if isinstance(node, (dict, list)) else node


def _add_params(rows: list[dict[str, Any]]) -> None:
    """Each row's ``params``: the overridden keys whose value differs between the rows it applies to (a key
    one run overrides and another leaves at its default is read from the other's own config)."""
    parsed = [_parse(r["overrides_all"]) for r in rows]
    keys: list[str] = []
    for values in parsed:
        keys += [k for k in values if _is_setting(k) and k not in keys]
    caches: list[dict[str, Any]] = [{} for _ in rows]
    full: list[dict[str, Any]] = [{} for _ in rows]
    for key in keys:
        for i, (row, values) in enumerate(zip(rows, parsed)):
            value = values[key] if key in values else _value_in_run(row, key, caches[i])
            if value is not _ABSENT:
                full[i][key] = value
    differing = [k for k in keys if len({repr(f[k]) for f in full if k in f}) > 1]
    for row, values in zip(rows, full):
        row["params"] = {k: values[k] for k in differing if k in values}


def _show(key: str, value: Any) -> str:
    if key.endswith("_run") and isinstance(value, str):  # a parent run: its folder name, not the whole path
        value = Path(value).name
    return _render(value)


def overrides_text(row: dict[str, Any], short: bool = False) -> str:
    """``key=value ...`` of a row's differing overrides (``short``: the last part of each key, for labels)."""
    return " ".join(f"{k.rsplit('.', 1)[-1] if short else k}={_show(k, v)}" for k, v in row["params"].items())


def labels(rows: list[dict[str, Any]], leave_out: tuple[str, ...] = ()) -> list[str]:
    """Plot labels of some rows: ``key=value`` (last part of each key) of the overrides that differ between
    these rows; the run id where none does."""
    keys = [k for k in dict.fromkeys(k for r in rows for k in r["params"]) if k not in leave_out
            and len({repr(r["params"].get(k)) for r in rows}) > 1]
    return [" ".join(f"{k.rsplit('.', 1)[-1]}={_show(k, r['params'][k])}" for k in keys if k in r["params"])
            for r in rows]


# ----------------------------------------------------------------------------------- the table


def metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for row in rows:
        names += [k for k, v in row["metrics"].items() if _number(v) is not None and k not in names]
    return [m for m in FIRST_METRICS if m in names] + [m for m in names if m not in FIRST_METRICS]


def to_csv(rows: list[dict[str, Any]]) -> str:
    metrics = metric_columns(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run_id", "phase", "status", "overrides", *metrics, "source", "path"])
    for row in rows:
        values = [_number(row["metrics"].get(m)) for m in metrics]
        writer.writerow([row["run_id"], row["phase"], row["status"], overrides_text(row),
                         *("" if v is None else repr(row["metrics"][m]) for m, v in zip(metrics, values)),
                         row["source"], row["path"]])
    return buffer.getvalue()


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def to_markdown(rows: list[dict[str, Any]]) -> str:
    shown = [m for m in metric_columns(rows) if m in FIRST_METRICS]
    head = ["run id", "phase", "status", "overrides", *shown, "source"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["run_id"], row["phase"], row["status"], overrides_text(row),
                 *(_fmt(_number(row["metrics"].get(m))) for m in shown), row["source"]]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- what the plots show


def signed_sqrt(x: float) -> float:
    """sqrt(KL), keeping the sign of a (noisy, estimated) negative KL."""
    return math.copysign(math.sqrt(abs(x)), x)


def pareto(points: list[dict[str, Any]]) -> list[str]:
    """Run ids on the reward-KL frontier: no other run has at most its KL and more reward."""
    out, best = [], -math.inf
    for p in sorted(points, key=lambda p: (p["kl"], -p["reward"])):
        if p["reward"] > best:
            out.append(p["run_id"])
            best = p["reward"]
    return out


def _ppo_series(row: dict[str, Any], name: str) -> dict[str, Any] | None:
    """A PPO run's steps from its metrics.jsonl: proxy reward (ppo/reward, the RM score), KL (ppo/kl), gold
    reward of the same rollouts (ppo/gold_reward) and the eval gold scores (eval/gold_score)."""
    try:
        records = read_metrics(Path(row["path"]) / "metrics.jsonl")
    except ValueError as exc:  # a damaged line: this run's curves are left out, the rest is drawn
        print(f"rlhf_exp: warning: {exc}; its curves are left out", file=sys.stderr)
        return None
    steps = [r for r in records if _number(r.get("ppo/kl")) is not None and _number(r.get("ppo/reward")) is not None]
    if not steps:
        return None
    gold = [_number(r.get("ppo/gold_reward")) for r in steps]
    evals = [(r["step"], r["eval/gold_score"]) for r in records if _number(r.get("eval/gold_score")) is not None]
    # held-out greedy gold during training (phase.eval_steps), placed at the rollouts' KL of the same step
    kl_at = {r["step"]: float(r["ppo/kl"]) for r in steps}
    held = [(r["step"], float(r["eval/gold"]), kl_at[r["step"]]) for r in records
            if _number(r.get("eval/gold")) is not None and r.get("step") in kl_at]
    return {"run_id": row["run_id"], "label": name,
            "step": [r["step"] for r in steps],
            "kl": [float(r["ppo/kl"]) for r in steps],
            "sqrt_kl": [signed_sqrt(float(r["ppo/kl"])) for r in steps],
            "reward": [float(r["ppo/reward"]) for r in steps],
            "gold": gold if any(g is not None for g in gold) else None,
            "eval_gold": {"step": [s for s, _ in evals], "gold_score": [g for _, g in evals]},
            "held_out": {"step": [s for s, _, _ in held], "gold": [g for _, g, _ in held], "kl": [k for _, _, k in held],
                         "sqrt_kl": [signed_sqrt(k) for _, _, k in held]},
            "gold_initial": _number(row["metrics"].get("gold_score_initial"))}


def fit_gold(points: list[tuple[float, float]], g0: float) -> dict[str, float] | None:
    """Least squares of gold - g0 = d (alpha - beta d) over (d, gold) points, d = sqrt(KL) (the form Gao, Schulman
    & Hilton (2022) fit for best-of-n and RL): alpha, beta, the peak it implies (d* = alpha / (2 beta), gold there)
    and the fit's R^2. None with fewer than 3 points or a singular system."""
    if len(points) < 3:
        return None
    # minimise sum (y - a d + b d^2)^2 with y = gold - g0: normal equations in (a, -b) on regressors d, d^2
    s2 = sum(d ** 2 for d, _ in points)
    s3 = sum(d ** 3 for d, _ in points)
    s4 = sum(d ** 4 for d, _ in points)
    t1 = sum(d * (g - g0) for d, g in points)
    t2 = sum(d * d * (g - g0) for d, g in points)
    det = s2 * s4 - s3 * s3
    if abs(det) < 1e-12:
        return None
    alpha = (t1 * s4 - t2 * s3) / det
    beta = -(s2 * t2 - s3 * t1) / det
    ys = [g - g0 for _, g in points]
    mean = sum(ys) / len(ys)
    residual = sum((y - d * (alpha - beta * d)) ** 2 for (d, _), y in zip(points, ys))
    total = sum((y - mean) ** 2 for y in ys)
    fit = {"g0": g0, "alpha": alpha, "beta": beta, "points": len(points),
           "r2": 1 - residual / total if total > 0 else None}
    if beta > 0:
        peak = alpha / (2 * beta)
        fit.update(peak_sqrt_kl=peak, peak_kl=peak * peak, peak_gold=g0 + peak * (alpha - beta * peak))
    return fit


def overoptimisation(series: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Per PPO run with held-out gold during training (phase.eval_steps): the peak of held-out gold, the step and
    rollout KL where it peaks, the final held-out gold and KL; the fit of gold = g0 + d (alpha - beta d) on each
    run's rising part (held-out points up to its peak, g0 = its starting gold over every held-out prompt), and
    the same fit pooled over every run's rising part."""
    runs, pooled = [], []
    for s in series:
        held = s.get("held_out") or {}
        if not held.get("gold"):
            continue
        golds = held["gold"]
        top = max(range(len(golds)), key=lambda i: golds[i])
        entry = {"run_id": s["run_id"], "label": s["label"], "peak_gold": golds[top], "peak_step": held["step"][top],
                 "peak_kl": held["kl"][top], "final_gold": golds[-1], "final_step": held["step"][-1],
                 "final_kl": held["kl"][-1], "gold_initial": s.get("gold_initial")}
        if s.get("gold_initial") is not None:
            rising = [(max(0.0, held["sqrt_kl"][i]), golds[i]) for i in range(top + 1)]
            entry["fit"] = fit_gold([(0.0, s["gold_initial"]), *rising], s["gold_initial"])
            pooled += [(d, g - s["gold_initial"]) for d, g in rising]
        runs.append(entry)
    if not runs:
        return None
    return {"runs": runs, "pooled_fit": fit_gold([(0.0, 0.0), *pooled], 0.0) if pooled else None}


def overoptimisation_markdown(analysis: dict[str, Any]) -> str:
    lines = ["## Over-optimisation: held-out gold along each PPO run", "",
             "| run | gold at start | peak gold | at step | KL there | final gold | final KL | fit alpha | fit beta | "
             "fit peak KL | fit R^2 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in analysis["runs"]:
        fit = r.get("fit") or {}
        lines.append(f"| {r['label']} | {_fmt(r['gold_initial'])} | {_fmt(r['peak_gold'])} | {r['peak_step']} | "
                     f"{_fmt(r['peak_kl'])} | {_fmt(r['final_gold'])} | {_fmt(r['final_kl'])} | {_fmt(fit.get('alpha'))} | "
                     f"{_fmt(fit.get('beta'))} | {_fmt(fit.get('peak_kl'))} | {_fmt(fit.get('r2'))} |")
    fit = analysis.get("pooled_fit")
    if fit:
        lines += ["", f"Pooled over every run's rising part ({fit['points']} points): gold - g0 = d ({fit['alpha']:.4g} - "
                      f"{fit['beta']:.4g} d), d = sqrt(KL)" + (f"; peak at KL {fit['peak_kl']:.3g} (+{fit['peak_gold']:.3g})"
                                                                 if "peak_kl" in fit else "")
                      + (f"; R^2 {fit['r2']:.3f}" if fit.get("r2") is not None else "")]
    return "\n".join(lines) + "\n"


def _beta(row: dict[str, Any]) -> float | None:
    if "phase.beta" in row["params"]:
        return _number(row["params"]["phase.beta"])
    beta = _number(_parse(row["overrides_all"]).get("phase.beta"))
    if beta is None:
        beta = _number(_select(_read_yaml(Path(row["path"]) / "config.yaml"), "phase.beta"))
    return beta


def plot_data(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The numbers of each plot whose data exists, by plot name (the PNG is ``<name>.png``). Labels name the
    overrides that differ between the runs of that plot (else the run id)."""
    data: dict[str, dict[str, Any]] = {}
    ppo = [r for r in rows if r["phase"] == "ppo"]
    names = [n or r["run_id"] for r, n in zip(ppo, labels(ppo))]
    points = []
    for row, name in zip(ppo, names):
        kl, reward = _number(row["metrics"].get("kl")), _number(row["metrics"].get("reward"))
        if kl is not None and reward is not None:
            points.append({"run_id": row["run_id"], "label": name, "kl": kl, "reward": reward,
                           "gold_score": _number(row["metrics"].get("gold_score"))})
    if points:
        data["ppo_frontier"] = {"x": "kl", "y": ["reward", "gold_score"], "points": points, "frontier": pareto(points)}
    series = [s for s in (_ppo_series(r, n) for r, n in zip(ppo, names)) if s is not None]
    if series:
        data["ppo_overoptimisation"] = {"x": ["kl", "sqrt_kl"], "y": ["reward", "gold"], "series": series}
        analysis = overoptimisation(series)
        if analysis:
            data["ppo_overoptimisation"]["analysis"] = analysis
        data["ppo_training_curves"] = {"x": "step", "y": ["reward", "kl", "gold"], "series": series}
    dpo_rows = [r for r in rows if r["phase"] == "dpo"]
    dpo = []
    for row, group in zip(dpo_rows, labels(dpo_rows, leave_out=("phase.beta",))):
        beta = _beta(row)
        gold, accuracy = (_number(row["metrics"].get(m)) for m in ("gold_score", "eval_rewards_accuracies"))
        if beta is not None and (gold is not None or accuracy is not None):
            dpo.append({"run_id": row["run_id"], "group": group, "beta": beta, "gold_score": gold,
                        "eval_rewards_accuracies": accuracy})
    if dpo:
        dpo.sort(key=lambda p: (p["group"], p["beta"]))
        data["dpo_beta"] = {"x": "beta", "y": ["gold_score", "eval_rewards_accuracies"], "points": dpo}
    return data


# ----------------------------------------------------------------------------------- drawing


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw_frontier(plt, data: dict[str, Any]):
    points = data["points"]
    golds = [p for p in points if p["gold_score"] is not None]
    fig, axes = plt.subplots(1, 2 if golds else 1, figsize=(11 if golds else 6, 4.5), squeeze=False)
    ax = axes[0][0]
    ax.scatter([p["kl"] for p in points], [p["reward"] for p in points], zorder=3)
    front = sorted((p for p in points if p["run_id"] in data["frontier"]), key=lambda p: p["kl"])
    ax.plot([p["kl"] for p in front], [p["reward"] for p in front], "--", color="grey", label="frontier")
    for p in points:
        ax.annotate(p["label"], (p["kl"], p["reward"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="final KL to the SFT model", ylabel="final proxy reward (RM score)", title="reward-KL frontier")
    ax.legend(fontsize=7)
    if golds:
        ax = axes[0][1]
        ax.scatter([p["kl"] for p in golds], [p["gold_score"] for p in golds], color="tab:orange", zorder=3)
        for p in golds:
            ax.annotate(p["label"], (p["kl"], p["gold_score"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel="final KL to the SFT model", ylabel="final gold score", title="gold score against KL")
    return fig


def _draw_overoptimisation(plt, data: dict[str, Any]):
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), squeeze=False)
    for col, x in enumerate(("kl", "sqrt_kl")):
        for row_index, y in enumerate(("reward", "gold")):
            ax = axes[row_index][col]
            for s in data["series"]:
                if s[y] is not None:
                    line, = ax.plot(s[x], s[y], marker=".", alpha=0.35 if y == "gold" else 1, label=s["label"])
                    held = s.get("held_out") or {}
                    if y == "gold" and held.get("gold"):  # held-out greedy gold, drawn bold over the rollouts' gold
                        ax.plot(held[x], held["gold"], marker="s", color=line.get_color())
            ax.set(xlabel="KL" if x == "kl" else "sqrt(KL)",
                   ylabel="proxy reward (RM score)" if y == "reward" else "gold reward",
                   title=f"{'proxy' if y == 'reward' else 'gold'} against {'KL' if x == 'kl' else 'sqrt(KL)'}")
            if ax.lines:
                ax.legend(fontsize=7)
    fig.suptitle("over-optimisation: proxy and gold reward along each run")
    return fig


def _draw_training_curves(plt, data: dict[str, Any]):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), squeeze=False)
    for ax, y, title in zip(axes[0], ("reward", "kl", "gold"), ("proxy reward (RM score)", "KL", "gold reward")):
        for s in data["series"]:
            if s[y] is not None:
                (line,) = ax.plot(s["step"], s[y], marker=".", label=s["label"])
                if y == "gold" and s["eval_gold"]["step"]:
                    ax.plot(s["eval_gold"]["step"], s["eval_gold"]["gold_score"], "s", color=line.get_color(),
                            markersize=4)
        ax.set(xlabel="step", ylabel=title, title=title + (" (squares: eval gold score)" if y == "gold" else ""))
        if ax.lines:
            ax.legend(fontsize=7)
    return fig


def _draw_dpo(plt, data: dict[str, Any]):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), squeeze=False)
    groups: dict[str, list[dict]] = {}
    for p in data["points"]:
        groups.setdefault(p["group"], []).append(p)
    log_x = all(p["beta"] > 0 for p in data["points"])
    for ax, y, title in zip(axes[0], ("gold_score", "eval_rewards_accuracies"), ("gold score", "preference accuracy")):
        for group, points in groups.items():
            shown = [p for p in points if p[y] is not None]
            if shown:
                ax.plot([p["beta"] for p in shown], [p[y] for p in shown], marker="o", label=group or None)
        if log_x:
            ax.set_xscale("log")
        ax.set(xlabel="beta", ylabel=title, title=f"DPO: final {title} against beta")
        if any(groups):
            ax.legend(fontsize=7)
    return fig


DRAW = {"ppo_frontier": _draw_frontier, "ppo_overoptimisation": _draw_overoptimisation,
        "ppo_training_curves": _draw_training_curves, "dpo_beta": _draw_dpo}


def draw(data: dict[str, dict[str, Any]], out: Path) -> list[str]:
    """Write ``<name>.png`` for each plot in ``data`` into ``out``; sets each one's ``file``."""
    if not data:
        return []
    plt = _pyplot()
    written = []
    for name, numbers in data.items():
        fig = DRAW[name](plt, numbers)
        try:
            fig.tight_layout()
            path = out / f"{name}.png"
            tmp = out / f".{name}.png.tmp"
            fig.savefig(tmp, format="png", dpi=100)
            tmp.replace(path)
        finally:
            plt.close(fig)
        numbers["file"] = path.name
        written.append(path.name)
    return written


# ----------------------------------------------------------------------------------- outputs


def _public(row: dict[str, Any]) -> dict[str, Any]:
    keys = ("run_id", "phase", "status", "source", "path", "params", "metrics", "overrides_all", "error")
    return {**{k: row[k] for k in keys if k in row}, "overrides": overrides_text(row)}


def write_compare(rows: list[dict[str, Any]], out: Path, inputs: list[str]) -> dict[str, Any]:
    """compare.csv, compare.md, compare.json and the PNGs into ``out``; returns what compare.json holds."""
    out.mkdir(parents=True, exist_ok=True)
    data = plot_data(rows)
    plots = draw(data, out)
    result = {"written": now_iso(), "inputs": inputs, "out": str(out.resolve()), "rows": [_public(r) for r in rows],
              "plots": data, "plot_files": plots}
    write_text_atomic(out / "compare.csv", to_csv(rows))
    analysis = data.get("ppo_overoptimisation", {}).get("analysis")
    extra = f"\n{overoptimisation_markdown(analysis)}" if analysis else ""
    write_text_atomic(out / "compare.md", f"# compare: {len(rows)} runs\n\n{to_markdown(rows)}{extra}")
    write_json_atomic(out / "compare.json", result)
    return result


def write_sweep_plots(sweep_dir: str | Path, echo: bool = True) -> list[str]:
    """The compare plots of one sweep into ``<sweep>/plots/`` (with plots.json: their numbers); nothing when
    no plot has data. Called at the end of every sweep (rlhf_exp.sweep.write_summary)."""
    sweep_dir = Path(sweep_dir)
    rows, _ = collect([sweep_dir])
    data = plot_data(rows)
    if not data:
        return []
    out = sweep_dir / "plots"
    out.mkdir(exist_ok=True)
    written = draw(data, out)
    write_json_atomic(out / "plots.json", {"written": now_iso(), "sweep_dir": str(sweep_dir.resolve()), "plots": data})
    analysis = data.get("ppo_overoptimisation", {}).get("analysis")
    if analysis:  # runs with held-out gold during training: where gold peaked, where it ended, the fit
        table = overoptimisation_markdown(analysis)
        write_text_atomic(out / "overoptimisation.md", table)
        if echo:
            print(f"\n{table}", flush=True)
    if echo:
        print(f"rlhf_exp: sweep plots in {out}: {', '.join(written)}", flush=True)
    return written


def default_out(paths: list[str]) -> Path:
    roots = {output_root_of(Path(p)) for p in paths}
    root = roots.pop() if len(roots) == 1 and None not in roots else Path.cwd()
    return root / "compare" / dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m rlhf_exp.compare",
        description="Merge sweeps and runs into one table (compare.csv, compare.md, compare.json) and PNG plots: "
                    "PPO reward-KL frontier, over-optimisation (proxy and gold against KL and sqrt(KL)), training "
                    "curves; DPO gold and preference accuracy against beta. Reads run folders only (no W&B).")
    parser.add_argument("folders", nargs="+", help="sweep folders (their job folders) and/or run folders")
    parser.add_argument("--out", help="output folder (default: <output_root>/compare/<time>/ when all folders lie "
                                      "under one output root, else ./compare/<time>/)")
    args = parser.parse_args(argv)
    for folder in args.folders:
        if not Path(folder).exists():
            print(f"rlhf_exp: error: {folder}: no such file or folder", file=sys.stderr)
            sys.exit(2)
    rows, warnings = collect(args.folders)
    for line in warnings:
        print(line, file=sys.stderr)
    if not rows:
        print("rlhf_exp: error: no runs in " + " ".join(args.folders), file=sys.stderr)
        sys.exit(2)
    out = Path(args.out) if args.out else default_out(args.folders)
    result = write_compare(rows, out, [str(Path(f).resolve()) for f in args.folders])
    plots = ", ".join(result["plot_files"]) or "none (no PPO or DPO data to plot)"
    print(f"{to_markdown(rows)}rlhf_exp: compared {len(rows)} runs into {out} (compare.csv, compare.md, "
          f"compare.json); plots: {plots}", flush=True)


if __name__ == "__main__":
    main()
