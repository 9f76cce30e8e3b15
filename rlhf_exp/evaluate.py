"""``python -m rlhf_exp.evaluate <policy run> [--baseline <run>]``: win rate of a policy against its SFT parent
(or any run) on held-out prompts, with a 95% confidence interval, judged by

- ``gold``: the embedded task's gold reward (``rlhf_exp.data.synthetic.gold_reward``; default when the data has it);
- ``rm``: a reward-model run (a PPO run's own reward model; for a DPO or SFT run the latest successful RM trained
  from the same SFT run, or ``--reward-run``); default whenever one is found;
- a judge model given by its folder: a causal LM asked "Which answer is better, A or B?", read from its next-token
  log-probabilities of "A" and "B", asked in both orders (a verdict that flips with the order is a tie).

Both policies answer the same prompts greedily (the policy run's data config: the embedded task's held-out gold
prompts, else the eval split's prompts; ``--num-prompts`` caps them). Per prompt: win / tie / loss. Win rate =
(wins + ties/2) / n with a 95% Wilson score interval. Writes ``evaluation.json`` into the policy run's folder
(or ``--out``) and prints a table. ``--lm-eval TASKS`` also runs lm-evaluation-harness on the run's checkpoint
(the ``lmeval`` extra). See docs/evaluate.md.

torch is imported only once the arguments are checked (``--help`` stays fast).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

POLICY_PHASES = ("sft", "ppo", "dpo")
DEFAULT_NUM_PROMPTS = 500
# reward-model scores closer than this are a tie (scores of one answer batched with different neighbours differ by
# float noise, ~1e-6); identical answers are always a tie, whatever the judge
DEFAULT_TIE_EPS = 1e-4
Z95 = 1.959963984540054


class EvaluateError(Exception):
    """One line for the user; exit status 2."""


# ----------------------------------------------------------------------------------- the statistics


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion successes / n (successes may be fractional: ties count 1/2).

    Counting a tie as half a win gives a per-prompt outcome in {0, 1/2, 1} whose variance is at most the
    Bernoulli one, so the interval is conservative when there are ties."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def outcome(policy_score: float, baseline_score: float, eps: float = 0.0) -> int:
    """+1 win, 0 tie (|diff| <= eps; exact equality when eps = 0), -1 loss."""
    diff = policy_score - baseline_score
    if abs(diff) <= eps:
        return 0
    return 1 if diff > 0 else -1


def tally(outcomes: list[int]) -> dict[str, Any]:
    """n, wins, ties, losses, win_rate = (wins + ties/2)/n and its 95% Wilson interval."""
    n = len(outcomes)
    wins, ties = outcomes.count(1), outcomes.count(0)
    losses = n - wins - ties
    rate = (wins + ties / 2) / n if n else float("nan")
    low, high = wilson_interval(wins + ties / 2, n)
    return {"n": n, "wins": wins, "ties": ties, "losses": losses, "win_rate": rate, "ci_low": low, "ci_high": high,
            "interval": "wilson95"}


def both_orders(prefers_first: Callable[[Any, str, str], float], prompt, policy: str, baseline: str) -> tuple[int, float]:
    """A pairwise judge asked twice, the policy's answer first then second. ``prefers_first(prompt, first, second)``
    is the judge's margin for the first answer (log p("A") - log p("B")). Returns (outcome, mean margin for the
    policy): a win when both orders prefer the policy, a loss when both prefer the baseline, a tie otherwise (the
    verdict followed the position, not the answer)."""
    forward = prefers_first(prompt, policy, baseline)
    backward = -prefers_first(prompt, baseline, policy)
    if forward > 0 and backward > 0:
        verdict = 1
    elif forward < 0 and backward < 0:
        verdict = -1
    else:
        verdict = 0
    return verdict, (forward + backward) / 2


# ----------------------------------------------------------------------------------- runs


@dataclass
class RunInfo:
    manifest: dict
    path: Path
    cfg: Any = None  # the typed config sections: SimpleNamespace(model, data, hardware, phase, output_root)
    checkpoint: str | None = None

    @property
    def run_id(self) -> str:
        return str(self.manifest.get("run_id"))

    @property
    def phase(self) -> str:
        return str(self.manifest.get("phase"))


def find_run(ref: str, root: str, what: str) -> RunInfo:
    from rlhf_exp.lineage import find

    manifest, problem = find(ref, root)
    if manifest is None:
        raise EvaluateError(f"{what}: {problem}")
    return RunInfo(manifest, Path(manifest["path"]))


def run_checkpoint(run: RunInfo, kind: str, what: str) -> str:
    """The run's saved model: checkpoints/final (a policy) or checkpoints/reward_model (an RM run)."""
    if run.manifest.get("status") != "succeeded":
        raise EvaluateError(f"{what} {run.path} did not succeed (status: {run.manifest.get('status')}): it has no final model")
    recorded = run.manifest.get("checkpoint")
    folder = Path(recorded) if recorded else run.path / "checkpoints" / ("reward_model" if kind == "reward_model" else "final")
    if not folder.is_absolute():
        folder = run.path / folder
    if not (folder / "config.json").is_file():
        raise EvaluateError(f"{what} {run.path}: no {kind} checkpoint in {folder}")
    return str(folder)


