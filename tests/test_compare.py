"""``python -m rlhf_exp.compare``: sweeps and runs merged into one table (CSV, Markdown, JSON) and PNG plots,
checked by the numbers the files hold; and the plots every sweep leaves in its own folder."""

from __future__ import annotations

import csv
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, read_json, read_metrics, run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PPO_PLOTS = {"ppo_frontier", "ppo_overoptimisation", "ppo_training_curves"}


def compare(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf_exp.compare", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def rows_of_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR", path
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 300 and height >= 200 and len(data) > 5000, (path, width, height, len(data))


def signed_sqrt(x: float) -> float:
    return math.copysign(math.sqrt(abs(x)), x)


# --------------------------------------------------------------------------------- from folders on disk (fast)


def fake_run(folder: Path, phase: str, overrides: list[str], metrics: dict, steps: list[dict] | None = None,
             config: dict | None = None, num: int | None = None) -> Path:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    hydra = {"job": {"num": num}} if num is not None else {}
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {**hydra, "runtime": {"choices": {
        "phase": phase, "model": "tiny"}}}}))
    (folder / "manifest.json").write_text(json.dumps({"run_id": folder.name, "phase": phase, "status": "succeeded"}))
    (folder / "summary.json").write_text(json.dumps({"phase": phase, "metrics": metrics}))
    (folder / "config.yaml").write_text(yaml.safe_dump(config or {"phase": {"name": phase}}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps or []))
    return folder


def ppo_steps(kls: list[float], rewards: list[float], golds: list[float]) -> list[dict]:
    return [{"step": 0, "eval/gold_score": 0.1}] + [
        {"step": i + 1, "ppo/kl": k, "ppo/reward": r, "ppo/gold_reward": g, "ppo/kl_coef": 0.1}
        for i, (k, r, g) in enumerate(zip(kls, rewards, golds))]


@pytest.fixture
def fake_folders(tmp_path) -> dict[str, Path]:
    """<root>/sweeps/A: two PPO jobs (kl_coef 0.02, 0.2); <root>/sweeps/B: two DPO jobs (beta 0.5, 0.1);
    <root>/runs/C: one PPO run that leaves kl_coef at its default (0.05, from its config.yaml)."""
    root = tmp_path / "out"
    common = ["output_root=/somewhere", "phase.max_steps=3"]
    a, b = root / "sweeps" / "A", root / "sweeps" / "B"
    for num, (coef, kls, rewards, golds) in enumerate([(0.02, [0.0, 0.4, 1.6], [-0.5, 0.1, 0.9], [0.1, 0.3, 0.2]),
                                                       (0.2, [0.0, 0.1, 0.25], [-0.5, -0.2, 0.1], [0.1, 0.2, 0.25])]):
        fake_run(a / f"a{num}_{num}_ppo", "ppo", ["phase=ppo", *common, f"phase.kl_coef={coef}"],
                 {"kl": kls[-1], "reward": rewards[-1], "gold_score": round(golds[-1] + 0.01, 2), "steps": 3},
                 ppo_steps(kls, rewards, golds), num=num)
    for num, (beta, gold, acc) in enumerate([(0.5, 0.4, 0.7), (0.1, 0.3, 0.8)]):
        fake_run(b / f"b{num}_{num}_dpo", "dpo", ["phase=dpo", *common, f"phase.beta={beta}"],
                 {"gold_score": gold, "eval_rewards_accuracies": acc, "eval_loss": 0.6}, num=num)
    fake_run(root / "runs" / "C_ppo", "ppo", ["phase=ppo", "output_root=/elsewhere", "phase.max_steps=3"],
             {"kl": -0.04, "reward": 0.2, "gold_score": 0.15}, ppo_steps([0.0, -0.04], [-0.5, 0.2], [0.1, 0.15]),
             config={"phase": {"name": "ppo", "kl_coef": 0.05, "max_steps": 3}})
    (root / "sweeps" / "notes").mkdir()
    return {"root": root, "A": a, "B": b, "C": root / "runs" / "C_ppo", "notes": root / "sweeps" / "notes"}


