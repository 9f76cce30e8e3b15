"""DPO's held-out evaluation during training (``phase.eval_steps``), the counterpart of PPO's
(:meth:`rlhf_exp.ppo.trainer.PPOTrainer.evaluate`), and the health monitor on it.

Before training (step 0: the SFT model, the baseline of the monitor's rules), every ``phase.eval_steps`` steps
(every epoch when eval_steps is null) and at the last step (also when early stopping or the monitor ended
training: the final model is measured) the policy answers
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

DPO has no reward model, so no ``eval/rm_score``. Every process answers its share of the prompts, in batches of
``phase.per_device_eval_batch_size`` (generation and the full-vocabulary scoring forwards), under the trainer's
autocast (policy and reference compared in the same precision), and every process ends with the same numbers, so
the monitor decides alike on every rank.
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
def answer_chunks(model, tokenizer, ids: list[list[int]], rows: slice, max_new_tokens: int, chunk: int, device,
                  seed: int | None = None, temperature: float = 1.0, **generate_kwargs):
    """This process's ``rows`` of ``ids`` (prompts' token ids, left-padded together so every process shares one prompt
    length) answered in batches of ``chunk``: greedily, or sampled at ``temperature`` by a sampler seeded with
    ``seed`` over the absolute rows (the same answers whatever the chunk size and process count). Yields (prompt +
    answer ids, attention mask, prompt length, answer mask up to and including the first EOS) per batch. Every
    process makes the same number of generate calls (equal shares), as synchronised generation needs."""
    batch, attn = pad(ids, tokenizer.pad_token_id, side="left")
    prompt_len = batch.shape[1]
    for start in range(rows.start, rows.stop, max(1, chunk)):
        sub = slice(start, min(start + max(1, chunk), rows.stop))
        b, a = batch[sub].to(device), attn[sub].to(device)
        if seed is not None:
            out = sample(model, tokenizer, b, a, SeededSampler(temperature, seed, sub, len(ids), device), max_new_tokens,
                         **generate_kwargs)
        else:
            with own_generation_config(model, tokenizer, do_sample=False, max_new_tokens=max_new_tokens) as config:
                out = model.generate(input_ids=b, attention_mask=a, generation_config=config, **generate_kwargs)
        mask = response_mask(out[:, prompt_len:], tokenizer.eos_token_id)
        yield out, torch.cat([a, mask.long()], dim=1), prompt_len, mask


def token_lists(out: torch.Tensor, prompt_len: int, mask: torch.Tensor) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(out[:, prompt_len:], mask)]


def sample_groups(model, tokenizer, ids: list[list[int]], k: int, seed: int, temperature: float, max_new_tokens: int,
                  world: int, rank: int, chunk: int, device, **generate_kwargs) -> list[list[list[int]]] | None:
    """``k`` answers per prompt (token ids, EOS included), sampled at ``temperature`` by a sampler seeded with
    ``seed`` (the same answers whatever the process count), in batches of ``chunk``, on every process; None when
    k < 2 (self-BLEU needs two samples of a prompt)."""
    if k < 2:
        return None
    repeated = [p for p in ids for _ in range(k)]
    rows = rows_of(len(repeated), world, rank)
    mine = [a for out, _, prompt_len, mask in answer_chunks(model, tokenizer, repeated, rows, max_new_tokens, chunk,
                                                            device, seed, temperature, **generate_kwargs)
            for a in token_lists(out, prompt_len, mask)]
    flat = gather(mine, world)
    return [flat[i * k:(i + 1) * k] for i in range(len(ids))]


class HeldOutEval(TrainerCallback):
    """The held-out evaluation and monitor of a DPO run (a TrainerCallback; the runner sets ``trainer`` after
    building the DPOTrainer). Writes eval/* to the run, the last evaluation and the alarms into ``metrics``
    (the summary's), and acts on alarms as monitor.on_alarm says. ``monitor`` is a callable that builds the
    monitor: called when training begins, after a resumed run's metrics were cut back to its checkpoint, so the
    replayed history is the one training continues from."""

    def __init__(self, cfg, run, prompts: list, tokenizer, metrics: dict, gold_fn=None, monitor=None,
                 generate_kwargs: dict | None = None):
        self.cfg, self.phase, self.run, self.tokenizer = cfg, cfg.phase, run, tokenizer
        self.prompts = list(prompts)[:cfg.phase.eval_num_prompts]
        self.metrics, self.gold_fn = metrics, gold_fn
        self.make_monitor, self.monitor = monitor, None
        self.generate_kwargs = generate_kwargs or {}
        self.trainer = None
        self.done_steps: set[int] = set()
        self.pending: dict[int, list] = {}  # alarm step -> its alarms, until the checkpoint of that step is saved

    # -- when ---------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self.monitor = self.make_monitor() if self.make_monitor is not None else None
        if not self.run.resuming:  # the starting model: the baseline (a resumed run has it in metrics.jsonl)
            self._evaluate(0, control)

    def on_step_end(self, args, state, control, **kwargs):
        every = self.phase.eval_steps
        if (every and state.global_step % every == 0) or state.global_step == state.max_steps:
            self._evaluate(state.global_step, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        if not self.phase.eval_steps:
            self._evaluate(state.global_step, control)

    def on_train_end(self, args, state, control, **kwargs):
        # ended early (early stopping, monitor.on_alarm=stop): the final model measured too, not acted on
        self._evaluate(state.global_step, control, act=False)

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
    def _evaluate(self, step: int, control, act: bool = True) -> None:
        if not self.prompts or step in self.done_steps:
            return
        self.done_steps.add(step)
        with self.run.stage("train/heldout_eval"):
            evaluation = self.evaluate(seed=self.cfg.seed * 1_000_003 + step)
        self.run.log(evaluation, step)
        self.metrics.update({k.replace("/", "_"): v for k, v in evaluation.items()})
        if self.monitor is None or not act:
            return
        alarms = self.monitor.update(step, {}, evaluation)
        self.metrics["monitor_alarms"] = [a.as_dict() for a in self.monitor.alarms]
        action = str(self.monitor.cfg.on_alarm) if alarms else None
        if action == "checkpoint" and step > 0:  # transformers saves after this step's callbacks; on_save keeps a copy
            control.should_save = True
            self.pending[step] = alarms
        elif action == "stop" and step > 0:
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
        chunk = phase.per_device_eval_batch_size
        local = []
        try:
            with acc.autocast():  # the trainer's precision for policy and reference alike
                for out, attn, prompt_len, mask in answer_chunks(policy, tok, ids, rows_of(len(ids), world, rank),
                                                                 phase.max_new_tokens, chunk, acc.device,
                                                                 **self.generate_kwargs):
                    logprobs, entropy = token_logprobs(policy, out, attn, prompt_len, 1.0)
                    ref_logprobs = self._reference_logprobs(policy, out, attn, prompt_len)
                    kl = ((logprobs.float() - ref_logprobs.float()) * mask).sum(1)
                    mine = token_lists(out, prompt_len, mask)
                    texts = tok.batch_decode(mine, skip_special_tokens=True)
                    local += list(zip(mine, texts, kl.tolist(), (entropy * mask).sum(1).tolist(), mask.sum(1).tolist()))
                samples = sample_groups(policy, tok, ids, phase.eval_samples, seed, 1.0, phase.max_new_tokens, world,
                                        rank, chunk, acc.device, **self.generate_kwargs)
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
        """TRL's frozen reference model; under LoRA (no reference model: TRL's reference is the policy with its
        adapters disabled) the same."""
        ref = self.trainer.ref_model
        if ref is not None:
            return token_logprobs(ref, out, attn, prompt_len, 1.0, entropy=False)[0]
        if not hasattr(policy, "disable_adapter"):
            raise RuntimeError("DPO's held-out evaluation found neither a reference model nor LoRA adapters to disable")
        with policy.disable_adapter():
            return token_logprobs(policy, out, attn, prompt_len, 1.0, entropy=False)[0]