def typed_config(run: RunInfo):
    """The run's config.yaml as typed sections (model, data, hardware, phase) through the project's schemas."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from rlhf_exp.config.schema import GROUP_SCHEMAS, PHASE_SCHEMAS

    file = run.path / "config.yaml"
    if not file.is_file():
        raise EvaluateError(f"{run.path} has no config.yaml (not a run folder of rlhf_exp)")
    raw = OmegaConf.load(file)
    sections = {}
    try:
        for name in ("model", "data", "hardware"):
            sections[name] = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(GROUP_SCHEMAS[name]), raw[name]))
        schema = PHASE_SCHEMAS[str(raw.phase.name)]
        sections["phase"] = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), raw.phase))
    except Exception as exc:  # OmegaConf raises many types
        raise EvaluateError(f"{file}: cannot be read with this version's schema ({str(exc).splitlines()[0]})") from exc
    return SimpleNamespace(**sections, output_root=str(raw.get("output_root", "outputs")))


def parent(run: RunInfo, phase: str) -> dict | None:
    return next((p for p in run.manifest.get("parents") or [] if isinstance(p, dict) and p.get("phase") == phase), None)


def default_baseline(policy: RunInfo, root: str) -> RunInfo:
    sft = parent(policy, "sft")
    if sft is None:
        raise EvaluateError(f"{policy.path} ({policy.phase}) records no SFT parent: give --baseline <run folder or id>")
    return find_run(sft.get("path") if sft.get("path") and Path(sft["path"]).is_dir() else str(sft.get("run_id")),
                    root, "the SFT parent")


def search_roots(policy: RunInfo, root: str) -> list[Path]:
    """Where a DPO/SFT run's reward model is looked for: the pipeline folder it sits in, its output_root, --root."""
    roots = [policy.path.parent]
    if policy.cfg is not None:
        roots.append(Path(policy.cfg.output_root))
    roots.append(Path(root))
    seen, out = set(), []
    for r in roots:
        if r.is_dir() and r.resolve() not in seen:
            seen.add(r.resolve())
            out.append(r)
    return out


def default_reward_run(policy: RunInfo, root: str) -> tuple[RunInfo | None, str]:
    """(the RM run, how it was chosen) or (None, why none)."""
    rm = parent(policy, "rm")
    if rm is not None:
        ref = rm.get("path") if rm.get("path") and Path(rm["path"]).is_dir() else str(rm.get("run_id"))
        return find_run(ref, root, "the PPO run's reward model"), "the PPO run's reward model"
    sft = parent(policy, "sft") if policy.phase != "sft" else {"run_id": policy.run_id, "path": str(policy.path)}
    if sft is None:
        return None, "the run records no SFT parent"
    from rlhf_exp.tracking.lineage import descends, latest_run

    # the rule PPO's parent resolution uses (tracking.lineage), over each folder runs may be in
    found = [latest_run(r, "rm", {}, where=lambda m: descends(m, sft)) for r in search_roots(policy, root)]
    latest = latest_run(None, "rm", {}, among=[m for m in found if m is not None])
    if latest is None:
        return None, f"no successful RM run trained from SFT run {sft.get('run_id')} (give --reward-run)"
    return RunInfo(latest, Path(latest["path"])), f"the latest RM run trained from SFT run {sft.get('run_id')}"


