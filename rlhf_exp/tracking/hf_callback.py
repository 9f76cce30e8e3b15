"""A transformers TrainerCallback that feeds a Run: every log becomes a metrics.jsonl line."""

from __future__ import annotations

import math
import sys

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

# transformers/TRL log names -> ours ("train/..." and "eval/..." namespaces)
SKIP = {"epoch", "total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second",
        "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # capped: an untrained model's loss must not overflow


def summary_key(key: str) -> str:
    """metrics.jsonl name -> summary.json name: eval/rewards/accuracies -> eval_rewards_accuracies."""
    return key.replace("/", "_")


def rename(logs: dict[str, float], with_perplexity: bool = False) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in logs.items():
        if key in SKIP or not isinstance(value, (int, float)):
            continue
        if key.startswith("eval_"):
            out["eval/" + key[len("eval_"):]] = float(value)
        elif key == "train_loss":
            out["train/loss_mean"] = float(value)
        else:
            out["train/" + key] = float(value)
    if with_perplexity and "eval/loss" in out:
        out["eval/perplexity"] = perplexity(out["eval/loss"])
    if "epoch" in logs:
        out["epoch"] = float(logs["epoch"])
    return out


class RunLogCallback(TrainerCallback):
    def __init__(self, run, perplexity: bool = False):
        self.run = run
        # perplexity = exp(eval loss) only means something when the loss is a token NLL (SFT)
        self.perplexity = perplexity
        self.history: list[dict[str, float]] = []
        # set while re-evaluating the restored best model: its numbers go to the summary only
        self.muted = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):  # every rank logs the same (gathered) loss
            since = state.global_step - args.logging_steps + 1
            raise FloatingPointError(
                f"train loss is {loss} in the steps {max(since, 1)}-{state.global_step}: training stopped "
                f"(the weights are no longer finite). Lower phase.learning_rate={args.learning_rate:g} or "
                f"phase.max_grad_norm={args.max_grad_norm:g}")
        if self.muted or not state.is_world_process_zero or not logs:
            return
        metrics = rename(logs, self.perplexity)
        if metrics:
            self.history.append({"step": state.global_step, **metrics})
            self.run.log(metrics, step=state.global_step)

    def last(self, key: str) -> float | None:
        for record in reversed(self.history):
            if key in record:
                return record[key]
        return None

    def first(self, key: str) -> float | None:
        for record in self.history:
            if key in record:
                return record[key]
        return None


class CompactProgress(ProgressCallback):
    """The usual progress bar, with the latest train loss on it and one short line per evaluation
    (transformers' default prints every log dict, which buries the bar)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        if "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)
        evals = {k[len("eval_"):]: v for k, v in logs.items()
                 if k.startswith("eval_") and isinstance(v, float) and not k.endswith(("runtime", "per_second"))}
        if evals:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in list(evals.items())[:4])
            self.training_bar.write(f"step {state.global_step} eval: {shown}")


class NonFiniteGradients(FloatingPointError):
    """A step's gradients hold NaN/inf (raised before the optimizer applies them)."""


def nonfinite_gradients(params) -> bool:
    """True when any gradient holds NaN/inf (one device sync for all of them). Parameters without a
    gradient (frozen, or DeepSpeed's own partitions) are skipped."""
    import torch

    grads = [p.grad for p in params if p.grad is not None]
    return bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


class NonFiniteGuard(TrainerCallback):
    """Looks at the gradients before each optimizer step. NaN/inf ones are never applied: while
    ``phase.skip_nonfinite_batches`` allows, the step's update is dropped (its gradients cleared, so
    the optimizer leaves every weight and moment as it was) and counted in ``train/skipped_batches``;
    after that the run stops with the step number and the last good state saved (runners.common)."""

    def __init__(self, run, skips_allowed: int):
        self.run, self.skips_allowed, self.skipped = run, skips_allowed, 0

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if args.fp16:  # fp16's loss scaler overflows (inf gradients) by design and skips those steps itself
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if not nonfinite_gradients(params):
            return
        step = state.global_step + 1
        if self.skipped < self.skips_allowed:
            self.skipped += 1
            for p in params:
                p.grad = None
            if state.is_world_process_zero:
                print(f"rlhf_exp: warning: NaN/inf gradients in step {step}: its update is skipped "
                      f"({self.skipped} of phase.skip_nonfinite_batches={self.skips_allowed})", file=sys.stderr)
                self.run.log({"train/skipped_batches": float(self.skipped)}, step=step)
            return
        raise NonFiniteGradients(
            f"NaN/inf gradients in step {step} (after {self.skipped} skipped): training stopped before applying "
            f"them. Run again with a lower phase.learning_rate={args.learning_rate:g} or phase.max_grad_norm="
            f"{args.max_grad_norm:g}, or allow skips with phase.skip_nonfinite_batches")
