"""The embedded task: sort a short list of digits, with a programmatic gold reward.

    prompt  "3 1 4 1 5 ="        answer " 1 1 3 4 5"        gold = fraction of positions right

Design, from measurements on this task (README, "The embedded task"):

* SFT demonstrations carry a *consistent demonstrator habit*: a fraction (default 60%) swap the
  last two answer digits. Random mistakes never form a mode, so greedy decoding after SFT ignores
  them and lands near the ceiling; a consistent habit is what imitation copies, leaving room for
  preference learning (RM, PPO, DPO) to do better than SFT.
* Preference pairs are two different candidate answers to one prompt (the correct one, the habit,
  and other plausible mistakes), labelled by simulated annotators who follow the gold reward through
  a Bradley-Terry model: P(a preferred to b) = sigmoid((gold(a) - gold(b)) / temperature). The
  temperature is solved for so that annotators agree with gold on ``annotator_agreement`` of the
  non-tied pairs (default 0.72, as InstructGPT reports for its labellers). Ties (equal gold) are
  dropped by default, as the binarized public preference sets do: annotators pick at random on them,
  which caps any reward model's accuracy.
* Several annotators per pair (``data.synthetic.num_annotators`` = n > 1): each pair also carries n
  independent labels (``Pair.labels``, "chosen" or "rejected" relative to the pair as stored), drawn
  from the same Bradley-Terry model, for agreement statistics (``python -m rlhf_exp.data check``). The
  first annotator is the one the training label always came from, so the pairs trained on are the same
  whatever n (bit for bit); the others are drawn from a stream of their own.
* Held-out prompts never appear in the training splits.

The same task in chat form (``data.synthetic.form=chat``, ``data=synthetic_chat``) asks in words and
answers in plain digits, as messages the model's chat template renders:

    [{"role": "user", "content": "Sort these digits: 3 1 4 1 5"}]  ->  [{"role": "assistant", "content": "1 1 3 4 5"}]

with the same demonstrator habit, annotators and gold reward (parsed from the answer text), so a
model with a real tokenizer and chat template gets a gold score too.

Gold is for evaluation only: no phase trains on it unless a config asks for it.
Pure Python (``random``), so the data is identical on every machine for a given seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

SEPARATOR = "="
CHAT_INSTRUCTION = "Sort these digits:"


@dataclass(frozen=True)
class Pair:
    # strings (plain form) or message lists (chat form)
    prompt: str | list
    chosen: str | list
    rejected: str | list
    gold_chosen: float
    gold_rejected: float
    # each simulated annotator's pick, "chosen" or "rejected" (the first is the label trained on, so always
    # "chosen"); empty with one annotator
    labels: tuple = ()


def prompt_text(digits: list[int]) -> str:
    return " ".join(map(str, digits)) + " " + SEPARATOR


def answer_text(digits: list[int]) -> str:
    return "".join(f" {d}" for d in digits)


def chat_prompt(prompt: str) -> list[dict[str, str]]:
    """The plain prompt "3 1 4 1 5 =" as the chat form's user message."""
    return [{"role": "user", "content": f"{CHAT_INSTRUCTION} {' '.join(map(str, parse_prompt(prompt)))}"}]


def chat_answer(answer: str) -> list[dict[str, str]]:
    """The plain answer " 1 1 3 4 5" as the chat form's assistant message "1 1 3 4 5"."""
    return [{"role": "assistant", "content": " ".join(parse_answer(answer))}]


def parse_prompt(prompt: str | list[dict]) -> list[int]:
    """Digits of a prompt in either form (a chat prompt: its last user message)."""
    if isinstance(prompt, list):
        prompt = next(m["content"] for m in reversed(prompt) if m["role"] == "user")
    body = prompt.strip()
    if body.startswith(CHAT_INSTRUCTION):
        body = body[len(CHAT_INSTRUCTION):]
    if body.endswith(SEPARATOR):
        body = body[: -len(SEPARATOR)]
    return [int(tok) for tok in body.split()]


