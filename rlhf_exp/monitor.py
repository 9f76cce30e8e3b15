"""Health monitor for PPO and DPO: watches each step's metrics (and the held-out evaluations) for the known ways RLHF
goes wrong, and raises an alarm that says what it saw and what to try.

Rules (thresholds under ``monitor.*``, docs/monitor.md has the numbers behind the defaults):

- ``kl_runaway``: the mean KL to the reference over the last ``window`` steps is above ``monitor.kl_max``
  (null: 3 x phase.kl_target);
- ``kl_collapse``: after ``warmup_steps``, that mean is below ``monitor.kl_min``: the policy stopped moving;
- ``length_growth``: the mean answer length over the last window is ``monitor.length_growth`` times the first
  window's or more;
- ``length_reward_corr``: the within-batch Pearson correlation of answer length and reward-model score
  (``ppo/length_reward_corr``), averaged over the window, is at least ``monitor.length_reward_corr`` and rose
  by at least ``monitor.corr_rise`` since the first window (the reward model pays for length);
- ``entropy_collapse``: the mean policy entropy over the window fell to ``monitor.entropy_drop`` times the
  first window's or below (or under ``monitor.entropy_min`` nats when set);
- ``distinct_drop``: held-out distinct-1 or distinct-2 fell by the fraction ``monitor.distinct_drop`` or more
  from its best earlier evaluation (repetitive answers);
- ``self_bleu_rise``: held-out self-BLEU (``eval/self_bleu``, several sampled answers per prompt) closed the
  fraction ``monitor.self_bleu_rise`` or more of the gap between its lowest earlier evaluation and 1 (identical
  samples): the samples of a prompt grow alike;
- ``gold_drop``: held-out gold (``eval/gold``; or the rollouts' ``ppo/gold_reward`` averaged over windows)
  fell by ``monitor.gold_drop`` or more from its best while the reward model's score did not fall
  (over-optimisation of the proxy reward).

DPO (``Monitor(..., per_step=False)``) has no rollouts: the monitor reads its held-out evaluations
(``rlhf_exp.heldout``) only. ``distinct_drop``, ``self_bleu_rise`` as above; ``gold_drop`` with the held-out KL
to the reference as the proxy (DPO's implicit reward of its own answers is beta x that log-ratio: gold falling
while the policy keeps moving away from the reference); ``length_growth`` and ``entropy_collapse`` compare each
evaluation with the first one (``eval/response_length``, ``eval/policy_entropy``); ``kl_runaway`` fires when
``eval/kl`` is above ``monitor.kl_max`` (DPO has no kl_target: only when kl_max is set).

The monitor only reads numbers that every process already holds identically (the trainer gathers rollouts and
reduces losses before logging them), and its rules are deterministic, so under several processes every rank
raises the same alarms at the same step and takes the same stop decision without any communication. It draws no
random numbers and changes nothing in training.
"""

from __future__ import annotations

import math
import sys
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Iterable

FIXES = {
    "kl_runaway": "raise phase.kl_coef (or lower phase.kl_target with phase.kl_ctrl=adaptive) or phase.learning_rate; "
                  "if the reward keeps rising with the KL the reward model is being exploited: collect new preference "
                  "data on the policy's current answers",
    "kl_collapse": "the policy stopped exploring: lower phase.kl_coef (or raise phase.kl_target), raise "
                   "phase.learning_rate or phase.temperature",
    "length_growth": "length hacking: set or raise phase.length_penalty, raise phase.kl_coef, and add preference "
                     "pairs where the longer answer loses",
    "length_reward_corr": "the reward model pays for length: set or raise phase.length_penalty, raise phase.kl_coef, "
                          "and retrain the reward model with length-balanced preference data",
    "entropy_collapse": "entropy collapse: raise phase.kl_coef, lower phase.learning_rate, or stop at an earlier "
                        "checkpoint (the best one follows held-out gold)",
    "distinct_drop": "repetitive answers: raise phase.kl_coef, lower phase.learning_rate, and add preference data "
                     "that penalises the repeated pattern",
    "self_bleu_rise": "the samples of a prompt grow alike (mode collapse): raise phase.kl_coef (DPO: phase.beta), lower "
                      "phase.learning_rate, or stop at an earlier checkpoint",
    "gold_drop": "over-optimisation: the proxy reward rises while held-out gold falls: raise phase.kl_coef, stop "
                 "earlier (the best checkpoint follows held-out gold), or collect new preference data on the "
                 "policy's current answers",
}

