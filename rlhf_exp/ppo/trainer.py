"""The PPO loop: rollouts from the policy, scores from a frozen reward model, a per-token KL penalty to
the frozen reference (the SFT model), GAE, then clipped updates of policy and critic.

Models: policy = SFT checkpoint (LoRA adapters when ``hardware.lora``; the reference is then the same
weights with adapters disabled, no second copy); critic = a separate per-token value model initialised
from the reward model (its body already reads answers); reward model frozen, scores normalised with
the RM run's ``reward_stats.json``. The math lives in ``rlhf_exp.ppo.core``; this module orchestrates.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlhf_exp import diversity
from rlhf_exp.data.encode import is_chat, pad, position_ids, scored_ids
from rlhf_exp.data.encode import prompt_ids as encode_prompt
from rlhf_exp.evaluation import own_generation_config, score_ids
from rlhf_exp.heldout import sample_groups
from rlhf_exp.monitor import pearson
from rlhf_exp.ppo import core
from rlhf_exp.sampling import SeededSampler, sample, token_logprobs  # noqa: F401 (also imported from here)


@dataclass
class Rollout:
    input_ids: torch.Tensor  # [B, P + R] prompt (left-padded) then response
    attention_mask: torch.Tensor
    prompt_len: int
    mask: torch.Tensor  # [B, R] response tokens up to and including the first EOS
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor  # raw reward-model scores, [B]
    prompts: list  # strings or message lists, as in the data
    texts: list[str]


class StageTimer:
    """Wall seconds per stage of a PPO step, logged as ``time/<stage>`` (``time/generate``, ``time/policy_forward``,
    ``time/reference_forward``, ``time/value_forward``, ``time/reward_forward``, ``time/update``, ``time/step``; ``time/eval``
    for a held-out evaluation, whose own stages are not split). On a GPU the device is synchronised at both ends
    of a stage, so its kernels are counted where they were queued. Each process times its own share."""

    def __init__(self, device):
        self.sync = getattr(device, "type", "cpu") == "cuda"
        self.seconds: dict[str, float] = {}
        self.mute = 0

    @contextmanager
    def __call__(self, stage: str):
        if self.mute:
            yield
            return
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    @contextmanager
    def muted(self):
        self.mute += 1
        try:
            yield
        finally:
            self.mute -= 1

    def pop(self) -> dict[str, float]:
        out, self.seconds = {f"time/{k}": v for k, v in self.seconds.items()}, {}
        return out


def trimmed(input_ids, attention_mask, prompt_len: int, mask):
    """A batch cut to the columns some row needs: the left padding every row's prompt has (they are left-padded to
    the rollout's longest prompt) and the answer columns after every row's answer ended (``mask``, a prefix of each
    row). Returns (input_ids, attention_mask, prompt_len, width): a forward over them gives the same log-probabilities
    and values at the ``width`` answer positions kept (positions count real tokens only; causal attention never
    looks right), and the positions cut are masked everywhere. On a batch of equal lengths nothing is cut."""
    left = prompt_len - int(attention_mask[:, :prompt_len].sum(1).max())
    width = max(1, int(mask.sum(1).max()))
    return input_ids[:, left:prompt_len + width], attention_mask[:, left:prompt_len + width], prompt_len - left, width


def widened(x, width: int):
    """[rows, w] answer-position values back to ``width`` columns (zeros where the batch was cut: masked)."""
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


def token_values(critic, input_ids, attention_mask, prompt_len: int):
    return critic(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids(attention_mask)).logits[:, prompt_len - 1:-1, 0].float()


class PPOTrainer:
    """The PPO loop over a :class:`rlhf_exp.ppo.engines.Backend` (DDP, FSDP or DeepSpeed hold the models)."""

    def __init__(self, cfg, policy, critic, reward_model, tokenizer, prompts: list, reward_stats: dict | None,
                 accelerator, reference=None, gold_fn=None, policy_lr: float | None = None,
                 prompt_ids: list[list[int]] | None = None, run_dir=None, eval_prompts: list | None = None,
                 model_path=None):
        from rlhf_exp.ppo.engines import backend_for
        from rlhf_exp.ppo.rollout_engines import rollout_engine

        phase = cfg.phase
        self.phase = phase
        self.accelerator = accelerator
        self.tokenizer = tokenizer
        self.prompts = prompts  # strings or message lists
        # as SFT tokenized them (one BOS), unless the caller already has them
        self.prompt_ids = prompt_ids or [encode_prompt(tokenizer, p) for p in prompts]
        self.reward_stats = reward_stats
        self.gold_fn = gold_fn
        # held-out prompts for phase.eval_steps (a multiple of the process count: each process takes a share)
        self.eval_prompts = list(eval_prompts or [])[:phase.eval_num_prompts]
        self.eval_prompts = self.eval_prompts[:len(self.eval_prompts) // accelerator.num_processes
                                              * accelerator.num_processes]
        self.eval_prompt_ids = [encode_prompt(tokenizer, p) for p in self.eval_prompts]
        self.last_eval: dict[str, float] = {}
        self.seed = cfg.seed
        self.generator = torch.Generator().manual_seed(cfg.seed)  # prompt picks and mini-batch order
        self.steps_done = 0
        self.stopped_by_monitor: str | None = None  # why monitor.on_alarm=stop ended train() early
        self.skipped = 0  # mini-batches whose NaN/inf update was dropped
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.kl_ctl = core.kl_controller(str(phase.kl_ctrl), phase.kl_coef, phase.kl_target, phase.kl_horizon)
        for model in (policy, critic):
            disable_dropout(model)
            if cfg.hardware.gradient_checkpointing:  # activations recomputed in backward: memory for compute
                enable_checkpointing(model)
        # policy_lr: phase.lora_learning_rate for LoRA adapters; the critic at phase.critic_learning_rate
        self.engines = backend_for(cfg.hardware)(cfg, policy, critic, reference, reward_model, accelerator,
                                                 policy_lr or phase.learning_rate, run_dir=run_dir)
        self.device = accelerator.device
        self.timer = StageTimer(self.device)
        # phase.rollout_engine: what samples the rollouts (model_path: a folder with the policy's config, for vllm)
        self.rollout_engine = rollout_engine(cfg, self.engines, tokenizer, model_path)
        self.logprobs_from_generation = (logprobs_from_generation(phase, cfg.hardware)
                                         and self.rollout_engine.records_logprobs)
        self.engine_gap: float | None = None  # rollout/engine_logprob_gap of the last rollout (vllm)

    @property
    def policy(self):
        return self.engines.policy

    @property
    def critic(self):
        return self.engines.critic

    def _chunks(self, n: int):
        """Row slices of at most phase.micro_batch_size (rollout scoring runs in these)."""
        size = self.phase.micro_batch_size or n
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    # -- rollout -------------------------------------------------------------------------------
    def _scored(self, fn, ids, attn, prompt_len: int, mask) -> list:
        """``fn(ids, attn, prompt_len)`` over the rollout in chunks (phase.micro_batch_size rows), each cut to the
        columns it needs (:func:`trimmed`); every [rows, answer] tensor it returns widened back to the rollout's
        answer width."""
        out = []
        for c in self._chunks(len(ids)):
            cut_ids, cut_attn, cut_prompt, _ = trimmed(ids[c], attn[c], prompt_len, mask[c])
            result = fn(cut_ids, cut_attn, cut_prompt)
            out.append(tuple(None if x is None else widened(x, mask.shape[1]) for x in result))
        return [torch.cat(parts) if parts[0] is not None else None for parts in zip(*out)]

    def _reference_logprobs(self, ids, attn, prompt_len, mask):
        def score(model):
            return self._scored(lambda i, a, p: token_logprobs(model, i, a, p, self.phase.temperature, entropy=False),
                                ids, attn, prompt_len, mask)[0]

        with torch.no_grad(), self.timer("reference_forward"):
            if self.engines.reference is not None:
                with self.engines.frozen(self.engines.reference) as reference:
                    return score(reference)
            with self.engines.bare_policy().disable_adapter():
                return score(self.policy)

    @torch.no_grad()
    def rollout(self) -> tuple[Rollout, torch.Tensor]:
        """Sample answers for ``rollout_batch_size`` prompts; with several processes each generates and
        scores its share, and the results are gathered so every process holds the whole batch, in the
        order one process would have produced it."""
        phase = self.phase
        total = phase.rollout_batch_size
        pick = torch.randint(len(self.prompts), (total,), generator=self.generator).tolist()

        def sampler(rows: slice) -> SeededSampler:
            return SeededSampler(phase.temperature, self.seed * 1_000_003 + self.steps_done, rows, total, self.device,
                                 record=self.logprobs_from_generation)

        if self.rollout_engine.needs_sync(self.steps_done):  # the policy changed since the engine's weights
            with self.timer("weight_sync"):
                self.rollout_engine.sync(self.steps_done)
        return self._roll([self.prompts[i] for i in pick], [self.prompt_ids[i] for i in pick], sampler, values=True)

    @torch.no_grad()
    def _roll(self, prompts: list, prompt_ids: list[list[int]], sampler, values: bool) -> tuple[Rollout, torch.Tensor]:
        """Answers to ``prompts`` (sampled by ``sampler(rows)``, or greedy when it is None), scored: log-probabilities
        and entropies under the policy, the reference's log-probabilities, the critic's values (zeros unless
        ``values``) and the reward model's scores; each process takes its share, every process gets the whole."""
        tok, phase, acc = self.tokenizer, self.phase, self.accelerator
        total = len(prompts)
        share = total // self.world
        rows = slice(self.rank * share, (self.rank + 1) * share)
        # every process left-pads to the batch's longest prompt, so all share one prompt length
        ids, attn = pad(prompt_ids, tok.pad_token_id, side="left")
        ids, attn = ids[rows].to(self.device), attn[rows].to(self.device)
        self.policy.eval()
        # the bare model (out of DDP's wrapper) generates; sharded ones gather each layer as they reach it
        drawn = sampler(rows) if sampler is not None else None
        engine_logprobs = None  # the rollout engine's own (vllm), for rollout/engine_logprob_gap only
        with self.timer("generate"):
            if drawn is not None:
                out, engine_logprobs = self.rollout_engine.generate(ids, attn, prompt_ids[rows], drawn)
            else:
                model = self.engines.bare_policy()
                with own_generation_config(model, tok, do_sample=False, max_new_tokens=phase.max_new_tokens) as config:
                    out = model.generate(input_ids=ids, attention_mask=attn, generation_config=config,
                                         **self.engines.generate_kwargs)
        prompt_len = ids.shape[1]
        if self.world > 1:  # processes stop generating at different lengths: pad to the longest
            longest = int(acc.gather(torch.tensor([out.shape[1]], device=self.device)).max())
            out = torch.nn.functional.pad(out, (0, longest - out.shape[1]), value=tok.pad_token_id)
            if engine_logprobs is not None:
                engine_logprobs = torch.nn.functional.pad(engine_logprobs, (0, longest - prompt_len
                                                                            - engine_logprobs.shape[1]))
        response = out[:, prompt_len:]
        mask = core.response_mask(response, tok.eos_token_id)
        attn = torch.cat([attn, mask.long()], dim=1)
        chunks = self._chunks(len(out))
        if drawn is not None and drawn.record:  # phase.rollout_logprobs: from the logits each token was drawn from
            logprobs, entropy = drawn.recorded(response.shape[1])
            # past an answer's EOS generate() wrote padding, not the sampler's pick: nothing to score there
            logprobs, entropy = (torch.where(mask.bool(), x, 0.0) for x in (logprobs, entropy))
        else:
            with self.timer("policy_forward"):
                logprobs, entropy = self._scored(lambda i, a, p: token_logprobs(self.policy, i, a, p, phase.temperature),
                                                 out, attn, prompt_len, mask)
        ref_logprobs = self._reference_logprobs(out, attn, prompt_len, mask)
        if values:
            with self.timer("value_forward"):
                token_vals = self._scored(lambda i, a, p: (token_values(self.critic, i, a, p),), out, attn, prompt_len,
                                          mask)[0]
        else:
            token_vals = torch.zeros_like(logprobs)
        texts = tok.batch_decode(response * mask.long() + tok.pad_token_id * (1 - mask.long()), skip_special_tokens=True)
        with self.timer("reward_forward"), self.engines.frozen(self.engines.reward_model) as reward_model:
            mine = prompt_ids[rows]
            scores = torch.cat([self._scores(reward_model, prompts[rows][c], mine[c], response[c], mask[c])
                                for c in chunks])
        if engine_logprobs is not None:  # summed over this process's answer tokens, with their count
            gap = torch.stack([((engine_logprobs - logprobs).abs() * mask).sum(), mask.sum()])
            gap = acc.reduce(gap, "sum") if self.world > 1 else gap
            self.engine_gap = (gap[0] / gap[1].clamp(min=1)).item()
        tensors = [out, attn, mask, logprobs, ref_logprobs, token_vals, scores, entropy]
        if self.world > 1:
            from accelerate.utils import gather_object

            tensors = [acc.gather(t) for t in tensors]
            texts = gather_object(texts)
        out, attn, mask, logprobs, ref_logprobs, token_vals, scores, entropy = tensors
        rollout = Rollout(out, attn, prompt_len, mask, logprobs, ref_logprobs, token_vals, scores, prompts, texts)
        return rollout, core.masked_mean(entropy, mask)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out metrics of the policy now (``eval/*``): greedy answers to ``phase.eval_num_prompts`` held-out
        prompts, their raw reward-model score, the sequence-level KL of those answers to the reference (summed
        log-ratio per answer), their mean length in tokens, the policy's mean entropy on them, distinct-1/2 of
        their tokens, self-BLEU of ``phase.eval_samples`` sampled answers per prompt (``eval/self_bleu``), and, on
        the embedded task, their mean gold reward (``eval/gold``; ``eval/gold_score``, logged before training and
        after it, is the same over all data.synthetic.num_eval_prompts prompts). Every process takes part (each
        answers its share); every process returns the same numbers."""
        if not self.eval_prompts:
            return {}
        with self.timer("eval"), self.timer.muted():
            return self._evaluate()

    def _evaluate(self) -> dict[str, float]:
        r, entropy = self._roll(self.eval_prompts, self.eval_prompt_ids, None, values=False)
        kl = ((r.logprobs - r.ref_logprobs) * r.mask).sum(1)
        answers = [row[m.bool()].tolist() for row, m in zip(r.input_ids[:, r.prompt_len:], r.mask)]
        metrics = {
            "eval/rm_score": r.scores.float().mean().item(),
            "eval/kl": kl.mean().item(),
            "eval/response_length": r.mask.sum(1).float().mean().item(),
            "eval/entropy": entropy.item(),
            "eval/distinct_1": diversity.distinct_n(answers, 1),
            "eval/distinct_2": diversity.distinct_n(answers, 2),
        }
        # self-BLEU over phase.eval_samples sampled answers per prompt, from their own seed stream (the rollouts'
        # sampling is untouched)
        groups = sample_groups(self.engines.bare_policy(), self.tokenizer, self.eval_prompt_ids, self.phase.eval_samples,
                               self.seed * 1_000_003 + 500_009 + self.steps_done, self.phase.temperature,
                               self.phase.max_new_tokens, self.world, self.rank, self.phase.per_device_eval_batch_size,
                               self.device, **self.engines.generate_kwargs)
        if groups is not None:
            metrics["eval/self_bleu"] = diversity.self_bleu(groups)
        if self.gold_fn is not None:
            golds = [self.gold_fn(p, t) for p, t in zip(r.prompts, r.texts)]
            metrics["eval/gold"] = sum(golds) / len(golds)
        return metrics

    def selection_metric(self, evaluation: dict[str, float]) -> float | None:
        """What a checkpoint is kept as "best" by: held-out gold where a gold reward exists, else the held-out
        reward-model score when the held-out KL is within phase.best_kl_max (null: 2 x kl_target); None
        without an evaluation at that step (never the training rollouts' reward: that keeps the most
        over-optimised policy)."""
        if "eval/gold" in evaluation:
            return evaluation["eval/gold"]
        if "eval/rm_score" not in evaluation:
            return None
        band = self.phase.best_kl_max if self.phase.best_kl_max is not None else 2 * self.phase.kl_target
        return evaluation["eval/rm_score"] if evaluation["eval/kl"] <= band else None

    def _scores(self, reward_model, prompts: list, prompt_ids: list[list[int]], response, mask) -> torch.Tensor:
        """Reward-model scores on the ids RewardTrainer trained on (``rlhf_exp.data.encode``). Chat prompts:
        the conversation with the answer's text as the assistant turn, through the chat template, so the
        template's tail (Qwen's "<|im_end|>\\n") is there and the score is read where training read it;
        special tokens the policy wrote inside the answer stay in its text. Plain prompts: the prompt's ids,
        then the answer's up to its EOS. An answer cut off by max_new_tokens gets no end of turn."""
        tok, rows = self.tokenizer, []
        for i, prompt in enumerate(prompts):
            answer = response[i][mask[i].bool()].tolist()  # up to and including the first EOS
            finished = bool(answer) and answer[-1] == tok.eos_token_id
            if is_chat(prompt):
                text = tok.decode(answer[:-1] if finished else answer, skip_special_tokens=False)
                rows.append(scored_ids(tok, prompt, text, finished=finished))
            else:
                rows.append(prompt_ids[i] + answer)
        return score_ids(reward_model, rows, tok.pad_token_id, self.device).to(self.device)

    def shaped_scores(self, r: Rollout) -> torch.Tensor:
        """RM score, normalised and clipped, minus the length and missing-EOS penalties."""
        phase, scores = self.phase, r.scores
        if phase.normalize_reward and self.reward_stats:
            scores = (scores - self.reward_stats["mean"]) / max(self.reward_stats["std"], 1e-6)
        if phase.reward_clip is not None:
            scores = scores.clamp(-phase.reward_clip, phase.reward_clip)
        lengths = r.mask.sum(1)
        scores = scores - phase.length_penalty * lengths / phase.max_new_tokens
        if phase.missing_eos_penalty is not None:
            ended = (r.input_ids[:, r.prompt_len:] == self.tokenizer.eos_token_id).any(1)
            scores = scores - phase.missing_eos_penalty * (~ended).float()
        return scores

    # -- one PPO step --------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        with self.timer("step"):
            metrics = self._step()
        metrics.update(self.timer.pop())
        return metrics

    def _step(self) -> dict[str, float]:
        phase = self.phase
        r, entropy = self.rollout()
        kl = core.kl_per_token(r.logprobs, r.ref_logprobs, str(phase.kl_estimator)) * r.mask
        rewards = core.shaped_rewards(self.shaped_scores(r), kl, self.kl_ctl.value, r.mask)
        advantages, returns = core.gae(rewards, r.values, r.mask, phase.gamma, phase.lam)
        advantages = core.masked_whiten(advantages, r.mask)

        batch = r.input_ids.shape[0]
        with self.timer("update"):
            stats, stop = self._update(r, advantages, returns)

        self.steps_done += 1
        mean_kl = kl.sum(1).mean().item()  # mean over sequences of the summed per-token KL
        kl_coef = self.kl_ctl.value
        self.kl_ctl.update(mean_kl, n_steps=batch)
        metrics = {f"ppo/{k}": sum(v) / len(v) for k, v in stats.items() if v}  # none when every update was skipped
        valid = r.mask > 0
        residual_var = torch.var((returns - r.values)[valid])
        metrics.update({
            "ppo/reward": r.scores.mean().item(),
            "ppo/kl": mean_kl,
            "ppo/kl_coef": kl_coef,
            "ppo/entropy": entropy.item(),
            "ppo/response_length": r.mask.sum(1).float().mean().item(),
            # within the batch: does the reward model pay for length? (rlhf_exp.monitor's length_reward_corr)
            "ppo/length_reward_corr": pearson(r.mask.sum(1).tolist(), r.scores.float().tolist()),
            "ppo/explained_variance": 1.0 - (residual_var / torch.var(returns[valid]).clamp(min=1e-8)).item(),
            "ppo/early_stopped_epochs": float(stop),
        })
        if self.skipped:
            metrics["ppo/skipped_batches"] = float(self.skipped)
        if self.engine_gap is not None:
            metrics["rollout/engine_logprob_gap"] = self.engine_gap
        if self.gold_fn is not None:
            golds = [self.gold_fn(p, t) for p, t in zip(r.prompts, r.texts)]
            metrics["ppo/gold_reward"] = sum(golds) / len(golds)
        return metrics

    def _update(self, r: Rollout, advantages, returns) -> tuple[dict[str, list[float]], bool]:
        """phase.ppo_epochs passes over the rollout in phase.num_mini_batches shuffled mini-batches, one clipped
        update of policy and critic each; the per-update statistics, and whether target_kl ended the epochs early."""
        self.policy.train()
        self.critic.train()
        phase, batch = self.phase, r.input_ids.shape[0]
        lengths = r.attention_mask.sum(1).cpu()  # real tokens per sequence (prompt and answer), beside the indices
        stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "clipfrac": [], "approx_kl": []}
        stop = False
        for _ in range(phase.ppo_epochs):
            order = torch.randperm(batch, generator=self.generator)
            for minibatch_index, minibatch in enumerate(order.chunk(phase.num_mini_batches), start=1):
                # each process takes its share of the mini-batch; dividing by the whole mini-batch's token
                # count (over the number of processes, which gradient averaging multiplies back) makes the
                # update the one a single process computes on the whole mini-batch, however the share is
                # split into micro-batches (their gradients add up before the one optimizer step)
                tokens = r.mask[minibatch].sum().clamp(min=1) / self.world
                share = minibatch.chunk(self.world)[self.rank]
                size = phase.micro_batch_size or len(share)
                if size < len(share):  # micro-batches of similar lengths, each cut to its own longest row: the same
                    # sum of gradients (the mini-batch is the same), less padding computed
                    share = share[torch.argsort(lengths[share], stable=True)]
                micro = share.split(size)
                sums = torch.zeros(4, device=self.device)
                for j, idx in enumerate(micro):
                    with self.engines.accumulating(last=j == len(micro) - 1):
                        ids, attn, prompt_len, width = trimmed(r.input_ids[idx], r.attention_mask[idx], r.prompt_len,
                                                               r.mask[idx])
                        m = r.mask[idx, :width]
                        logprobs, _ = token_logprobs(self.policy, ids, attn, prompt_len, phase.temperature, entropy=False)
                        values = token_values(self.critic, ids, attn, prompt_len)
                        pl = core.clipped_policy_loss(logprobs, r.logprobs[idx, :width], advantages[idx, :width], m,
                                                      phase.cliprange, tokens)
                        vl = core.clipped_value_loss(values, r.values[idx, :width], returns[idx, :width], m,
                                                     phase.cliprange_value, tokens)
                        self.engines.backward(pl.loss, phase.vf_coef * vl)
                    sums += torch.stack([pl.loss, vl, pl.clipfrac, pl.approx_kl]).detach()
                if self._nonfinite(minibatch_index):  # its update is dropped, or the run stops
                    continue
                self.engines.step()
                # the mini-batch's means: each process holds a share of them
                means = (self.accelerator.reduce(sums, "mean") if self.world > 1 else sums).tolist()
                for key, value in zip(("policy_loss", "value_loss", "clipfrac", "approx_kl"), means):
                    stats[key].append(value)
                # old TRL's rule: stop this step's epochs once the update drifted 1.5x past target_kl
                if phase.target_kl is not None and means[3] > 1.5 * phase.target_kl:
                    stop = True
                    break
            if stop:
                break
        return stats, stop

    def _nonfinite(self, minibatch: int) -> bool:
        """NaN/inf gradients (the same answer on every process) are never applied: the mini-batch is skipped
        while phase.skip_nonfinite_batches allows, else the run stops. (Under DeepSpeed a NaN/inf loss stops the
        run before its backward: rlhf_exp.ppo.engines.DeepSpeed.)"""
        if not self.engines.nonfinite_gradients():
            return False
        where = f"PPO step {self.steps_done + 1}, mini-batch {minibatch}"
        if self.skipped < self.phase.skip_nonfinite_batches:
            self.skipped += 1
            self.engines.zero_grad()
            if self.accelerator.is_main_process:
                print(f"rlhf_exp: warning: NaN/inf gradients in {where}: its update is skipped ({self.skipped} of "
                      f"phase.skip_nonfinite_batches={self.phase.skip_nonfinite_batches})", file=sys.stderr)
            return True
        raise FloatingPointError(
            f"NaN/inf gradients in {where}: training stopped before applying them (the weights stay finite; nothing "
            f"is saved now: the latest complete checkpoint, if any, is the last good state). Run again with a lower "
            f"phase.learning_rate={self.phase.learning_rate:g} or phase.max_grad_norm={self.phase.max_grad_norm:g}, or "
            "allow skips with phase.skip_nonfinite_batches")

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What the models' checkpoint does not hold: steps done, the picks/mini-batch generator and the
        KL controller (saved by the backend with every checkpoint)."""
        return {"steps_done": self.steps_done, "generator": self.generator.get_state(), "kl_ctl": self.kl_ctl.state_dict(),
                "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.steps_done = int(state["steps_done"])
        self.generator.set_state(state["generator"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.skipped = int(state["skipped"])

    def save_checkpoint(self, folder: Path, metric: float) -> None:
        """Policy, critic, optimizers, RNG states of every process and this trainer's state, written by
        accelerate under a temporary name, marked complete (file sizes), then renamed into place."""
        from rlhf_exp.launch.signals import GUARD
        from rlhf_exp.tracking.checkpoints import mark_complete

        partial = folder.with_name(f".{folder.name}.partial")  # renamed once complete
        self.engines.save(partial, self.state_dict())
        self.accelerator.wait_for_everyone()
        mark_complete(partial, self.steps_done, metric=metric)
        if self.accelerator.is_main_process:
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(partial, folder)
        self.accelerator.wait_for_everyone()
        GUARD.saved()

    def load_checkpoint(self, folder: Path) -> None:
        self.load_state_dict(self.engines.load(folder))

    def train(self, steps: int, log, checkpoints: Path | None = None, save_steps: int | None = None,
              save_minutes: float | None = None, keep: int = 2, monitor=None) -> dict[str, float]:
        """Steps ``steps_done + 1 .. steps`` (more than 0 done when resumed from a checkpoint). With
        ``checkpoints`` set, a resumable checkpoint every ``save_steps`` steps / ``save_minutes`` minutes
        and when a stop signal arrives (then :class:`Interrupted` is raised after the save). ``monitor``
        (:class:`rlhf_exp.monitor.Monitor`) sees every step's metrics; on an alarm with monitor.on_alarm=checkpoint
        a checkpoint is saved at that step and kept to the end (checkpoints/alarms/), with stop one is saved
        (checkpoints on) and the loop ends there, ``stopped_by_monitor`` saying why. Every rank holds the same
        metrics, so every rank decides alike."""
        from rlhf_exp.launch.signals import GUARD, Interrupted
        from rlhf_exp.tracking.checkpoints import keep_alarm_checkpoint, prune

        last: dict[str, float] = {}
        bar = tqdm(range(self.steps_done + 1, steps + 1), desc="ppo", disable=not self.accelerator.is_main_process,
                   initial=self.steps_done, total=steps)
        GUARD.begin_training()
        for step in bar:
            last = self.step()
            log(last, step)
            evaluation = {}
            if self.phase.eval_steps and (step % self.phase.eval_steps == 0 or step == steps):
                evaluation = self.evaluate()
                if evaluation:
                    log({**evaluation, **self.timer.pop()}, step)
                    self.last_eval = {**evaluation, "step": step}
            bar.set_postfix(reward=f"{last['ppo/reward']:.3f}", kl=f"{last['ppo/kl']:.3f}", refresh=False)
            if not math.isfinite(last.get("ppo/policy_loss", 0.0)):
                raise FloatingPointError(f"PPO policy loss is {last['ppo/policy_loss']} at step {step}")
            alarms = monitor.update(step, last, evaluation) if monitor is not None else []
            action = str(monitor.cfg.on_alarm) if alarms else None
            save, stop = GUARD.poll(save_minutes if checkpoints else None)
            if action in ("checkpoint", "stop"):
                save = True
            if checkpoints is not None and (save or (save_steps and step % save_steps == 0)):
                folder = checkpoints / f"checkpoint-{step}"
                self.save_checkpoint(folder, metric=self.selection_metric(evaluation))
                if action == "checkpoint":  # kept to the end of the run, apart from the pruned ones
                    kept = keep_alarm_checkpoint(folder, checkpoints.parent / "alarms")
                    for alarm in alarms:
                        alarm.checkpoint = str(kept)
                prune(checkpoints, keep)
            if stop:
                raise Interrupted(GUARD.signum, step, str(folder) if checkpoints is not None else None)
            if action == "stop":
                self.stopped_by_monitor = (f"monitor.on_alarm=stop: {alarms[0].rule} at step {step} "
                                           f"({alarms[0].saw}); stopped after step {step}")
                break
        GUARD.end_training()
        return last


def load_reward_stats(rm_run: Path) -> dict | None:
    """The RM run's reward_stats.json when it holds a finite mean and std > 0, else None. PPO refuses to start
    without valid stats when phase.normalize_reward is on (tracking.lineage.resolve_parents, dry runs too)."""
    from rlhf_exp.tracking.lineage import reward_stats_problem

    return reward_stats_problem(rm_run)[0]


def logprobs_from_generation(phase, hardware) -> bool:
    """phase.rollout_logprobs: whether the rollout's log-probabilities come from the sampler's logits (no policy
    forward after generating). auto: only where they equal a forward's to float rounding: full fp32 matmuls (no
    TF32, no half precision) and no quantized layers."""
    mode = str(phase.rollout_logprobs)
    if mode != "auto":
        return mode == "generate"
    return (str(hardware.precision) == "fp32" and torch.get_float32_matmul_precision() == "highest"
            and not (hardware.load_in_4bit or hardware.load_in_8bit))


def disable_dropout(model) -> None:
    """PPO's ratio compares the policy in training mode with its rollout (eval mode): dropout would make
    it differ from 1 before any update. (Value heads such as LlamaForTokenClassification's add 0.1.)"""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def enable_checkpointing(model) -> None:
    """Gradient checkpointing (non-reentrant: works with frozen inputs and LoRA) on a transformers model or
    its peft wrapper."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()

