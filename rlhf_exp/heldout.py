"""DPO's held-out evaluation during training (``phase.eval_steps``), the counterpart of PPO's
(:meth:`rlhf_exp.ppo.trainer.PPOTrainer.evaluate`), and the health monitor on it.

Every ``phase.eval_steps`` steps (every epoch when eval_steps is null) and at the last step the policy answers
``phase.eval_num_prompts`` held-out prompts greedily; the answers give, in metrics.jsonl:

- ``eval/gold``: their mean gold reward (embedded tasks);
- ``eval/kl``: the sequence-level KL to the reference (the SFT model; under LoRA the same weights with the
  adapters off): the answer's summed log-ratio log pi(y|x) - log pi_ref(y|x), averaged over prompts. Greedy
  answers make this the log-ratio of the policy's own most likely answers, as PPO's ``eval/kl`` is; it is DPO's
  implicit reward of those answers divided by beta;
- ``eval/response_length`` (tokens, EOS included), ``eval/policy_entropy`` (the policy's mean token entropy on
  them; TRL's own ``eval/entropy`` is the entropy on the eval split's pairs), ``eval/distinct_1``/``_2``;
- ``eval/self_bleu``: self-BLEU of ``phase.eval_samples`` answers sampled at temperature 1 per prompt (seeded:
  the same numbers whatever the process count).

DPO has no reward model, so no ``eval/rm_score``. Every process answers its share of the prompts and every
process ends with the same numbers, so the monitor decides alike on every rank.
"""

from __future__ import annotations

import sys

import torch
from transformers import TrainerCallback

from rlhf_exp import diversity
from rlhf_exp.data.encode import pad
from rlhf_exp.data.encode import prompt_ids as encode_prompt
from rlhf_exp.evaluation import own_generation_config
from rlhf_exp.ppo.core import response_mask
from rlhf_exp.sampling import SeededSampler, sample, token_logprobs


def rows_of(total: int, world: int, rank: int) -> slice:
    share = total // world
    return slice(rank * share, (rank + 1) * share)


def gather(values: list, world: int) -> list:
    """Every process's list, concatenated in rank order, on every process."""
    if world == 1:
        return values
    from accelerate.utils import gather_object

    return gather_object(values)


@torch.no_grad()
def answers(model, tokenizer, ids: list[list[int]], rows: slice, max_new_tokens: int, sampler=None,
            **generate_kwargs) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """This process's rows of ``ids`` (prompts' token ids) answered greedily, or sampled by ``sampler``: (prompt
    + answer ids, attention mask, prompt length, answer mask up to and including the first EOS)."""
    device = next(model.parameters()).device
    batch, attn = pad(ids, tokenizer.pad_token_id, side="left")
    batch, attn = batch[rows].to(device), attn[rows].to(device)
    if sampler is not None:
        out = sample(model, tokenizer, batch, attn, sampler, max_new_tokens, **generate_kwargs)
    else:
        with own_generation_config(model, tokenizer, do_sample=False, max_new_tokens=max_new_tokens) as config:
            out = model.generate(input_ids=batch, attention_mask=attn, generation_config=config, **generate_kwargs)
    mask = response_mask(out[:, batch.shape[1]:], tokenizer.eos_token_id)
    return out, torch.cat([attn, mask.long()], dim=1), batch.shape[1], mask


def token_lists(out: torch.Tensor, prompt_len: int, mask: torch.Tensor) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(out[:, prompt_len:], mask)]


def sample_groups(model, tokenizer, ids: list[list[int]], k: int, seed: int, temperature: float, max_new_tokens: int,
                  world: int, rank: int, **generate_kwargs) -> list[list[list[int]]] | None:
    """``k`` answers per prompt (token ids, EOS included), sampled at ``temperature`` by a sampler seeded with
    ``seed`` (the same answers whatever the process count), on every process; None when k < 2 (self-BLEU needs
    two samples of a prompt)."""
    if k < 2:
        return None
    repeated = [p for p in ids for _ in range(k)]
    rows = rows_of(len(repeated), world, rank)
    sampler = SeededSampler(temperature, seed, rows, len(repeated), next(model.parameters()).device)
    out, _, prompt_len, mask = answers(model, tokenizer, repeated, rows, max_new_tokens, sampler, **generate_kwargs)
    flat = gather(token_lists(out, prompt_len, mask), world)
    return [flat[i * k:(i + 1) * k] for i in range(len(ids))]


