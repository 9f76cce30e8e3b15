"""What every TRL-based runner does around ``trainer.train()``: callbacks, evaluation, saving."""

from __future__ import annotations

import logging

# bitsandbytes, imported by transformers/peft whenever it is installed, warns at import on CPUs with AVX512-BF16
# that an optional package with a faster CPU 4-bit kernel is missing; 4-bit runs without it. Quieted before the
# imports below pull it in.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import contextlib  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from rlhf_exp.config.schema import RunConfig  # noqa: E402
from rlhf_exp.data.loading import PhaseData  # noqa: E402
from rlhf_exp.tracking.hf_callback import NonFiniteGradients, RunLogCallback, rename, summary_key  # noqa: E402
from rlhf_exp.tracking.run import Run, is_main_process  # noqa: E402


class _TiedHeadFilter(logging.Filter):
    """Restoring the best checkpoint of a model with tied embeddings reports the tied head as
    'missing'; it is not (it shares the embedding's weights), so the line only alarms users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "missing keys in the checkpoint model loaded: ['lm_head.weight']" not in record.getMessage()


def quiet_libraries() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-save "Writing model shards" bars; the training bar stays
    if not is_main_process():  # one set of progress bars and warnings per run, not one per worker
        import datasets

        datasets.disable_progress_bars()
        hf_logging.set_verbosity_error()
    logging.getLogger("transformers.trainer").addFilter(_TiedHeadFilter())
    # raised by TRL's own call of a renamed transformers property, not by anything a user can change
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # DeepSpeed 0.19's ZeRO calls torch.distributed's renamed collectives, two lines per call, every step
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` "
                            "is deprecated", category=FutureWarning)


def start(cfg: RunConfig, run: Run):
    """What every runner does first: quiet the libraries, seed, and load the tokenizer (the SFT
    parent's when there is one). Returns (sft parent or None, tokenizer)."""
    from transformers import set_seed

    from rlhf_exp.models import load_tokenizer

    quiet_libraries()
    set_seed(cfg.seed)
    sft = run.parent("sft")
    return sft, load_tokenizer(cfg.model, checkpoint=sft["checkpoint"] if sft else None)


def before_loading(cfg: RunConfig, run: Run, args) -> None:
    """Between building a phase's TRL config (``args``) and loading its model. Records the DeepSpeed / FSDP
    settings the trainer uses in the run folder (launch/deepspeed.json, with transformers' "auto" values filled;
    launch/fsdp.json). Under ZeRO-3, ``args`` (alive until the model is loaded) makes from_pretrained load each
    weight into its partition (deepspeed.zero.Init). Under FSDP the trained model loads inside
    ``models.broadcast_loading``: rank 0 reads the checkpoint, the others build a skeleton on the meta device, and
    accelerate (cpu_ram_efficient_loading) shards it and broadcasts rank 0's weights: each process ends up holding
    its shard, and the node read the checkpoint into CPU RAM once."""
    from rlhf_exp.launch.sharding import record

    if getattr(args, "hf_deepspeed_config", None) is not None:
        record(run.dir, "deepspeed.json", args.hf_deepspeed_config.config)
        if args.hf_deepspeed_config.is_zero3() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import deepspeed

            # zero.Init reads the world size from DeepSpeed's own communication layer; on CPU processes
            # accelerate starts torch.distributed without it, and zero.Init then takes the world for 1 process
            # and refuses the batch sizes ("train_batch_size ... 128 != 64 * 1 * 1")
            args.device  # noqa: B018  (torch.distributed started by accelerate, as the trainer would)
            deepspeed.init_distributed(dist_backend="gloo" if cfg.hardware.accelerator == "cpu" else "nccl")
    if args.fsdp:
        record(run.dir, "fsdp.json", {"fsdp": args.fsdp, "fsdp_config": args.fsdp_config,
                                      "accelerate_plugin": args.fsdp_plugin_args})


def after_loading(run: Run, **models) -> None:
    """How each model was loaded (partitioned or whole, dtypes, quantized layers), by role: launch/loading.json."""
    from rlhf_exp.launch.sharding import record
    from rlhf_exp.models import loading_record

    records = {role: loading_record(model) for role, model in models.items() if model is not None}
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # what every process held right after loading (partitioned, whole, or a skeleton waiting for rank 0's)
        held = [None] * dist.get_world_size()
        dist.all_gather_object(held, {role: r["params_this_process"] for role, r in records.items()})
        for role, record_ in records.items():
            record_["params_per_process"] = [h[role] for h in held]
    record(run.dir, "loading.json", records)


def phase_data(cfg: RunConfig, tokenizer, preferences: bool, run: Run | None = None) -> PhaseData:
    """The phase's data (demonstrations, or preference pairs), checked against the tokenizer: chat
    messages need a chat template. What the loader read and dropped goes into the run's summary."""
    from rlhf_exp.data.loading import on_disk, preference_data, sft_data
    from rlhf_exp.models import check_chat_template

    counts: dict = {}
    with run.stage("data") if run is not None else contextlib.nullcontext():
        data = preference_data(cfg.data, counts) if preferences else sft_data(cfg.data, counts)
        if str(cfg.phase.name) != "ppo":  # TRL's trainers tokenise with Dataset.map: kept for the next run
            data.train, data.eval = on_disk(data.train), on_disk(data.eval)
    check_chat_template(tokenizer, cfg.model, data.train)
    if run is not None:
        for split, split_counts in counts.items():
            run.record_data(split, **split_counts)
    return data


def callbacks(cfg: RunConfig, run: Run, data: PhaseData) -> tuple[RunLogCallback, list]:
    from transformers import EarlyStoppingCallback

    from rlhf_exp.config.schema import resumable_checkpoints
    from rlhf_exp.tracking.checkpoints import Checkpointing
    from rlhf_exp.tracking.hf_callback import NonFiniteGuard

    log = RunLogCallback(run, perplexity=cfg.phase.name == "sft")
    extra = [Checkpointing(cfg.phase.save_minutes, resumable_checkpoints(cfg.phase)),
             NonFiniteGuard(run, cfg.phase.skip_nonfinite_batches)]
    if data.eval is not None and cfg.phase.early_stopping_patience > 0:
        # eval loss and perplexity rank checkpoints identically; stopping on one is stopping on both
        extra.append(EarlyStoppingCallback(early_stopping_patience=cfg.phase.early_stopping_patience))
    return log, [log, *extra]


def gold(cfg: RunConfig, model, tokenizer, data: PhaseData, run: Run, name: str) -> float | None:
    """Mean gold reward of greedy answers on the held-out prompts (embedded task only). Rank 0 only
    (the other workers would repeat the same generations), except in a sharded run, where generating
    needs every rank's shard: all ranks generate in step and rank 0 records.

    Before training (``name="initial"``) the trainer has not sharded the model yet. Under ZeRO-3 every rank still
    generates in step (transformers' generate synchronises the ranks' steps whenever ZeRO-3 is on), with the
    weights gathered when they were loaded partitioned. Otherwise the model is whole on rank 0 (under FSDP the
    other ranks hold empty weights until FSDP broadcasts rank 0's), and rank 0 measures alone."""
    import contextlib

    from transformers.integrations import is_deepspeed_zero3_enabled

    # PPO measures its starting policy after sharding it (FSDP2 DTensors, a ZeRO-3 engine's module whose hooks
    # gather each layer): every rank takes part, nothing else to gather
    in_shards = any(type(p).__name__ == "DTensor" for p in model.parameters()) or hasattr(model, "ds_inflight_param_registry")
    together = sharded(cfg) and (name != "initial" or in_shards or is_deepspeed_zero3_enabled())
    if not data.eval_prompts or not (run.main or together):
        return None
    from rlhf_exp.evaluation import gold_score

    gathered = contextlib.nullcontext()
    if name == "initial" and not in_shards and any(hasattr(p, "ds_id") for p in model.parameters()):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(model.parameters()))
    with gathered, run.stage(f"gold_{name}"):
        return gold_score(model, tokenizer, data.eval_prompts, cfg.phase.max_new_tokens,
                          cfg.phase.per_device_eval_batch_size,
                          samples_path=run.dir / f"samples_{name}.jsonl" if run.main else None,
                          desc=f"gold eval ({name})")