# ----------------------------------------------------------------------------------- models


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def eval_hardware(cfg):
    """The run's hardware settings for inference here: whole weights (no 4/8-bit), this machine's accelerator."""
    import dataclasses

    import torch

    hw = cfg.hardware
    return dataclasses.replace(hw, load_in_4bit=False, load_in_8bit=False,
                               accelerator="cuda" if torch.cuda.is_available() else "cpu")


def load_policy(run: RunInfo):
    from rlhf_exp.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(run.cfg.model, checkpoint=run.checkpoint)
    model = load_causal_lm(run.cfg.model, eval_hardware(run.cfg), tokenizer, checkpoint=run.checkpoint, trained=False)
    return tokenizer, model.to(device()).eval()


def held_out_prompts(policy: RunInfo) -> tuple[list, str, bool]:
    """(prompts, where they come from, whether the gold reward applies)."""
    from rlhf_exp.data.loading import held_out_prompts as prompts_of
    from rlhf_exp.data.loading import preference_data, sft_data

    data_cfg = policy.cfg.data
    data = sft_data(data_cfg) if policy.phase == "sft" else preference_data(data_cfg)
    prompts = prompts_of(data)
    if not prompts:
        raise EvaluateError(f"{policy.path}: its data ({data_cfg.name}) has no held-out prompts (no eval split)")
    if data.eval_prompts:
        return prompts, "the embedded task's held-out gold prompts (data.eval_prompts)", True
    return prompts, f"the eval split's prompts of data={data_cfg.name}", False


def answer_text(answer) -> str:
    return answer if isinstance(answer, str) else str(answer)


@dataclass
class Judge:
    name: str
    outcomes: list[int] = field(default_factory=list)
    scores: list[tuple[float, float]] = field(default_factory=list)  # (policy, baseline) per prompt, or (margin, 0)
    detail: dict = field(default_factory=dict)


def judge_gold(prompts, policy_answers, baseline_answers) -> Judge:
    from rlhf_exp.data.synthetic import gold_reward

    judge = Judge("gold", detail={"what": "the embedded task's gold reward; tie: equal scores"})
    for p, a, b in zip(prompts, policy_answers, baseline_answers):
        sa, sb = gold_reward(p, a), gold_reward(p, b)
        judge.scores.append((sa, sb))
        judge.outcomes.append(0 if a.strip() == b.strip() else outcome(sa, sb))
    return judge


def judge_rm(rm: RunInfo, how: str, prompts, policy_answers, baseline_answers, batch_size: int, eps: float) -> Judge:
    from rlhf_exp.evaluation import reward_scores
    from rlhf_exp.models import load_reward_model, load_tokenizer

    tokenizer = load_tokenizer(rm.cfg.model, checkpoint=rm.checkpoint)
    model = load_reward_model(rm.cfg.model, eval_hardware(rm.cfg), tokenizer, rm.checkpoint, trained=False).to(device())
    policy_scores = reward_scores(model, tokenizer, prompts, policy_answers, batch_size).tolist()
    baseline_scores = reward_scores(model, tokenizer, prompts, baseline_answers, batch_size).tolist()
    judge = Judge("rm", detail={"what": f"reward model of run {rm.run_id} ({how}); tie: |diff| <= {eps}",
                                "reward_run": rm.run_id, "reward_run_path": str(rm.path), "chosen_as": how, "tie_eps": eps})
    for a, b, sa, sb in zip(policy_answers, baseline_answers, policy_scores, baseline_scores):
        judge.scores.append((sa, sb))
        judge.outcomes.append(0 if a.strip() == b.strip() else outcome(sa, sb, eps))
    return judge