# DPO's knobs are others: beta ties it to the reference, and its best checkpoint follows TRL's eval loss
DPO_FIXES = {
    "kl_runaway": "raise phase.beta or lower phase.learning_rate; train fewer steps",
    "length_growth": "length hacking: raise phase.beta, and add preference pairs where the longer answer loses",
    "entropy_collapse": "entropy collapse: raise phase.beta, lower phase.learning_rate, or train fewer steps",
    "distinct_drop": "repetitive answers: raise phase.beta, lower phase.learning_rate, and add preference data that "
                     "penalises the repeated pattern",
    "self_bleu_rise": "the samples of a prompt grow alike (mode collapse): raise phase.beta, lower "
                      "phase.learning_rate, or train fewer steps",
    "gold_drop": "over-optimisation: held-out gold falls while the policy moves away from the reference: raise "
                 "phase.beta, lower phase.learning_rate or train fewer steps, or collect new preference data",
}


@dataclass
class Alarm:
    rule: str
    step: int
    saw: str
    fix: str
    checkpoint: str | None = None  # monitor.on_alarm=checkpoint: the checkpoint kept at that step

    def line(self) -> str:
        return f"monitor alarm {self.rule} at step {self.step}: {self.saw}. Try: {self.fix}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def pearson(xs: list[float], ys: list[float]) -> float:
    """Pearson correlation; 0 when either side does not vary (e.g. every answer the same length)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx <= 1e-12 or syy <= 1e-12:
        return 0.0
    return sxy / math.sqrt(sxx * syy)


class Monitor:
    """Fed with :meth:`update` after each step (training metrics, plus the evaluation's when there was one);
    returns the alarms that fired at that step. A rule fires once, and is re-armed after its condition has
    been clear for ``window`` consecutive checks (a second episode fires again; no alarm every step)."""

    STEP_KEYS = ("ppo/kl", "ppo/response_length", "ppo/length_reward_corr", "ppo/entropy", "ppo/reward",
                 "ppo/gold_reward")

    def __init__(self, cfg, kl_target: float | None = None, notify=None, per_step: bool = True):
        self.cfg = cfg
        self.per_step = per_step  # False (DPO): only held-out evaluations are fed in
        self.notify = notify  # called with each new Alarm (the runner: a stderr line and a W&B alert)
        self.window = int(cfg.window)
        self.kl_max = cfg.kl_max if cfg.kl_max is not None else (3.0 * kl_target if kl_target else None)
        self.recent = {k: deque(maxlen=self.window) for k in self.STEP_KEYS}
        self.baseline: dict[str, list[float]] = {k: [] for k in self.STEP_KEYS}
        self.steps_seen = 0
        self.evals: list[dict[str, float]] = []
        # gold vs proxy over the rollouts: (window mean gold, window mean reward) at each full window
        self.best_train_gold: tuple[float, float] | None = None
        self.alarms: list[Alarm] = []
        self.armed: dict[str, bool] = {}
        self.clear: dict[str, int] = {}

    # -- feeding -------------------------------------------------------------------------------
    def update(self, step: int, metrics: dict[str, float], evaluation: dict[str, float] | None = None) -> list[Alarm]:
        if not self.cfg.enabled:
            return []
        self.steps_seen += 1
        for key in self.STEP_KEYS:
            value = metrics.get(key)
            if value is None or not math.isfinite(value):
                continue
            self.recent[key].append(float(value))
            if len(self.baseline[key]) < self.window:
                self.baseline[key].append(float(value))
        fired: list[Alarm] = []
        for rule, found in self._step_rules(step):
            self._judge(rule, step, found, fired)
        if evaluation:
            for rule, found in self._eval_rules(evaluation):  # armed apart from the per-step rules of that name
                self._judge(rule, step, found, fired, key=f"{rule}/eval")
        self.alarms += fired
        if self.notify is not None:
            for alarm in fired:
                self.notify(alarm)
        return fired

    def replay(self, records: list[dict[str, Any]]) -> None:
        """Rebuild the state from a resumed run's earlier metrics.jsonl records (alarms recorded, not acted on)."""
        by_step: dict[int, dict[str, Any]] = {}
        for record in records:
            by_step.setdefault(int(record.get("step", 0)), {}).update(record)
        notify, self.notify = self.notify, None
        for step in sorted(by_step):
            record = by_step[step]
            if ("ppo/kl" if self.per_step else "eval/kl") not in record:
                continue
            evaluation = {k: v for k, v in record.items() if k.startswith("eval/") and k != "eval/gold_score"}
            self.update(step, record, evaluation or None)
        self.notify = notify

    def _judge(self, rule: str, step: int, found: str | None, fired: list[Alarm], key: str | None = None) -> None:
        key = key or rule
        if found is None:
            self.clear[key] = self.clear.get(key, 0) + 1
            if self.clear[key] >= self.window:
                self.armed[key] = True
            return
        self.clear[key] = 0
        if self.armed.get(key, True):
            self.armed[key] = False
            fired.append(Alarm(rule, step, found, FIXES[rule] if self.per_step else DPO_FIXES.get(rule, FIXES[rule])))

    # -- rules ---------------------------------------------------------------------------------
    def _full(self, key: str) -> bool:
        return len(self.recent[key]) == self.window

    def _step_rules(self, step: int):
        c, w = self.cfg, self.window
        warm = self.steps_seen >= max(c.warmup_steps, w)
        kl = _mean(self.recent["ppo/kl"]) if self._full("ppo/kl") else None
        if self.kl_max is not None and kl is not None:
            yield "kl_runaway", (f"mean KL to the reference over the last {w} steps is {kl:.3g} nats, above "
                                 f"monitor.kl_max={self.kl_max:g}") if kl > self.kl_max else None
        if c.kl_min is not None and kl is not None and warm:
            yield "kl_collapse", (f"mean KL to the reference over the last {w} steps is {kl:.3g} nats after "
                                  f"{self.steps_seen} steps, below monitor.kl_min={c.kl_min:g}") if kl < c.kl_min else None
        if c.length_growth is not None and warm and self._full("ppo/response_length"):
            now, then = _mean(self.recent["ppo/response_length"]), _mean(self.baseline["ppo/response_length"])
            ratio = now / then if then > 0 else math.inf
            yield "length_growth", (f"mean answer length over the last {w} steps is {now:.3g} tokens, {ratio:.2f}x the "
                                    f"first {w} steps' {then:.3g} (monitor.length_growth={c.length_growth:g})"
                                    ) if ratio >= c.length_growth else None
        if c.length_reward_corr is not None and warm and self._full("ppo/length_reward_corr"):
            now, then = _mean(self.recent["ppo/length_reward_corr"]), _mean(self.baseline["ppo/length_reward_corr"])
            hit = now >= c.length_reward_corr and now - then >= c.corr_rise
            yield "length_reward_corr", (
                f"length-reward correlation within the rollouts averages {now:.2f} over the last {w} steps, up from "
                f"{then:.2f} in the first {w} (monitor.length_reward_corr={c.length_reward_corr:g}, "
                f"monitor.corr_rise={c.corr_rise:g})") if hit else None
        if warm and self._full("ppo/entropy"):
            now, then = _mean(self.recent["ppo/entropy"]), _mean(self.baseline["ppo/entropy"])
            found = None
            if c.entropy_min is not None and now < c.entropy_min:
                found = (f"mean policy entropy over the last {w} steps is {now:.3g} nats, below "
                         f"monitor.entropy_min={c.entropy_min:g}")
            elif c.entropy_drop is not None and then > 0 and now <= c.entropy_drop * then:
                found = (f"mean policy entropy over the last {w} steps is {now:.3g} nats, {now / then:.2f}x the first "
                         f"{w} steps' {then:.3g} (monitor.entropy_drop={c.entropy_drop:g})")
            yield "entropy_collapse", found
        if c.gold_drop is not None and self._full("ppo/gold_reward") and self._full("ppo/reward"):
            gold, proxy = _mean(self.recent["ppo/gold_reward"]), _mean(self.recent["ppo/reward"])
            best = self.best_train_gold
            if best is None or gold > best[0]:
                self.best_train_gold = (gold, proxy)
            elif warm and best[0] - gold >= c.gold_drop and proxy >= best[1]:
                yield "gold_drop", (f"the rollouts' gold reward averages {gold:.3g} over the last {w} steps, down "
                                    f"{best[0] - gold:.3g} from its best window {best[0]:.3g}, while the reward model's "
                                    f"score rose from {best[1]:.3g} to {proxy:.3g} (monitor.gold_drop={c.gold_drop:g})")
                return
            yield "gold_drop", None

    def _eval_rules(self, evaluation: dict[str, float]):
        c = self.cfg
        earlier = self.evals
        self.evals = earlier + [dict(evaluation)]
        if c.distinct_drop is not None and earlier:
            found = None
            for key in ("eval/distinct_1", "eval/distinct_2"):
                if key not in evaluation:
                    continue
                best = max(e.get(key, -math.inf) for e in earlier)
                if best > 0 and evaluation[key] <= (1 - c.distinct_drop) * best:
                    found = (f"held-out {key[5:]} is {evaluation[key]:.3g}, down {1 - evaluation[key] / best:.0%} from "
                             f"its best {best:.3g} (monitor.distinct_drop={c.distinct_drop:g})")
                    break
            yield "distinct_drop", found
        if c.self_bleu_rise is not None and earlier and math.isfinite(evaluation.get("eval/self_bleu", math.nan)):
            lows = [e["eval/self_bleu"] for e in earlier if math.isfinite(e.get("eval/self_bleu", math.nan))]
            now, low = evaluation["eval/self_bleu"], min(lows) if lows else None
            closed = (now - low) / (1 - low) if low is not None and low < 1 else 0.0
            yield "self_bleu_rise", (
                f"held-out self-BLEU is {now:.3g}, up from its lowest {low:.3g}: {closed:.0%} of the way to 1 "
                f"(identical samples; monitor.self_bleu_rise={c.self_bleu_rise:g})") if closed >= c.self_bleu_rise else None
        if not self.per_step:
            yield from self._dpo_rules(evaluation, earlier)
        if c.gold_drop is not None and earlier and "eval/gold" in evaluation:
            with_gold = [e for e in earlier if "eval/gold" in e]
            # the proxy: the held-out reward-model score (PPO); DPO has none: its KL to the reference
            proxy = "eval/rm_score" if self.per_step else "eval/kl"
            what = "reward-model score" if self.per_step else "KL to the reference"
            if with_gold:
                best = max(with_gold, key=lambda e: e["eval/gold"])
                drop = best["eval/gold"] - evaluation["eval/gold"]
                proxy_then, proxy_now = best.get(proxy, -math.inf), evaluation.get(proxy, math.inf)
                if drop >= c.gold_drop and proxy_now >= proxy_then:
                    yield "gold_drop", (f"held-out gold is {evaluation['eval/gold']:.3g}, down {drop:.3g} from its best "
                                        f"{best['eval/gold']:.3g}, while the held-out {what} rose from "
                                        f"{proxy_then:.3g} to {proxy_now:.3g} (monitor.gold_drop={c.gold_drop:g})")
                    return
            yield "gold_drop", None

    def _dpo_rules(self, evaluation: dict[str, float], earlier: list[dict[str, float]]):
        """Per-step rules read from the held-out evaluations (DPO): each against the first evaluation."""
        c = self.cfg
        if self.kl_max is not None and "eval/kl" in evaluation:
            kl = evaluation["eval/kl"]
            yield "kl_runaway", (f"held-out KL to the reference is {kl:.3g} nats, above monitor.kl_max={self.kl_max:g}"
                                 ) if kl > self.kl_max else None
        first = earlier[0] if earlier else None
        if first is None:
            return
        if c.length_growth is not None and first.get("eval/response_length", 0) > 0:
            now, then = evaluation.get("eval/response_length", 0.0), first["eval/response_length"]
            yield "length_growth", (f"held-out answers average {now:.3g} tokens, {now / then:.2f}x the first "
                                    f"evaluation's {then:.3g} (monitor.length_growth={c.length_growth:g})"
                                    ) if now >= c.length_growth * then else None
        if first.get("eval/policy_entropy", 0) > 0 and "eval/policy_entropy" in evaluation:
            now, then = evaluation["eval/policy_entropy"], first["eval/policy_entropy"]
            found = None
            if c.entropy_min is not None and now < c.entropy_min:
                found = f"held-out policy entropy is {now:.3g} nats, below monitor.entropy_min={c.entropy_min:g}"
            elif c.entropy_drop is not None and now <= c.entropy_drop * then:
                found = (f"held-out policy entropy is {now:.3g} nats, {now / then:.2f}x the first evaluation's "
                         f"{then:.3g} (monitor.entropy_drop={c.entropy_drop:g})")
            yield "entropy_collapse", found


def monitor_of(cfg, run, per_step: bool = True):
    """The health monitor (monitor.*; None when off) of a PPO run (``per_step``) or a DPO run (its held-out
    evaluations only): each alarm a warning line on stderr and a W&B alert (main process); a resumed run's
    earlier metrics are replayed into it first, so its windows continue."""
    if not cfg.monitor.enabled:
        return None

    def notify(alarm) -> None:
        if not run.main:
            return
        print(f"rlhf_exp: warning: {alarm.line()}", file=sys.stderr, flush=True)
        run.alert(f"{run.run_id}: {alarm.rule}", alarm.line())

    monitor = Monitor(cfg.monitor, kl_target=cfg.phase.kl_target if per_step else None, per_step=per_step)
    if run.resuming:
        monitor.replay(run.previous)
    monitor.notify = notify
    return monitor
