"""The health monitor (rlhf_exp.monitor) of PPO and DPO: each rule on synthetic metric streams, the config rules,
and through the CLI: a provoked-hacking PPO run (kl_coef=0) fires, monitor.on_alarm=stop ends it cleanly and
monitor.on_alarm=checkpoint keeps a checkpoint of the alarm's step; a provoked DPO run (beta 0.01, a high learning
rate) fires on its held-out evaluations; the README's main command raises no alarm in PPO or DPO."""

from __future__ import annotations

import dataclasses

import pytest

from rlhf_exp.config.errors import ConfigError
from rlhf_exp.config.schema import MonitorConfig
from rlhf_exp.config.validate import validate
from rlhf_exp.monitor import Monitor, pearson
from tests.conftest import only_run, read_json, read_metrics, run_cli


def healthy(step: int) -> dict[str, float]:
    """Numbers like the README's tiny PPO (kl_target 1): KL settling near 1.5, length 6, entropy 0.14 -> 0.1."""
    return {"ppo/kl": min(1.5, 0.15 * step), "ppo/response_length": 6.0, "ppo/length_reward_corr": -0.1,
            "ppo/entropy": 0.14 - 0.0005 * step, "ppo/reward": 0.6 + 0.01 * step,
            "ppo/gold_reward": 0.8 + 0.002 * step}


def evaluation(step: int, gold: float = 0.9, rm: float = 1.0, d1: float = 0.029, d2: float = 0.18) -> dict[str, float]:
    return {"eval/gold": gold, "eval/rm_score": rm, "eval/distinct_1": d1, "eval/distinct_2": d2}


def feed(stream, steps: int = 60, cfg: MonitorConfig | None = None, evals=None, kl_target: float = 1.0) -> Monitor:
    monitor = Monitor(cfg or MonitorConfig(), kl_target=kl_target)
    for step in range(1, steps + 1):
        monitor.update(step, stream(step), evals(step) if evals and step % 10 == 0 else None)
    return monitor


def rules(monitor: Monitor) -> list[str]:
    return [a.rule for a in monitor.alarms]


def test_healthy_stream_raises_nothing():
    assert rules(feed(healthy, evals=lambda s: evaluation(s, gold=0.88 + 0.001 * s))) == []


def test_kl_runaway_fires_once_with_numbers_and_fix():
    monitor = feed(lambda s: {**healthy(s), "ppo/kl": 0.2 * s})
    assert rules(monitor) == ["kl_runaway"]  # once, not every step
    alarm = monitor.alarms[0]
    assert "monitor.kl_max=3" in alarm.saw and "nats" in alarm.saw  # 3 x phase.kl_target
    assert "phase.kl_coef" in alarm.fix
    assert alarm.step == 20  # window mean of 0.2*11..0.2*20 = 3.1 > 3
    assert "kl_runaway at step 20" in alarm.line()


def test_kl_max_explicit_and_rearmed_after_a_clear_window():
    cfg = MonitorConfig(kl_max=2.0)
    spike = lambda s: {**healthy(s), "ppo/kl": 5.0 if 15 <= s < 25 or 45 <= s < 55 else 1.0}  # noqa: E731
    assert [a.step for a in feed(spike, cfg=cfg).alarms] == [17, 47]  # 3 of 10 at 5: mean 2.2


def test_kl_collapse_after_warmup_only():
    monitor = feed(lambda s: {**healthy(s), "ppo/kl": 0.001})
    assert rules(monitor) == ["kl_collapse"]
    assert monitor.alarms[0].step == 20  # monitor.warmup_steps
    assert "lower phase.kl_coef" in monitor.alarms[0].fix


def test_length_growth():
    monitor = feed(lambda s: {**healthy(s), "ppo/response_length": 6.0 + max(0, s - 20) * 0.1})
    assert rules(monitor) == ["length_growth"]
    assert "x the first 10 steps' 6" in monitor.alarms[0].saw and "length_penalty" in monitor.alarms[0].fix