def test_compare_of_folders_on_disk(fake_folders, tmp_path):
    f = fake_folders
    out = tmp_path / "cmp"
    proc = compare(f["A"], f["B"], f["C"], f["notes"], "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == f"rlhf_exp: warning: {f['notes']}: neither a run folder nor a sweep folder, skipped"
    assert f"compared 5 runs into {out}" in proc.stdout

    rows = rows_of_csv(out / "compare.csv")
    assert [r["run_id"] for r in rows] == ["a0_0_ppo", "a1_1_ppo", "b0_0_dpo", "b1_1_dpo", "C_ppo"]
    # only what differs: not output_root (where, not what), not max_steps (the same everywhere); C's kl_coef is
    # its config's, and kl_coef / beta appear only on the runs whose phase has them
    assert [r["overrides"] for r in rows] == ["phase.kl_coef=0.02", "phase.kl_coef=0.2", "phase.beta=0.5",
                                              "phase.beta=0.1", "phase.kl_coef=0.05"]
    assert [r["phase"] for r in rows] == ["ppo", "ppo", "dpo", "dpo", "ppo"]
    assert list(rows[0])[:8] == ["run_id", "phase", "status", "overrides", "gold_score", "reward", "kl",
                                 "eval_rewards_accuracies"]
    for row in rows:
        metrics = read_json(Path(row["path"]) / "summary.json")["metrics"]
        assert {k: float(v) for k, v in row.items() if k in metrics and v} == pytest.approx(metrics, rel=0, abs=0)
    md = (out / "compare.md").read_text().splitlines()
    assert md[2].startswith("| run id | phase | status | overrides | gold_score |") and len(md) == 2 + 2 + 5
    assert "| a1_1_ppo | ppo | succeeded | phase.kl_coef=0.2 | 0.26 | 0.1 | 0.25 |" in md[5]

    result = read_json(out / "compare.json")
    plots = result["plots"]
    assert set(plots) == {*PPO_PLOTS, "dpo_beta"} and result["plot_files"] == [f"{p}.png" for p in plots]
    for name in plots:
        assert_png(out / f"{name}.png")
    frontier = plots["ppo_frontier"]
    assert [(p["run_id"], p["kl"], p["reward"], p["gold_score"], p["label"]) for p in frontier["points"]] == [
        ("a0_0_ppo", 1.6, 0.9, 0.21, "kl_coef=0.02"), ("a1_1_ppo", 0.25, 0.1, 0.26, "kl_coef=0.2"),
        ("C_ppo", -0.04, 0.2, 0.15, "kl_coef=0.05")]
    assert frontier["frontier"] == ["C_ppo", "a0_0_ppo"], "a1 has more KL and less reward than C"
    series = {s["run_id"]: s for s in plots["ppo_overoptimisation"]["series"]}
    assert series["a0_0_ppo"]["kl"] == [0.0, 0.4, 1.6] and series["a0_0_ppo"]["gold"] == [0.1, 0.3, 0.2]
    assert series["a0_0_ppo"]["sqrt_kl"] == pytest.approx([0.0, math.sqrt(0.4), math.sqrt(1.6)])
    assert series["C_ppo"]["sqrt_kl"] == pytest.approx([0.0, -0.2]), "a negative KL estimate keeps its sign"
    assert series["a1_1_ppo"]["step"] == [1, 2, 3] and series["a1_1_ppo"]["reward"] == [-0.5, -0.2, 0.1]
    assert series["a0_0_ppo"]["eval_gold"] == {"step": [0], "gold_score": [0.1]}
    assert plots["ppo_training_curves"]["series"] == plots["ppo_overoptimisation"]["series"]
    assert [(p["beta"], p["gold_score"], p["eval_rewards_accuracies"]) for p in plots["dpo_beta"]["points"]] == [
        (0.1, 0.3, 0.8), (0.5, 0.4, 0.7)]


def test_default_out_is_under_the_output_root_and_only_plots_with_data_are_drawn(fake_folders):
    proc = compare(fake_folders["B"])  # DPO only: no PPO plot
    assert proc.returncode == 0, proc.stderr
    outs = list((fake_folders["root"] / "compare").iterdir())
    assert len(outs) == 1 and f"into {outs[0]}" in proc.stdout and "plots: dpo_beta.png" in proc.stdout
    assert sorted(p.name for p in outs[0].iterdir()) == ["compare.csv", "compare.json", "compare.md", "dpo_beta.png"]
    assert read_json(outs[0] / "compare.json")["plot_files"] == ["dpo_beta.png"]


def test_a_missing_path_is_one_line_and_exit_2(fake_folders, tmp_path):
    proc = compare(fake_folders["A"], tmp_path / "nope", "--out", tmp_path / "cmp")
    assert proc.returncode == 2 and proc.stderr == f"rlhf_exp: error: {tmp_path / 'nope'}: no such file or folder\n"
    assert not (tmp_path / "cmp").exists()
    proc = compare(fake_folders["notes"], "--out", tmp_path / "cmp")
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1].startswith("rlhf_exp: error: no runs in")