PAIRWISE_TEMPLATE = ("Which answer to the question is better, A or B?\n\nQuestion:\n{question}\n\nAnswer A:\n{first}\n\n"
                     "Answer B:\n{second}\n\nReply with one letter, A or B.")


def question_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt)


class ModelJudge:
    """A causal LM read as a pairwise judge: margin = log p("A") - log p("B") for the next token after the question
    (through its chat template when it has one, else plain text ending in "Answer:")."""

    def __init__(self, folder: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder).to(device()).eval()
        self.letters = [self._letter_id(letter) for letter in ("A", "B")]

    def _letter_id(self, letter: str) -> int:
        # the token the reply would start with: "A" after a chat template's generation prompt, " A" after "Answer:"
        text = letter if self.tokenizer.chat_template else " " + letter
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[0]

    def text(self, prompt, first: str, second: str) -> list[int]:
        question = PAIRWISE_TEMPLATE.format(question=question_text(prompt), first=first.strip(), second=second.strip())
        if self.tokenizer.chat_template:
            out = self.tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                                     tokenize=True, return_dict=True)
            return list(out["input_ids"])
        return list(self.tokenizer(question + "\nAnswer:")["input_ids"])

    def __call__(self, prompt, first: str, second: str) -> float:
        import torch

        ids = torch.tensor([self.text(prompt, first, second)], device=self.model.device)
        with torch.no_grad():
            logits = self.model(input_ids=ids).logits[0, -1].float()
        logp = torch.log_softmax(logits, dim=-1)
        return float(logp[self.letters[0]] - logp[self.letters[1]])


def judge_pairwise(name: str, prefers_first, prompts, policy_answers, baseline_answers) -> Judge:
    from tqdm.auto import tqdm

    judge = Judge(name, detail={"what": f"pairwise judge model {name}, asked in both orders; a verdict that flips "
                                        "with the order is a tie", "judge_model": name})
    for p, a, b in tqdm(list(zip(prompts, policy_answers, baseline_answers)), desc="judge", leave=False):
        if a.strip() == b.strip():
            judge.outcomes.append(0)
            judge.scores.append((0.0, 0.0))
            continue
        verdict, margin = both_orders(prefers_first, p, a, b)
        judge.outcomes.append(verdict)
        judge.scores.append((margin, 0.0))
    return judge


# ----------------------------------------------------------------------------------- lm-evaluation-harness


def require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise EvaluateError("--lm-eval needs lm-evaluation-harness: pip install -e .[lmeval]") from None
    return lm_eval


def run_lm_eval(lm_eval, checkpoint: str, tasks: list[str], limit: float | None, batch_size: int,
                include: str | None = None) -> dict:
    """lm_eval.simple_evaluate on the run's checkpoint folder through the harness's HF model ("hf"); ``include``:
    a folder of the user's own task YAMLs (lm_eval's TaskManager include_path)."""
    extra = {}
    if include:
        from lm_eval.tasks import TaskManager

        extra["task_manager"] = TaskManager(include_path=include)
    result = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={checkpoint}", tasks=tasks, limit=limit,
                                     batch_size=batch_size, device=str(device()), **extra)
    if not result:
        return {}
    return json.loads(json.dumps({k: result.get(k) for k in ("results", "versions", "n-shot") if k in result},
                                 default=str))


# ----------------------------------------------------------------------------------- main