def test_length_reward_correlation_rising():
    monitor = feed(lambda s: {**healthy(s), "ppo/length_reward_corr": -0.1 if s <= 20 else 0.7})
    assert rules(monitor) == ["length_reward_corr"]
    # high from the start (no rise): not length hacking by this rule
    assert rules(feed(lambda s: {**healthy(s), "ppo/length_reward_corr": 0.7})) == []


def test_pearson():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([6, 6, 6], [1, 2, 3]) == 0.0  # every answer the same length


def test_entropy_collapse():
    monitor = feed(lambda s: {**healthy(s), "ppo/entropy": 0.14 if s <= 20 else 0.02})
    assert rules(monitor) == ["entropy_collapse"]
    assert "entropy_drop=0.3" in monitor.alarms[0].saw
    assert rules(feed(healthy, cfg=MonitorConfig(entropy_min=0.2))) == ["entropy_collapse"]


def test_distinct_drop():
    monitor = feed(healthy, evals=lambda s: evaluation(s, d2=0.18 if s < 40 else 0.1))
    assert rules(monitor) == ["distinct_drop"]
    assert monitor.alarms[0].step == 40 and "distinct_2" in monitor.alarms[0].saw


def test_gold_drop_while_proxy_rises_on_evaluations():
    monitor = feed(healthy, evals=lambda s: evaluation(s, gold=0.9 - 0.01 * s, rm=1 + 0.01 * s))
    assert rules(monitor) == ["gold_drop"]
    assert "held-out gold" in monitor.alarms[0].saw and "new preference data" in monitor.alarms[0].fix
    # gold falling with the proxy falling too is not over-optimisation
    assert rules(feed(healthy, evals=lambda s: evaluation(s, gold=0.9 - 0.01 * s, rm=1 - 0.01 * s))) == []


def test_self_bleu_rise():
    # 0.4 -> 0.75 closes 0.35 / 0.6 = 58% of the way to identical samples
    monitor = feed(healthy, evals=lambda s: {**evaluation(s), "eval/self_bleu": 0.4 if s < 40 else 0.75})
    assert rules(monitor) == ["self_bleu_rise"]
    assert monitor.alarms[0].step == 40 and "self-BLEU is 0.75, up from its lowest 0.4: 58%" in monitor.alarms[0].saw
    assert rules(feed(healthy, evals=lambda s: {**evaluation(s), "eval/self_bleu": 0.4 + 0.004 * s})) == []
    # the embedded task's healthy runs (0.917 -> 0.94: 28% of the gap) and NaN (fewer than 2 samples) stay quiet
    assert rules(feed(healthy, evals=lambda s: {**evaluation(s), "eval/self_bleu": 0.917 if s < 30 else 0.94})) == []
    assert rules(feed(healthy, evals=lambda s: {**evaluation(s), "eval/self_bleu": float("nan")})) == []


def dpo_eval(step: int, gold: float = 0.9, kl: float = 2.0, length: float = 6.0, entropy: float = 0.12,
             d2: float = 0.17) -> dict[str, float]:
    """Numbers like the README's tiny DPO's held-out evaluations (rlhf_exp.heldout)."""
    return {"eval/gold": gold, "eval/kl": kl, "eval/response_length": length, "eval/policy_entropy": entropy,
            "eval/distinct_1": 0.028, "eval/distinct_2": d2, "eval/self_bleu": 0.93}


def feed_dpo(evals, cfg: MonitorConfig | None = None, steps=(16, 32, 48, 64, 80, 96, 112, 126)) -> Monitor:
    monitor = Monitor(cfg or MonitorConfig(), kl_target=None, per_step=False)
    for step in steps:
        monitor.update(step, {}, evals(step))
    return monitor