class HeldOutEval(TrainerCallback):
    """The held-out evaluation and monitor of a DPO run (a TrainerCallback; the runner sets ``trainer`` after
    building the DPOTrainer). Writes eval/* to the run, the last evaluation and the alarms into ``metrics``
    (the summary's), and acts on alarms as monitor.on_alarm says."""

    def __init__(self, cfg, run, prompts: list, tokenizer, metrics: dict, gold_fn=None, monitor=None,
                 generate_kwargs: dict | None = None):
        self.cfg, self.phase, self.run, self.tokenizer = cfg, cfg.phase, run, tokenizer
        self.prompts = list(prompts)[:cfg.phase.eval_num_prompts]
        self.metrics, self.gold_fn, self.monitor = metrics, gold_fn, monitor
        self.generate_kwargs = generate_kwargs or {}
        self.trainer = None
        self.last: dict[str, float] = {}
        self.done_steps: set[int] = set()
        self.pending: dict[int, list] = {}  # alarm step -> its alarms, until the checkpoint of that step is saved

    # -- when ---------------------------------------------------------------------------------
    def on_step_end(self, args, state, control, **kwargs):
        every = self.phase.eval_steps
        if (every and state.global_step % every == 0) or state.global_step == state.max_steps:
            self._evaluate(state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        if not self.phase.eval_steps:
            self._evaluate(state, control)

    def on_save(self, args, state, control, **kwargs):
        alarms = self.pending.pop(state.global_step, None)
        if not alarms:
            return
        from pathlib import Path

        from rlhf_exp.tracking.checkpoints import keep_alarm_checkpoint

        kept = keep_alarm_checkpoint(Path(args.output_dir) / f"checkpoint-{state.global_step}",
                                     self.run.checkpoint_dir / "alarms")
        for alarm in alarms:
            alarm.checkpoint = str(kept)
        self.metrics["monitor_alarms"] = [a.as_dict() for a in self.monitor.alarms]

    # -- what ---------------------------------------------------------------------------------
    def _evaluate(self, state, control) -> None:
        step = state.global_step
        if not self.prompts or step in self.done_steps:
            return
        self.done_steps.add(step)
        evaluation = self.evaluate(seed=self.cfg.seed * 1_000_003 + step)
        self.last = {**evaluation, "step": step}
        self.run.log(evaluation, step)
        self.metrics.update({k.replace("/", "_"): v for k, v in evaluation.items()})
        if self.monitor is None:
            return
        alarms = self.monitor.update(step, {}, evaluation)
        self.metrics["monitor_alarms"] = [a.as_dict() for a in self.monitor.alarms]
        action = str(self.monitor.cfg.on_alarm) if alarms else None
        if action == "checkpoint":  # transformers saves after this step's callbacks; on_save keeps a copy
            control.should_save = True
            self.pending[step] = alarms
        elif action == "stop":
            control.should_training_stop = True
            reason = (f"monitor.on_alarm=stop: {alarms[0].rule} at step {step}: its policy is the final one "
                      "(checkpoints/final)")
            self.metrics["stopped_by_monitor"] = self.run.manifest["stopped_by_monitor"] = reason
            if self.run.main:
                print(f"rlhf_exp: {reason}", file=sys.stderr, flush=True)

    @torch.no_grad()
    def evaluate(self, seed: int) -> dict[str, float]:
        trainer, tok, phase = self.trainer, self.tokenizer, self.phase
        acc = trainer.accelerator
        world, rank = acc.num_processes, acc.process_index
        prompts = self.prompts[:len(self.prompts) // world * world]  # each process takes an equal share
        if not prompts:
            return {}
        ids = [encode_prompt(tok, p) for p in prompts]
        policy = acc.unwrap_model(trainer.model)
        was_training = policy.training
        policy.eval()
        try:
            rows = rows_of(len(ids), world, rank)
            out, attn, prompt_len, mask = answers(policy, tok, ids, rows, phase.max_new_tokens, **self.generate_kwargs)
            logprobs, entropy = token_logprobs(policy, out, attn, prompt_len, 1.0)
            ref_logprobs = self._reference_logprobs(policy, out, attn, prompt_len)
            kl = ((logprobs - ref_logprobs) * mask).sum(1)
            mine = token_lists(out, prompt_len, mask)
            texts = tok.batch_decode([a for a in mine], skip_special_tokens=True)
            local = [(a, t, k, e, n) for a, t, k, e, n in zip(
                mine, texts, kl.tolist(), (entropy * mask).sum(1).tolist(), mask.sum(1).tolist())]
            samples = self._samples(policy, ids, seed, world, rank)
        finally:
            policy.train(was_training)
        whole = gather(local, world)
        greedy = [a for a, *_ in whole]
        lengths = [n for *_, n in whole]
        metrics = {
            "eval/kl": sum(k for _, _, k, _, _ in whole) / len(whole),
            "eval/response_length": sum(lengths) / len(lengths),
            "eval/policy_entropy": sum(e for _, _, _, e, _ in whole) / max(sum(lengths), 1),
            "eval/distinct_1": diversity.distinct_n(greedy, 1),
            "eval/distinct_2": diversity.distinct_n(greedy, 2),
        }
        if samples is not None:
            metrics["eval/self_bleu"] = diversity.self_bleu(samples)
        if self.gold_fn is not None:
            golds = [self.gold_fn(p, t) for p, (_, t, *_) in zip(prompts, whole)]
            metrics["eval/gold"] = sum(golds) / len(golds)
        return metrics

    def _reference_logprobs(self, policy, out, attn, prompt_len) -> torch.Tensor:
        """Under LoRA the policy with its adapters disabled (TRL's reference); else TRL's frozen reference model."""
        ref = self.trainer.ref_model
        if ref is None:
            with policy.disable_adapter():
                return token_logprobs(policy, out, attn, prompt_len, 1.0)[0]
        return token_logprobs(ref, out, attn, prompt_len, 1.0)[0]

    def _samples(self, policy, ids: list[list[int]], seed: int, world: int, rank: int) -> list[list[list[int]]] | None:
        return sample_groups(policy, self.tokenizer, ids, self.phase.eval_samples, seed, 1.0, self.phase.max_new_tokens,
                             world, rank, **self.generate_kwargs)