def parse_answer(text: str) -> list[str]:
    """Tokens of a generated answer up to the end of sequence (special tokens already stripped)."""
    return text.replace(SEPARATOR, " ").split()


def gold_reward(prompt: str | list[dict], answer: str) -> float:
    """Fraction of positions equal to the sorted prompt; missing or extra positions count as wrong.
    ``prompt`` in either form; ``answer`` is the answer's text (a chat answer: the message content)."""
    target = [str(d) for d in sorted(parse_prompt(prompt))]
    got = parse_answer(answer)
    right = sum(1 for t, g in zip(target, got) if t == g)
    return right / max(len(target), len(got))


def habit(answer: list[int]) -> list[int]:
    """The demonstrators' consistent mistake: the last two digits swapped."""
    out = list(answer)
    out[-1], out[-2] = out[-2], out[-1]
    return out


def corrupt(answer: list[int], rng: random.Random) -> list[int]:
    """A random mistake: a swap of two positions or a wrong digit (once or twice)."""
    out = list(answer)
    for _ in range(rng.choice((1, 2))):
        if rng.random() < 0.5:
            i, j = rng.sample(range(len(out)), 2)
            out[i], out[j] = out[j], out[i]
        else:
            out[rng.randrange(len(out))] = rng.randrange(10)
    return out


class SortTask:
    """Generates every split of the embedded task from ``seed``; splits use independent streams."""

    def __init__(self, num_digits: int = 5, seed: int = 0):
        self.num_digits = num_digits
        self.seed = seed

    # -- prompts ---------------------------------------------------------------------------
    def _rng(self, stream: str) -> random.Random:
        return random.Random(f"{self.seed}:{stream}")

    def _digits(self, rng: random.Random) -> list[int]:
        return [rng.randrange(10) for _ in range(self.num_digits)]

    def eval_prompts(self, n: int) -> list[str]:
        """Held-out prompts, distinct from each other; training splits exclude them."""
        rng = self._rng("eval-prompts")
        prompts: dict[str, None] = {}  # insertion-ordered set
        while len(prompts) < n:
            prompts[prompt_text(self._digits(rng))] = None
        return list(prompts)

    def _train_prompts(self, stream: str, n: int, held_out: set[str]) -> list[list[int]]:
        rng = self._rng(stream)
        out = []
        while len(out) < n:
            digits = self._digits(rng)
            if prompt_text(digits) not in held_out:
                out.append(digits)
        return out

    # -- SFT demonstrations ------------------------------------------------------------------
    def sft_records(self, n: int, stream: str, habit_fraction: float, noise_fraction: float,
                    held_out: set[str]) -> list[dict]:
        rng = self._rng(stream + "-answers")
        records = []
        for digits in self._train_prompts(stream, n, held_out):
            answer = sorted(digits)
            u = rng.random()
            if u < habit_fraction:
                answer = habit(answer)
            elif u < habit_fraction + noise_fraction:
                answer = corrupt(answer, rng)
            records.append({"prompt": prompt_text(digits), "completion": answer_text(answer)})
        return records

    # -- preference pairs ----------------------------------------------------------------------
    def _candidate(self, digits: list[int], rng: random.Random) -> list[int]:
        target = sorted(digits)
        u = rng.random()
        if u < 0.3:
            return target
        if u < 0.6:
            return habit(target)
        if u < 0.9:
            return corrupt(target, rng)
        shuffled = list(digits)
        rng.shuffle(shuffled)
        return shuffled

    def candidate_pairs(self, n: int, stream: str, held_out: set[str], drop_ties: bool) -> list[tuple]:
        rng = self._rng(stream + "-candidates")
        pairs = []
        prompts = self._train_prompts(stream, n * 4, held_out)
        for digits in prompts:
            if len(pairs) == n:
                break
            a, b = self._candidate(digits, rng), self._candidate(digits, rng)
            if a == b:
                continue
            prompt = prompt_text(digits)
            ga, gb = gold_reward(prompt, answer_text(a)), gold_reward(prompt, answer_text(b))
            if drop_ties and ga == gb:
                continue
            pairs.append((prompt, answer_text(a), answer_text(b), ga, gb))
        return pairs

    def preference_pairs(self, n: int, stream: str, agreement: float, drop_ties: bool,
                         held_out: set[str], num_annotators: int = 1) -> list[Pair]:
        candidates = self.candidate_pairs(n, stream, held_out, drop_ties)
        temperature = bt_temperature([abs(ga - gb) for *_, ga, gb in candidates if ga != gb], agreement)
        rng = self._rng(stream + "-annotators")
        # the other annotators draw from their own stream: the first annotator's labels (trained on) stay as they are
        others = self._rng(stream + "-annotators-more") if num_annotators > 1 else None
        pairs = []
        for prompt, a, b, ga, gb in candidates:
            p_a = 0.5 if ga == gb else sigmoid((ga - gb) / temperature)
            picks_a = rng.random() < p_a
            labels = ()
            if others is not None:
                labels = ("chosen", *("chosen" if (others.random() < p_a) == picks_a else "rejected"
                                      for _ in range(num_annotators - 1)))
            if picks_a:
                pairs.append(Pair(prompt, a, b, ga, gb, labels))
            else:
                pairs.append(Pair(prompt, b, a, gb, ga, labels))
        return pairs


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x > -60 else 0.0