def sharded(cfg: RunConfig) -> bool:
    from rlhf_exp.launch.distributed import SHARDED

    return str(cfg.hardware.distributed) in SHARDED


def record_initial_gold(cfg: RunConfig, model, tokenizer, data: PhaseData, run: Run, metrics: dict) -> None:
    """Gold score of the starting model (untrained or the parent's), the baseline the phase must beat."""
    earlier = [r["eval/gold_score"] for r in run.previous if r.get("step") == 0 and "eval/gold_score" in r]
    if earlier:  # resuming: measured before the interruption
        metrics["gold_score_initial"] = earlier[0]
        return
    initial = gold(cfg, model, tokenizer, data, run, "initial")
    if initial is not None:
        metrics["gold_score_initial"] = initial
        run.log({"eval/gold_score": initial}, step=0)


@dataclass
class Built:
    """A runner's trainer and what finishing the run needs."""

    trainer: Any
    log: RunLogCallback
    tokenizer: Any
    data: PhaseData
    metrics: dict


def train_and_evaluate(cfg: RunConfig, run: Run, built: Built) -> dict:
    """Train, then evaluate the final (best, when early stopping restored it) model on the eval split."""
    from transformers.trainer_callback import ProgressCallback

    from rlhf_exp.tracking.checkpoints import of_trainer, step_of
    from rlhf_exp.tracking.hf_callback import CompactProgress

    trainer, log, metrics = built.trainer, built.log, built.metrics
    from rlhf_exp.data.report import report_trainer_data

    report_trainer_data(run, cfg.phase.name, trainer, len(built.data.train),
                        len(built.data.eval) if built.data.eval is not None else None, cfg.phase.max_length)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(CompactProgress())
    resume_from = None
    if run.resuming:
        from rlhf_exp.tracking.checkpoints import latest_complete

        resume_from = latest_complete(run.checkpoint_dir / "trainer")
        announce_resume(run, step_of(resume_from) if resume_from else 0, resume_from)
        log.history = [r for r in run.previous if any(k.startswith("train/") for k in r)]
    checkpointing = of_trainer(trainer)
    checkpointing.trainer, checkpointing.resume_from = trainer, resume_from
    start = time.monotonic()
    evaluate = trainer.evaluate

    def timed_evaluate(*args, **kwargs):  # the trainer's evaluations during training, in summary.json "timings"
        with run.stage("train/evaluate"):
            return evaluate(*args, **kwargs)

    trainer.evaluate = timed_evaluate
    try:
        with run.stage("train"):
            result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except NonFiniteGradients as exc:
        raise save_last_good(trainer, exc) from None
    finally:
        trainer.evaluate = evaluate
    metrics["train_runtime_s"] = round(time.monotonic() - start, 2)
    metrics["num_processes"] = trainer.accelerator.num_processes  # as accelerate set it up, not as asked
    metrics["steps"] = trainer.state.global_step
    metrics["train_loss_first"] = log.first("train/loss")
    metrics["train_loss_last"] = log.last("train/loss")
    metrics["train_loss_mean"] = result.training_loss
    metrics["early_stopped"] = trainer.state.global_step < trainer.state.max_steps  # only early stopping ends sooner
    if built.data.eval is not None:
        log.muted = True  # the best model's numbers: already in metrics.jsonl at the step they were logged
        with run.stage("evaluate"):
            final = rename(trainer.evaluate(), with_perplexity=log.perplexity)
        log.muted = False
        metrics.update({summary_key(k): v for k, v in final.items() if k.startswith("eval/")})
    return metrics