def table(judges: dict[str, dict]) -> str:
    lines = [f"{'judge':<28} {'n':>5} {'wins':>5} {'ties':>5} {'losses':>6} {'win rate':>9}  95% CI (Wilson)"]
    for name, t in judges.items():
        label = name if len(name) <= 28 else "…" + name[-27:]
        lines.append(f"{label:<28} {t['n']:>5} {t['wins']:>5} {t['ties']:>5} {t['losses']:>6} {t['win_rate']:>9.3f}  "
                     f"[{t['ci_low']:.3f}, {t['ci_high']:.3f}]")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m rlhf_exp.evaluate",
        description="Win rate of a policy run against a baseline run (default: its SFT parent) on held-out prompts, "
                    "with a 95%% Wilson interval; optional lm-evaluation-harness tasks. See docs/evaluate.md.")
    parser.add_argument("run", help="the policy run (folder or run id): sft, ppo or dpo")
    parser.add_argument("--baseline", help="the run it is compared with (default: its SFT parent)")
    parser.add_argument("--judge", action="append", metavar="rm|gold|PATH",
                        help="judge (repeatable): rm, gold, or the folder of a causal LM asked pairwise in both orders "
                             "(default: gold when the data has a gold reward, and rm when a reward model is found)")
    parser.add_argument("--reward-run", help="the RM run the rm judge uses (default: a PPO run's own; else the latest "
                                             "RM run trained from the same SFT run)")
    parser.add_argument("--num-prompts", type=int, default=DEFAULT_NUM_PROMPTS,
                        help=f"at most this many held-out prompts, the first ones (default {DEFAULT_NUM_PROMPTS}; 0: all)")
    parser.add_argument("--tie-eps", type=float, default=DEFAULT_TIE_EPS,
                        help=f"reward-model scores closer than this are a tie (default {DEFAULT_TIE_EPS})")
    parser.add_argument("--out", help="the JSON written (default: <run folder>/evaluation.json)")
    parser.add_argument("--root", default="outputs", help="where run ids are looked up (default: outputs)")
    parser.add_argument("--lm-eval", metavar="TASKS", help="comma-separated lm-evaluation-harness tasks run on the "
                                                          "policy's checkpoint (needs: pip install -e .[lmeval])")
    parser.add_argument("--lm-eval-limit", type=float, help="examples per lm-eval task (lm_eval's limit)")
    parser.add_argument("--lm-eval-include", metavar="DIR", help="a folder of your own lm-eval task YAMLs")
    parser.add_argument("--skip-winrate", action="store_true", help="only the lm-eval tasks, no win rate")
    return parser.parse_args(argv)


def evaluate(args) -> dict:
    policy = find_run(args.run, args.root, "the policy run")
    if policy.phase not in POLICY_PHASES:
        raise EvaluateError(f"{policy.path} is a run of phase={policy.phase}; give a policy run "
                            f"({', '.join(POLICY_PHASES)})")
    policy.checkpoint = run_checkpoint(policy, "policy", "the policy run")
    policy.cfg = typed_config(policy)
    lm_eval = require_lm_eval() if args.lm_eval else None
    result: dict[str, Any] = {"policy": {"run_id": policy.run_id, "phase": policy.phase, "path": str(policy.path),
                                         "checkpoint": policy.checkpoint}}
    if not args.skip_winrate:
        result.update(winrate(policy, args))
    elif not args.lm_eval:
        raise EvaluateError("--skip-winrate without --lm-eval: nothing to do")
    if lm_eval is not None:
        tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
        result["lm_eval"] = {"tasks": tasks, "limit": args.lm_eval_limit,
                             **run_lm_eval(lm_eval, policy.checkpoint, tasks, args.lm_eval_limit,
                                           policy.cfg.phase.per_device_eval_batch_size, args.lm_eval_include)}
    return result