def test_a_sweep_summary_draws_its_own_plots_and_a_plot_error_never_fails_it(fake_folders, monkeypatch, capsys):
    from rlhf_exp import compare as compare_module
    from rlhf_exp.sweep import write_summary

    sweep = fake_folders["A"]
    write_summary(sweep)
    assert sorted(p.name for p in (sweep / "plots").iterdir()) == ["plots.json", *sorted(f"{p}.png" for p in PPO_PLOTS)]
    for name in PPO_PLOTS:
        assert_png(sweep / "plots" / f"{name}.png")
    numbers = read_json(sweep / "plots" / "plots.json")["plots"]
    assert [(p["kl"], p["reward"]) for p in numbers["ppo_frontier"]["points"]] == [(1.6, 0.9), (0.25, 0.1)]

    def broken(*args, **kwargs):
        raise RuntimeError("no backend\nsecond line")

    monkeypatch.setattr(compare_module, "write_sweep_plots", broken)
    capsys.readouterr()
    assert write_summary(sweep)["jobs_total"] == 2
    err = capsys.readouterr().err
    assert err == "rlhf_exp: warning: sweep plots not written (RuntimeError: no backend)\n"


def test_compare_help_imports_no_matplotlib_and_no_torch():
    script = ("import sys\nfrom rlhf_exp import compare\ntry:\n    compare.main(['--help'])\nexcept SystemExit:\n"
              "    pass\nprint('matplotlib' in sys.modules, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert proc.stdout.strip().splitlines()[-1] == "False False", proc.stderr


# --------------------------------------------------------------------------------- real sweeps (slow)


@pytest.fixture(scope="module")
def real(sft_run, rm_run, tmp_path_factory) -> dict[str, Path]:
    """Through the CLI: a PPO sweep over phase.kl_coef, a DPO sweep over phase.beta and one PPO run, each of 2
    steps, from the session's SFT and reward-model runs."""
    root = tmp_path_factory.mktemp("compare")
    parents = [f"phase.sft_run={sft_run}", f"phase.reward_run={rm_run}"]
    quick = ["phase.max_steps=2", "phase.rollout_batch_size=16"]
    for args in (["-m", "phase=ppo", "phase.kl_ctrl=fixed", "phase.kl_coef=0.02,0.2", *quick, *parents],
                 ["-m", "phase=dpo", "phase.beta=0.1,0.5", "phase.max_steps=2", parents[0]],
                 ["phase=ppo", "phase.kl_ctrl=fixed", "phase.kl_coef=0.1", *quick, *parents]):
        proc = run_cli([*args, f"output_root={root}"])
        assert proc.returncode == 0, proc.stderr[-3000:]
    ppo_sweep, dpo_sweep = sorted((root / "sweeps").iterdir())
    (run,) = (root / "runs").iterdir()
    return {"root": root, "ppo": ppo_sweep, "dpo": dpo_sweep, "run": run}


@pytest.mark.slow
def test_compare_merges_two_real_sweeps_and_a_run(real, tmp_path):
    out = tmp_path / "cmp"
    proc = compare(real["ppo"], real["dpo"], real["run"], "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = rows_of_csv(out / "compare.csv")
    assert [r["overrides"] for r in rows] == ["phase.kl_coef=0.02", "phase.kl_coef=0.2", "phase.beta=0.1",
                                              "phase.beta=0.5", "phase.kl_coef=0.1"]
    assert [r["phase"] for r in rows] == ["ppo", "ppo", "dpo", "dpo", "ppo"] and {r["status"] for r in rows} == {
        "succeeded"}
    for row in rows:
        metrics = read_json(Path(row["path"]) / "summary.json")["metrics"]
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        assert {k: float(row[k]) for k in numbers} == numbers, row["run_id"]
    md = (out / "compare.md").read_text()
    assert all(f"| {r['run_id']} | {r['phase']} | succeeded | {r['overrides']} |" in md for r in rows)

    plots = read_json(out / "compare.json")["plots"]
    assert set(plots) == {*PPO_PLOTS, "dpo_beta"}
    for name in plots:
        assert_png(out / f"{name}.png")
    ppo_rows = [r for r in rows if r["phase"] == "ppo"]
    assert [(p["run_id"], p["kl"], p["reward"], p["gold_score"]) for p in plots["ppo_frontier"]["points"]] == [
        (r["run_id"], float(r["kl"]), float(r["reward"]), float(r["gold_score"])) for r in ppo_rows]
    for series, row in zip(plots["ppo_overoptimisation"]["series"], ppo_rows):
        steps = [m for m in read_metrics(Path(row["path"])) if "ppo/kl" in m]
        assert series["run_id"] == row["run_id"] and series["step"] == [1, 2]
        assert series["kl"] == [m["ppo/kl"] for m in steps] and series["reward"] == [m["ppo/reward"] for m in steps]
        assert series["gold"] == [m["ppo/gold_reward"] for m in steps]
        assert series["sqrt_kl"] == pytest.approx([signed_sqrt(m["ppo/kl"]) for m in steps])
        assert (series["kl"][-1], series["reward"][-1]) == (float(row["kl"]), float(row["reward"]))
    dpo_rows = [r for r in rows if r["phase"] == "dpo"]
    assert [(p["beta"], p["gold_score"], p["eval_rewards_accuracies"]) for p in plots["dpo_beta"]["points"]] == [
        (beta, float(r["gold_score"]), float(r["eval_rewards_accuracies"])) for beta, r in zip((0.1, 0.5), dpo_rows)]

    # each sweep drew its own plots at its end
    for sweep, names, tables in ((real["ppo"], PPO_PLOTS, ["overoptimisation.md"]), (real["dpo"], {"dpo_beta"}, [])):
        # PPO: held-out gold at the last step (the tiny recipe evaluates then) gives the over-optimisation table too
        assert sorted(p.name for p in (sweep / "plots").iterdir()) == sorted(["plots.json", *tables,
                                                                             *(f"{n}.png" for n in names)])
        for name in names:
            assert_png(sweep / "plots" / f"{name}.png")
    own = read_json(real["ppo"] / "plots" / "plots.json")["plots"]["ppo_frontier"]["points"]
    assert [(p["kl"], p["reward"]) for p in own] == [(float(r["kl"]), float(r["reward"])) for r in ppo_rows[:2]]


def test_the_over_optimisation_fit_and_peak_by_hand():
    """gold = g0 + d (alpha - beta d), d = sqrt(KL): exact points give alpha, beta and the peak back; the analysis
    finds each run's held-out peak, the KL there, and fits only the rising part."""
    from rlhf_exp.compare import fit_gold, overoptimisation

    g0, alpha, beta = 0.5, 0.3, 0.1
    fit = fit_gold([(d, g0 + d * (alpha - beta * d)) for d in (0, 0.5, 1, 1.5, 2)], g0)
    assert fit["alpha"] == pytest.approx(alpha) and fit["beta"] == pytest.approx(beta) and fit["r2"] == pytest.approx(1)
    assert fit["peak_kl"] == pytest.approx(2.25) and fit["peak_gold"] == pytest.approx(0.725)  # d* = 1.5
    assert fit_gold([(0, 0.5), (1, 0.6)], 0.5) is None  # too few points
    kl = [0.25, 1.0, 2.25, 9.0, 25.0]
    gold = [g0 + math.sqrt(k) * (alpha - beta * math.sqrt(k)) for k in kl]
    gold[-2:] = [0.4, 0.3]  # past the peak, gold falls far below the start
    series = [{"run_id": "r", "label": "phase.kl_coef=0", "gold_initial": g0,
               "held_out": {"step": [10, 20, 30, 40, 50], "gold": gold, "kl": kl, "sqrt_kl": [math.sqrt(k) for k in kl]}}]
    (run,) = overoptimisation(series)["runs"]
    assert (run["peak_step"], run["peak_kl"], run["final_gold"], run["final_kl"]) == (30, 2.25, 0.3, 25.0)
    assert run["peak_gold"] == pytest.approx(0.725)
    assert run["fit"]["points"] == 4 and run["fit"]["alpha"] == pytest.approx(alpha)  # start + 3 rising points