def announce_resume(run: Run, step: int, checkpoint) -> None:
    """Resuming from ``checkpoint`` (of ``step``; None: from the start): metrics after it are dropped."""
    run.truncate_metrics(step)
    if not run.main:  # said once, by rank 0
        return
    previous = (run.manifest.get("attempts") or [{}])[-1]
    how = {"interrupted": "was stopped by a signal", "failed": "failed",
           "running": "was killed before it could record how it ended (SIGKILL, out of memory, a lost node)"}
    print(f"rlhf_exp: resuming {run.run_id} from " + (f"step {step} ({checkpoint})" if checkpoint else
          "the start: it has no complete checkpoint") +
          (f"; its previous attempt {how[previous['status']]}" if previous.get("status") in how else ""),
          file=sys.stderr)


def save_last_good(trainer, exc: NonFiniteGradients) -> FloatingPointError:
    """A step's gradients are NaN/inf and no skips are left: the update was not applied, so the weights
    are still those of the last good step. Save them as a checkpoint and stop, naming it. (Resumable
    when the phase writes resumable checkpoints; its RNG states are those after the failed step's
    forward pass, so a resume from it is not bit-exact.)"""
    from rlhf_exp.tracking.checkpoints import mark_complete, of_trainer

    step = trainer.state.global_step
    trainer._save_checkpoint(trainer.model, trial=None)  # transformers' own save: weights, optimizer, RNG, state
    folder = Path(trainer.args.output_dir) / f"checkpoint-{step}"
    of_trainer(trainer).write_window(folder)  # (waits for every rank)
    mark_complete(folder, step)
    what = "weights only: phase.save_minutes/save_steps are off" if trainer.args.save_only_model else "resumable"
    return FloatingPointError(f"{exc}. The last good state (after step {step}) is saved in {folder} ({what})")