def winrate(policy: RunInfo, args) -> dict:
    baseline = find_run(args.baseline, args.root, "--baseline") if args.baseline else default_baseline(policy, args.root)
    if baseline.phase not in POLICY_PHASES:
        raise EvaluateError(f"the baseline {baseline.path} is a run of phase={baseline.phase}; give a policy run")
    baseline.checkpoint = run_checkpoint(baseline, "policy", "the baseline")
    baseline.cfg = typed_config(baseline)

    prompts, source, has_gold = held_out_prompts(policy)
    if args.num_prompts and args.num_prompts > 0:
        prompts = prompts[:args.num_prompts]
    # which judges, decided (and checked) before any model is loaded
    wanted = args.judge or (["gold"] if has_gold else []) + ["rm"]
    judges_plan: list[tuple[str, Any]] = []
    notes: list[str] = []
    for name in wanted:
        if name == "gold":
            if not has_gold:
                raise EvaluateError(f"--judge gold: data={policy.cfg.data.name} has no gold reward (embedded task only)")
            judges_plan.append(("gold", None))
        elif name == "rm":
            if args.reward_run:
                rm, how = find_run(args.reward_run, args.root, "--reward-run"), "--reward-run"
                if rm.phase != "rm":
                    raise EvaluateError(f"--reward-run {rm.path} is a run of phase={rm.phase}, not rm")
            else:
                rm, how = default_reward_run(policy, args.root)
            if rm is None:
                if args.judge:  # asked for explicitly
                    raise EvaluateError(f"--judge rm: {how}")
                notes.append(f"no rm judge: {how}")
                continue
            rm.checkpoint = run_checkpoint(rm, "reward_model", "the reward-model run")
            rm.cfg = typed_config(rm)
            judges_plan.append(("rm", (rm, how)))
        else:
            folder = Path(name).expanduser()
            if not (folder / "config.json").is_file():
                raise EvaluateError(f"--judge {name}: neither rm, gold, nor a model folder (holding config.json)")
            judges_plan.append((str(folder), None))
    if not judges_plan:
        raise EvaluateError("no judge available: the data has no gold reward and " + "; ".join(notes or ["no RM found"]) +
                            "; give --reward-run or --judge <judge model folder>")
    for note in notes:
        print(f"rlhf_exp.evaluate: {note}", file=sys.stderr)

    import torch

    torch.manual_seed(0)
    max_new_tokens = policy.cfg.phase.max_new_tokens
    batch_size = policy.cfg.phase.per_device_eval_batch_size
    answers = {}
    from rlhf_exp.evaluation import generate_greedy

    for role, run in (("policy", policy), ("baseline", baseline)):
        tokenizer, model = load_policy(run)
        answers[role] = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size,
                                        desc=f"generate ({role} {run.phase})")
        del model
    a, b = answers["policy"], answers["baseline"]

    judged: list[Judge] = []
    for name, extra in judges_plan:
        if name == "gold":
            judged.append(judge_gold(prompts, a, b))
        elif name == "rm":
            rm, how = extra
            print(f"rlhf_exp.evaluate: rm judge: run {rm.run_id} ({how})", file=sys.stderr)
            judged.append(judge_rm(rm, how, prompts, a, b, batch_size, args.tie_eps))
        else:
            judged.append(judge_pairwise(name, ModelJudge(name), prompts, a, b))

    rows = []
    for i, prompt in enumerate(prompts):
        row = {"prompt": prompt, "policy_answer": a[i], "baseline_answer": b[i]}
        for j in judged:
            row[j.name] = {"scores": list(j.scores[i]), "outcome": j.outcomes[i]}
        rows.append(row)
    return {
        "baseline": {"run_id": baseline.run_id, "phase": baseline.phase, "path": str(baseline.path),
                     "checkpoint": baseline.checkpoint},
        "prompts": {"source": source, "n": len(prompts), "max_new_tokens": max_new_tokens, "decoding": "greedy"},
        "win_rate_definition": "(wins + ties/2) / n; 95% Wilson score interval on that proportion",
        "judges": {j.name: {**tally(j.outcomes), **j.detail} for j in judged},
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = evaluate(args)
    except EvaluateError as exc:
        print(f"rlhf_exp.evaluate: error: {exc}", file=sys.stderr)
        return 2
    from rlhf_exp.tracking.run import now_iso, write_json_atomic

    result["time"] = now_iso()
    out = Path(args.out) if args.out else Path(result["policy"]["path"]) / "evaluation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    if "judges" in result:
        print(f"{result['policy']['phase']} {result['policy']['run_id']}  vs  {result['baseline']['phase']} "
              f"{result['baseline']['run_id']}  on {result['prompts']['n']} prompts ({result['prompts']['source']})")
        print(table(result["judges"]))
    if "lm_eval" in result:
        for task, metrics in (result["lm_eval"].get("results") or {}).items():
            print(f"lm-eval {task}: " + ", ".join(f"{k}={v}" for k, v in (metrics or {}).items()
                                                   if isinstance(v, (int, float)) and k != "sample_len"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