def bt_temperature(gaps: list[float], agreement: float) -> float:
    """Temperature at which Bradley-Terry annotators agree with gold on ``agreement`` of the pairs."""
    if not gaps:
        return 1.0

    def expected(t: float) -> float:
        return sum(sigmoid(g / t) for g in gaps) / len(gaps)

    lo, hi = 1e-4, 1e4  # expected() falls from ~1 to 0.5 as t grows
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        if expected(mid) > agreement:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def build_task_data(syn, seed: int) -> dict:
    """Every split of the embedded task for a ``data.synthetic`` config node (plain strings; the chat
    form is rendered from them by ``chat_form``, so both forms hold the same examples)."""
    task = SortTask(num_digits=syn.num_digits, seed=seed)
    eval_prompts = task.eval_prompts(syn.num_eval_prompts)
    held_out = set(eval_prompts)
    sft_args = dict(habit_fraction=syn.sft_habit_fraction, noise_fraction=syn.sft_noise_fraction, held_out=held_out)
    pref_args = dict(agreement=syn.annotator_agreement, drop_ties=syn.drop_ties, held_out=held_out,
                     num_annotators=getattr(syn, "num_annotators", 1))
    return {
        "sft_train": task.sft_records(syn.num_sft_train, "sft-train", **sft_args),
        "sft_eval": task.sft_records(syn.num_sft_eval, "sft-eval", **sft_args),
        "pref_train": task.preference_pairs(syn.num_pref_train, "pref-train", **pref_args),
        "pref_eval": task.preference_pairs(syn.num_pref_eval, "pref-eval", **pref_args),
        "eval_prompts": eval_prompts,
    }


def chat_form(splits: dict) -> dict:
    """The splits of ``build_task_data`` as chat messages: same prompts, answers, pairs and golds."""
    def sft(records):
        return [{"prompt": chat_prompt(r["prompt"]), "completion": chat_answer(r["completion"])} for r in records]

    def pairs(ps):
        return [Pair(chat_prompt(p.prompt), chat_answer(p.chosen), chat_answer(p.rejected), p.gold_chosen,
                     p.gold_rejected, p.labels) for p in ps]

    return {"sft_train": sft(splits["sft_train"]), "sft_eval": sft(splits["sft_eval"]),
            "pref_train": pairs(splits["pref_train"]), "pref_eval": pairs(splits["pref_eval"]),
            "eval_prompts": [chat_prompt(p) for p in splits["eval_prompts"]]}