def test_dpo_reads_its_evaluations_only():
    # the README's tiny DPO (measured: gold 0.951 -> 0.921, KL 2.07 -> 2.82): healthy
    assert rules(feed_dpo(lambda s: dpo_eval(s, gold=0.95 - 0.0002 * s, kl=2 + 0.006 * s))) == []
    # beta 0.01, lr 3e-3 (measured: gold 0.707 -> 0.582 while KL 13.1 -> 15.3 at step 48): over-optimisation
    monitor = feed_dpo(lambda s: dpo_eval(s, gold=0.7 if s < 48 else 0.58, kl=13 + 0.05 * s))
    assert rules(monitor) == ["gold_drop"] and monitor.alarms[0].step == 48
    assert "KL to the reference rose" in monitor.alarms[0].saw and "phase.beta" in monitor.alarms[0].fix
    assert "kl_coef" not in monitor.alarms[0].fix
    # gold falling while the policy moves back towards the reference is not over-optimisation
    assert rules(feed_dpo(lambda s: dpo_eval(s, gold=0.9 - 0.002 * s, kl=5 - 0.02 * s))) == []
    # length and entropy against the first evaluation; KL runaway only with monitor.kl_max set
    assert rules(feed_dpo(lambda s: dpo_eval(s, length=6 if s < 64 else 8))) == ["length_growth"]
    assert rules(feed_dpo(lambda s: dpo_eval(s, entropy=0.12 if s < 64 else 0.03))) == ["entropy_collapse"]
    assert rules(feed_dpo(lambda s: dpo_eval(s, kl=50.0))) == []
    limited = feed_dpo(lambda s: dpo_eval(s, kl=50.0), cfg=MonitorConfig(kl_max=20.0))
    assert rules(limited) == ["kl_runaway"] and limited.alarms[0].step == 16
    assert rules(feed_dpo(lambda s: dpo_eval(s, d2=0.17 if s < 64 else 0.1))) == ["distinct_drop"]


def test_dpo_monitor_replays_a_resumed_runs_evaluations():
    records = [{"step": s, **dpo_eval(s, gold=0.7 if s < 48 else 0.58, kl=13 + 0.05 * s)} for s in (16, 32, 48)]
    heard = []
    monitor = Monitor(MonitorConfig(), per_step=False, notify=heard.append)
    monitor.replay(records)
    assert rules(monitor) == ["gold_drop"] and heard == []


def test_gold_drop_on_rollout_windows():
    stream = lambda s: {**healthy(s), "ppo/gold_reward": 0.9 - 0.005 * s, "ppo/reward": 0.5 + 0.02 * s}  # noqa: E731
    assert rules(feed(stream)) == ["gold_drop"]


def test_disabled_and_replay():
    assert rules(feed(lambda s: {**healthy(s), "ppo/kl": 9.0}, cfg=MonitorConfig(enabled=False))) == []
    records = [{"step": s, **healthy(s), "ppo/kl": 9.0} for s in range(1, 31)]
    heard = []
    monitor = Monitor(MonitorConfig(), kl_target=1.0, notify=heard.append)
    monitor.replay(records)
    assert rules(monitor) == ["kl_runaway"] and heard == []  # recorded, not re-announced
    monitor.update(31, {**healthy(31), "ppo/kl": 9.0})
    assert heard == []  # still firing: not re-armed


def test_monitor_uses_no_random_numbers():
    import random

    import torch

    torch.manual_seed(0)
    random.seed(0)
    expected = (torch.rand(1).item(), random.random())
    torch.manual_seed(0)
    random.seed(0)
    feed(lambda s: {**healthy(s), "ppo/kl": 9.0}, evals=evaluation)
    assert (torch.rand(1).item(), random.random()) == expected


