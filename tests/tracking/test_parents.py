"""PPO's parents agree (the reward model descends from the SFT run), "latest" by the instant, unreadable
manifests, damaged checkpoints, reward_stats.json (issue 13, items 5, 6 and 10's lineage message).

Most tests use made-up run folders (a manifest, a config and a header-only safetensors file: what the
parent checks read) and dry runs; the slow ones copy the session's trained runs before damaging them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_exp.config.errors import ConfigError
from rlhf_exp.tracking.lineage import checkpoint_problem, latest_run, lineage_keys, resolve_parents
from tests.conftest import ROOT, read_json, run_cli

EMPTY_SAFETENSORS = b"\x02" + bytes(7) + b"{}"  # a header-only safetensors file: no tensors


def make_run(root: Path, run_id: str, phase: str, keys: dict | None = None, end: str = "2026-01-01T00:00:00+00:00",
             sft: Path | None = None, stats: dict | None = None) -> Path:
    """A succeeded run folder with a checkpoint the parent checks accept; an rm run records ``sft`` as its
    parent and has reward_stats.json (``stats``)."""
    folder = root / "runs" / run_id
    checkpoint = folder / "checkpoints" / ("reward_model" if phase == "rm" else "final")
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "model.safetensors").write_bytes(EMPTY_SAFETENSORS)
    parents = [{"phase": "sft", "run_id": sft.name, "path": str(sft.resolve())}] if sft is not None else []
    (folder / "manifest.json").write_text(json.dumps({
        "run_id": run_id, "phase": phase, "status": "succeeded", "model": "tiny", "data": "synthetic",
        "end_time": end, "checkpoint": str(checkpoint), "parents": parents, **(keys or {})}))
    if phase == "rm":
        (folder / "reward_stats.json").write_text(json.dumps(stats or {"mean": 0.1, "std": 0.5, "n": 10}))
    return folder


@pytest.fixture
def keys(compose):
    return lineage_keys(compose(["phase=ppo"]))


def ppo(compose, root: Path, *overrides: str):
    return compose(["phase=ppo", f"output_root={root}", *overrides])


def chosen(parents: list[dict]) -> tuple[str, str]:
    return tuple(p["run_id"] for p in parents)


def one_line_error(args: list[str]) -> str:
    proc = run_cli(args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    block = proc.stderr[proc.stderr.index("rlhf_exp: error: "):].strip()
    assert len(block.splitlines()) == 1, block
    return block


# ------------------------------------------------------------------------ parents that agree


def test_a_named_inconsistent_pair_is_refused_unless_allowed(tmp_path):
    sft_a, sft_b = make_run(tmp_path, "a_sft", "sft"), make_run(tmp_path, "b_sft", "sft")
    rm = make_run(tmp_path, "a_rm", "rm", sft=sft_a)
    args = ["phase=ppo", f"phase.sft_run={sft_b}", f"phase.reward_run={rm}", "dry_run=true", f"output_root={tmp_path}"]
    message = one_line_error(args)
    assert message == (f"rlhf_exp: error: phase.reward_run={rm} was trained from the SFT run a_sft ({sft_a.resolve()}), "
                       f"not from phase.sft_run={sft_b} ({sft_b.resolve()}): PPO's reward model must descend from its SFT "
                       "run. Name a matching pair, or set phase.allow_foreign_reward_model=true to use them anyway")
    proc = run_cli([*args, "phase.allow_foreign_reward_model=true"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"parents   : sft={sft_b.resolve()}, rm={rm.resolve()}" in proc.stdout


def test_default_discovery_picks_a_consistent_pair(compose, keys, tmp_path, capsys):
    old = make_run(tmp_path, "old_sft", "sft", keys, end="2026-01-01T00:00:00+00:00")
    make_run(tmp_path, "old_rm", "rm", keys, end="2026-01-02T00:00:00+00:00", sft=old)
    new = make_run(tmp_path, "new_sft", "sft", keys, end="2026-01-03T00:00:00+00:00")  # no reward model yet
    assert chosen(resolve_parents(ppo(compose, tmp_path))) == ("old_sft", "old_rm")
    err = capsys.readouterr().err
    assert "phase.sft_run not given: using" in err and "with a reward model trained from it" in err
    # named SFT run without a reward model of its own: refused, saying how to make one
    with pytest.raises(ConfigError, match=r"no successful rm run .* was trained from phase.sft_run=new_sft .*"
                                          r"Make one with:\n  python -m rlhf_exp phase=rm .*phase.sft_run="):
        resolve_parents(ppo(compose, tmp_path, "phase.sft_run=new_sft"))
    # ... or the latest reward model whatever its SFT run, when foreign ones are allowed
    allowed = resolve_parents(ppo(compose, tmp_path, "phase.sft_run=new_sft", "phase.allow_foreign_reward_model=true"))
    assert chosen(allowed) == ("new_sft", "old_rm")
    # the SFT run's latest reward model; a named reward model's own SFT run
    make_run(tmp_path, "new_rm", "rm", keys, end="2026-01-04T00:00:00+00:00", sft=new)
    assert chosen(resolve_parents(ppo(compose, tmp_path))) == ("new_sft", "new_rm")
    assert chosen(resolve_parents(ppo(compose, tmp_path, "phase.sft_run=old_sft"))) == ("old_sft", "old_rm")
    assert chosen(resolve_parents(ppo(compose, tmp_path, "phase.reward_run=old_rm"))) == ("old_sft", "old_rm")


def test_latest_compares_instants_not_strings(keys, tmp_path):
    # 09:00 at +09:00 is 00:00 UTC: earlier than 08:00 UTC, though its string sorts later
    make_run(tmp_path, "tokyo_sft", "sft", keys, end="2026-01-01T09:00:00+09:00")
    make_run(tmp_path, "london_sft", "sft", keys, end="2026-01-01T08:00:00+00:00")
    make_run(tmp_path, "newyork_sft", "sft", keys, end="2026-01-01T02:00:00-05:00")  # 07:00 UTC
    assert latest_run(tmp_path, "sft", keys)["run_id"] == "london_sft"


# ------------------------------------------------------------------------ unreadable runs


def test_a_truncated_manifest_is_skipped_with_a_warning_and_named_it_is_unreadable(compose, keys, tmp_path, capsys):
    make_run(tmp_path, "good_sft", "sft", keys, end="2026-01-01T00:00:00+00:00")
    bad = make_run(tmp_path, "bad_sft", "sft", keys, end="2026-01-02T00:00:00+00:00")
    manifest = bad / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    parents = resolve_parents(compose(["phase=dpo", f"output_root={tmp_path}"]))
    assert parents[0]["run_id"] == "good_sft"
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"rlhf_exp: warning: skipping the run in {bad}: its manifest.json is not valid JSON (")
    assert warnings[0].endswith("truncated?)")
    resolve_parents(compose(["phase=dpo", f"output_root={tmp_path}"]))
    assert "warning" not in capsys.readouterr().err, "each unreadable manifest is named once"
    for ref in ("bad_sft", str(bad)):
        with pytest.raises(ConfigError, match=rf"phase.sft_run={ref} is unreadable: its manifest.json is not valid JSON"):
            resolve_parents(compose(["phase=dpo", f"output_root={tmp_path}", f"phase.sft_run={ref}"]))
    message = one_line_error(["phase=dpo", f"phase.sft_run={bad}", "dry_run=true", f"output_root={tmp_path}"])
    assert "is unreadable" in message and "a folder without manifest.json" not in message


@pytest.mark.parametrize("damage, says", [
    (lambda c: (c / "model.safetensors").unlink(), "model.safetensors is missing"),
    (lambda c: (c / "config.json").unlink(), "config.json is missing"),
    (lambda c: (c / "model.safetensors").write_bytes(b""), "model.safetensors is empty"),
    (lambda c: (c / "config.json").write_text('{"model_ty'), "config.json is unreadable"),
], ids=["no_weights", "no_config", "empty_weights", "cut_config"])
def test_a_damaged_parent_checkpoint_is_refused_naming_the_file(compose, tmp_path, damage, says):
    sft = make_run(tmp_path, "x_sft", "sft")
    damage(sft / "checkpoints" / "final")
    with pytest.raises(ConfigError, match=f"phase.sft_run: run {sft.resolve()} has a damaged checkpoint: "
                                          f"{sft / 'checkpoints' / 'final'}/{says}"):
        resolve_parents(compose(["phase=dpo", f"output_root={tmp_path}", f"phase.sft_run={sft}"]))


def test_a_truncated_safetensors_file_is_found_from_its_header(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(64)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    assert checkpoint_problem(tmp_path) is None
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-10])
    assert "model.safetensors is truncated" in checkpoint_problem(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(data[:12])
    assert "model.safetensors is truncated (its header is cut off)" in checkpoint_problem(tmp_path)


@pytest.mark.slow
def test_a_deleted_weights_file_in_a_run_folder_is_refused_in_one_line(sft_run, tmp_path):
    copy = shutil.copytree(sft_run, tmp_path / "runs" / sft_run.name)
    manifest = read_json(copy / "manifest.json")
    manifest["checkpoint"] = str(copy / "checkpoints" / "final")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    (copy / "checkpoints" / "final" / "model.safetensors").unlink()
    message = one_line_error(["phase=dpo", f"phase.sft_run={copy}", "dry_run=true", f"output_root={tmp_path}"])
    assert message == (f"rlhf_exp: error: phase.sft_run: run {copy} has a damaged checkpoint: "
                       f"{copy / 'checkpoints' / 'final' / 'model.safetensors'} is missing; pick another run with "
                       "phase.sft_run=<run folder>, or train that sft run again")


# ------------------------------------------------------------------------ reward_stats.json


@pytest.mark.parametrize("content, says", [
    (None, "reward_stats.json is missing"),
    ('{"mean": NaN, "std": 1.0}', "reward_stats.json has mean=NaN (a finite number is needed)"),
    ('{"mean": 0.1, "std": 0.0}', "reward_stats.json has std=0.0 (PPO divides rewards by it: it must be > 0)"),
    ('{"mean": 0.1, "st', "reward_stats.json is unreadable"),
    ('{"mean": 0.1}', "reward_stats.json has std=null"),
], ids=["missing", "nan", "std0", "truncated", "no_std"])
def test_bad_reward_stats_are_refused_naming_the_fix(compose, tmp_path, content, says):
    from rlhf_exp.ppo.trainer import load_reward_stats

    sft = make_run(tmp_path, "s_sft", "sft")
    rm = make_run(tmp_path, "s_rm", "rm", sft=sft)
    stats = rm / "reward_stats.json"
    stats.unlink() if content is None else stats.write_text(content)
    cfg = ppo(compose, tmp_path, f"phase.sft_run={sft}", f"phase.reward_run={rm}")
    with pytest.raises(ConfigError) as info:
        resolve_parents(cfg)
    message = str(info.value)
    assert message.startswith(f"phase.reward_run: {rm.resolve()}/{says}") and "\n" not in message
    assert message.endswith(f"Re-create it with: python -m rlhf_exp.reward_stats {rm.resolve()} (or run without it: "
                            "phase.normalize_reward=false)")
    assert load_reward_stats(rm) is None
    # without normalisation the file is not needed
    assert chosen(resolve_parents(ppo(compose, tmp_path, f"phase.sft_run={sft}", f"phase.reward_run={rm}",
                                      "phase.normalize_reward=false"))) == ("s_sft", "s_rm")


def test_bad_reward_stats_are_refused_in_a_dry_run_in_one_line(tmp_path):
    sft = make_run(tmp_path, "s_sft", "sft")
    rm = make_run(tmp_path, "s_rm", "rm", sft=sft, stats={"mean": 0.1, "std": 0.0})
    message = one_line_error(["phase=ppo", f"phase.sft_run={sft}", f"phase.reward_run={rm}", "dry_run=true",
                              f"output_root={tmp_path}"])
    assert f"python -m rlhf_exp.reward_stats {rm.resolve()}" in message and "phase.normalize_reward=false" in message


@pytest.mark.slow
def test_reward_stats_command_recreates_the_file(rm_run, tmp_path):
    original = read_json(rm_run / "reward_stats.json")
    assert not (rm_run / ".reward_stats.json.tmp").exists(), "written through a temporary file, then renamed"
    copy = shutil.copytree(rm_run, tmp_path / rm_run.name)
    (copy / "reward_stats.json").unlink()
    proc = subprocess.run([sys.executable, "-m", "rlhf_exp.reward_stats", str(copy)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"rlhf_exp.reward_stats: wrote {copy / 'reward_stats.json'}" in proc.stdout
    again = read_json(copy / "reward_stats.json")
    assert again["n"] == original["n"]
    assert again["mean"] == pytest.approx(original["mean"], abs=1e-6)
    assert again["std"] == pytest.approx(original["std"], abs=1e-6)


def test_reward_stats_command_refuses_what_is_not_a_reward_model_run(tmp_path, capsys):
    from rlhf_exp.reward_stats import main

    sft = make_run(tmp_path, "r_sft", "sft")
    assert main([str(sft)]) == 2
    assert capsys.readouterr().err == (f"rlhf_exp.reward_stats: error: {sft.resolve()} is a run of phase=sft; give a "
                                       "reward-model run (phase=rm)\n")
    rm = make_run(tmp_path, "r_rm", "rm", sft=sft)
    (rm / "checkpoints" / "reward_model" / "model.safetensors").unlink()
    assert main(["r_rm", "--root", str(tmp_path)]) == 2
    assert "has a damaged reward model: " in capsys.readouterr().err


# ------------------------------------------------------------------------ the lineage command


def test_lineage_of_a_run_id_under_another_root_mentions_root(tmp_path, monkeypatch, capsys):
    from rlhf_exp.lineage import main

    sft = make_run(tmp_path, "l_sft", "sft")
    make_run(tmp_path, "l_rm", "rm", sft=sft)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # no outputs/ here
    assert main(["l_rm"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlhf_exp.lineage: error: l_rm is neither a run folder nor a run id under outputs/")
    assert "--root <that output_root>" in err and len(err.splitlines()) == 1
    assert main(["l_rm", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("rm   l_rm  succeeded") and out[1].startswith("└─ sft  l_sft  succeeded")