def finish_checkpoints(run: Run, best: Path | None, metric: float | None) -> dict | None:
    """The run succeeded: its resumable checkpoints are no longer needed, except ``best`` (the best one
    by the phase's metric, when the final model is not that one). Returns {"path", "metric"} of it."""
    trainer_dir = run.checkpoint_dir / "trainer"
    if run.main:
        for folder in trainer_dir.glob("*"):
            if best is None or folder.resolve() != Path(best).resolve():
                shutil.rmtree(folder, ignore_errors=True)
        if not any(trainer_dir.glob("*")):
            shutil.rmtree(trainer_dir, ignore_errors=True)
    return {"path": str(best), "metric": metric} if best is not None else None


def save_and_finish(run: Run, built: Built, folder: str = "final", kind: str = "policy") -> dict:
    """Save the model the next phase loads under checkpoints/<folder>/, then write the summary."""
    from rlhf_exp.launch.distributed import SHARDED
    from rlhf_exp.models import save_for_next_phase

    trainer = built.trainer if str(run.cfg.hardware.distributed) in SHARDED else None
    state, args = built.trainer.state, built.trainer.args
    with run.stage("save"):
        final_dir = save_for_next_phase(built.trainer.model, built.tokenizer, run.checkpoint_dir / folder, kind,
                                        state.global_step, run.run_id, trainer=trainer)
    # the final model is the best one when early stopping restored it or when the best is the last step;
    # else the best checkpoint stays
    best = None if args.load_best_model_at_end else state.best_model_checkpoint
    if best is not None and Path(best).name == f"checkpoint-{state.global_step}":
        best = None
    kept = finish_checkpoints(run, best, state.best_metric)
    if kept is not None:
        built.metrics["best_checkpoint"] = kept["path"]
        built.metrics[f"best_{args.metric_for_best_model}"] = kept["metric"]
    run.finish(built.metrics, final_dir)
    return built.metrics


def train_evaluate_save(cfg: RunConfig, run: Run, built: Built) -> dict:
    """Policy phases: train, evaluate, score gold on the embedded task, save, write the summary."""
    train_and_evaluate(cfg, run, built)
    score = gold(cfg, built.trainer.model, built.tokenizer, built.data, run, "final")
    if score is not None:
        built.metrics["gold_score"] = score
        run.log({"eval/gold_score": score}, step=built.trainer.state.global_step)
    return save_and_finish(run, built)