@pytest.mark.parametrize("override, needle", [
    ("monitor.window=1", "monitor.window=1"),
    ("monitor.entropy_drop=1.5", "monitor.entropy_drop=1.5"),
    ("monitor.length_growth=0.9", "monitor.length_growth=0.9"),
    ("monitor.kl_max=-1", "monitor.kl_max=-1"),
])
def test_validate_refuses_bad_monitor_values(compose, override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        validate(compose(["phase=ppo", override]))


def test_on_alarm_checkpoint_needs_checkpoints(compose):
    with pytest.raises(ConfigError, match="monitor.on_alarm=checkpoint"):
        validate(compose(["phase=ppo", "monitor.on_alarm=checkpoint", "phase.save_minutes=null",
                          "phase.save_steps=null"]))
    cfg = compose(["phase=ppo", "monitor.on_alarm=stop"])
    validate(cfg)
    assert str(cfg.monitor.on_alarm) == "stop"
    with pytest.raises(ConfigError):
        compose(["phase=ppo", "monitor.on_alarm=explode"])


def test_defaults_are_the_documented_ones():
    defaults = {f.name: f.default for f in dataclasses.fields(MonitorConfig)}
    assert defaults["kl_max"] is None and defaults["window"] == 10 and defaults["gold_drop"] == 0.05


@pytest.mark.slow
def test_provoked_hacking_fires_and_stop_ends_cleanly(sft_run, rm_run, tmp_path):
    """kl_coef=0 (fixed): the tiny policy runs away from the reference; the monitor stops it at step 30 (KL window
    mean 3.08 > 3 x kl_target, held-out gold 0.878 -> 0.792 while the RM score rose 1.00 -> 1.16)."""
    proc = run_cli([f"output_root={tmp_path}", "phase=ppo", f"phase.sft_run={sft_run}", f"phase.reward_run={rm_run}",
                    "phase.kl_coef=0", "phase.kl_ctrl=fixed", "phase.max_steps=60", "monitor.on_alarm=stop"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    run = only_run(tmp_path, "ppo")
    summary, manifest = read_json(run / "summary.json")["metrics"], read_json(run / "manifest.json")
    fired = {a["rule"] for a in summary["monitor_alarms"]}
    # both over-optimisation signals fired together at step 30 here; the KL one had little margin (3.08 vs 3.0)
    assert fired & {"kl_runaway", "gold_drop"}, summary["monitor_alarms"]
    assert any(f"monitor alarm {rule} at step" in proc.stderr for rule in fired)
    assert summary["steps"] < 60
    assert summary["stopped_by_monitor"].startswith("monitor.on_alarm=stop: ")
    assert manifest["status"] == "succeeded" and manifest["stopped_by_monitor"] == summary["stopped_by_monitor"]
    assert max(r["step"] for r in read_metrics(run)) == summary["steps"]
    assert (run / "checkpoints" / "final").is_dir()


def assert_alarm_checkpoint_kept(run, summary, alarm, steps: int):
    kept = run / "checkpoints" / "alarms" / f"checkpoint-{alarm['step']}"
    assert alarm["checkpoint"] == str(kept) and (kept / "complete.json").is_file(), alarm
    assert read_json(kept / "complete.json")["step"] == alarm["step"] < steps
    # the resumable checkpoints went at the end, but for the best one; the alarm's copy stays
    left = {str(p) for p in (run / "checkpoints" / "trainer").glob("checkpoint-*")}
    assert left <= {summary.get("best_checkpoint")}, left


@pytest.mark.slow
def test_ppo_on_alarm_checkpoint_keeps_that_steps_checkpoint_and_continues(sft_run, rm_run, tmp_path):
    proc = run_cli([f"output_root={tmp_path}", "phase=ppo", f"phase.sft_run={sft_run}", f"phase.reward_run={rm_run}",
                    "phase.kl_coef=0", "phase.kl_ctrl=fixed", "phase.max_steps=40", "monitor.on_alarm=checkpoint"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run(tmp_path, "ppo")
    summary = read_json(run / "summary.json")["metrics"]
    assert summary["steps"] == 40 and "stopped_by_monitor" not in summary  # it went on
    (first, *_) = summary["monitor_alarms"]
    assert_alarm_checkpoint_kept(run, summary, first, 40)


@pytest.mark.slow
def test_provoked_dpo_fires_on_held_out_gold_and_keeps_the_alarm_checkpoint(sft_run, tmp_path):
    """beta 0.01 at lr 3e-3: DPO drifts far from the SFT model (measured: held-out gold 0.707 at step 16 -> 0.582 at
    step 48 while the KL to the reference rose 13.1 -> 15.3 nats)."""
    proc = run_cli([f"output_root={tmp_path}", "phase=dpo", f"phase.sft_run={sft_run}", "phase.beta=0.01",
                    "phase.learning_rate=3e-3", "phase.eval_steps=16", "monitor.on_alarm=checkpoint"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run(tmp_path, "dpo")
    summary = read_json(run / "summary.json")["metrics"]
    evals = {r["step"]: r for r in read_metrics(run) if "eval/kl" in r}
    assert sorted(evals) == [0, 16, 32, 48, 64, 80, 96, 112, 126]  # 0: the SFT model, the baseline
    alarm = next(a for a in summary["monitor_alarms"] if a["rule"] == "gold_drop")
    best = max(s for s in evals if s < alarm["step"] and evals[s]["eval/gold"] == max(
        evals[t]["eval/gold"] for t in evals if t < alarm["step"]))
    assert evals[best]["eval/gold"] - evals[alarm["step"]]["eval/gold"] >= 0.05
    assert evals[alarm["step"]]["eval/kl"] >= evals[best]["eval/kl"]
    assert f"monitor alarm gold_drop at step {alarm['step']}" in proc.stderr and "phase.beta" in alarm["fix"]
    assert summary["steps"] == 126
    assert_alarm_checkpoint_kept(run, summary, alarm, 126)


@pytest.mark.slow
def test_readme_main_command_raises_no_alarm(main_pipeline):
    """The README's main command (pipeline=rlhf, the session's run): its PPO and its DPO raise no alarm, with DPO's
    held-out evaluations (before training, then phase.eval_steps=32 in its recipe) in metrics.jsonl."""
    proc, root = main_pipeline
    for phase in ("ppo", "dpo"):
        summary = read_json(root / phase / "summary.json")["metrics"]
        assert summary["monitor_alarms"] == [] and "stopped_by_monitor" not in summary, phase
    assert "monitor alarm" not in proc.stderr
    evals = {r["step"]: r for r in read_metrics(root / "dpo") if "eval/kl" in r}
    assert sorted(evals) == [0, 32, 64, 96, 126]
    assert abs(evals[0]["eval/kl"]) < 1e-4  # the starting policy is the reference
    for row in evals.values():
        assert {"eval/gold", "eval/kl", "eval/response_length", "eval/policy_entropy", "eval/distinct_1",
                "eval/distinct_2", "eval/self_bleu"} <= set(row)
        assert 0 < row["eval/self_bleu"] <= 1 and row["eval/response_length"] > 0
    assert all(evals[step]["eval/kl"] > 0 for step in (32, 64, 96, 126))  # it moved away from the reference


def test_wandb_alert_sent_and_a_refusal_keeps_logging(capsys):
    pytest.importorskip("wandb")
    from rlhf_exp.tracking.wandb_sink import WandbSink

    class FakeRun:
        def __init__(self, fail: bool):
            self.fail, self.alerts, self.logged = fail, [], []

        def alert(self, title, text, level):
            if self.fail:
                raise RuntimeError("alerts are not available offline")
            self.alerts.append((title, text, str(level)))

        def log(self, metrics, step):
            self.logged.append(step)

    sink = WandbSink.__new__(WandbSink)
    sink.run = FakeRun(fail=False)
    sink.alert("run: kl_runaway", "monitor alarm kl_runaway at step 30: ...")
    assert sink.run.alerts[0][0] == "run: kl_runaway" and "WARN" in sink.run.alerts[0][2].upper()
    sink.run = FakeRun(fail=True)
    sink.alert("a", "b")
    sink.alert("a", "b")
    sink.log({"x": 1.0}, 1)
    assert sink.run.logged == [1]  # logging carries on
    assert capsys.readouterr().err.count("alerts off") == 1
