"""Reward model on TRL's RewardTrainer (Bradley-Terry loss on preference pairs), from an SFT run.

The model is the SFT checkpoint with a new scalar head, read at the last token. Embeddings are frozen
by default. Early stopping and the kept checkpoint follow held-out pairwise accuracy. The run folder
gets ``reward_stats.json`` (mean/std of scores on the held-out answers) so PPO can normalise rewards,
and the model goes to ``checkpoints/reward_model/``, apart from policy checkpoints.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rlhf_exp.config.schema import RunConfig
from rlhf_exp.tracking.run import Run

LOW_ACCURACY = 0.60


def build(cfg: RunConfig, run: Run):
    from trl import RewardTrainer

    from rlhf_exp.data.check import report_run
    from rlhf_exp.launch.trl_args import reward_config
    from rlhf_exp.models import broadcast_loading, load_reward_model, lora_config, prepare_for_adapters, upcast_trained
    from rlhf_exp.runners.common import Built, after_loading, before_loading, callbacks, phase_data, start

    hw = cfg.hardware
    sft, tokenizer = start(cfg, run)
    data = phase_data(cfg, tokenizer, preferences=True, run=run)
    report_run(cfg, run, tokenizer)  # the data checks (python -m rlhf_exp.data check) into the summary
    # the config before the model: under ZeRO-3 it then loads partitioned (see trl_args)
    args = reward_config(cfg, run.dir, has_eval=data.eval is not None)
    before_loading(cfg, run, args)
    with run.stage("models"), broadcast_loading(hw):  # under FSDP only rank 0 reads the checkpoint
        model = load_reward_model(cfg.model, hw, tokenizer, sft["checkpoint"], trained=not hw.lora)
    after_loading(run, reward_model=model)
    if cfg.phase.freeze_embeddings:
        model.get_input_embeddings().requires_grad_(False)
    log, cbs = callbacks(cfg, run, data)
    with run.stage("setup"):  # the TRL trainer: its arguments, its tokenisation of the data, the wrapping
        trainer = RewardTrainer(
            model=prepare_for_adapters(model, hw) if hw.lora else model,
            args=args,
            train_dataset=data.train,
            eval_dataset=data.eval,
            processing_class=tokenizer,
            # the score head is new: trained whole beside the body's adapters
            peft_config=lora_config(cfg.model, hw, task_type="SEQ_CLS"),
            callbacks=cbs,
        )
    upcast_trained(trainer.model)
    return Built(trainer, log, tokenizer, data, {"sft_run": sft["run_id"]})


def held_out_reward_stats(model, tokenizer, rows, batch_size: int) -> tuple[dict, list[float], list[float]]:
    """Scores of the held-out pairs' chosen and rejected answers (``rows``: the eval split, with prompt, chosen
    and rejected columns) and their mean/std, as ``reward_stats.json`` holds them. Returns (stats, chosen
    scores, rejected scores). The RM runner and ``python -m rlhf_exp.reward_stats`` both measure this way."""
    from rlhf_exp.evaluation import reward_scores

    chosen = reward_scores(model, tokenizer, rows["prompt"], rows["chosen"], batch_size)
    rejected = reward_scores(model, tokenizer, rows["prompt"], rows["rejected"], batch_size)
    scores = chosen.new_tensor([*chosen.tolist(), *rejected.tolist()])
    stats = {"mean": scores.mean().item(), "std": scores.std().item(), "n": len(scores),
             "reference": "chosen and rejected answers of the eval split"}
    return stats, chosen.tolist(), rejected.tolist()


def write_reward_stats(run_dir: Path, stats: dict) -> Path:
    """``<run_dir>/reward_stats.json``, written whole or not at all (a temporary file, then renamed)."""
    from rlhf_exp.tracking.run import write_json_atomic

    path = Path(run_dir) / "reward_stats.json"
    write_json_atomic(path, stats)
    return path


def run(cfg: RunConfig, run: Run) -> dict:
    from rlhf_exp.runners.common import save_and_finish, train_and_evaluate

    built = build(cfg, run)
    metrics = train_and_evaluate(cfg, run, built)
    accuracy = metrics.get("eval_accuracy")
    if accuracy is not None and accuracy < LOW_ACCURACY:
        print(f"rlhf_exp: warning: reward model held-out accuracy {accuracy:.3f} < {LOW_ACCURACY}: annotation "
              "data likely inconsistent (InstructGPT-style labels typically give 0.65-0.75)", file=sys.stderr)
    data = built.data
    if data.eval is not None:
        with run.stage("reward_stats"):
            stats, chosen, rejected = held_out_reward_stats(built.trainer.model, built.tokenizer, data.eval,
                                                            cfg.phase.per_device_eval_batch_size)
        write_reward_stats(run.dir, stats)
        metrics.update(reward_mean=stats["mean"], reward_std=stats["std"])
        if data.eval_pair_golds:
            agree = [(c > r) == (gc > gr) for c, r, (gc, gr) in zip(chosen, rejected, data.eval_pair_golds) if gc != gr]
            if agree:
                metrics["gold_accuracy"] = sum(agree) / len(agree)
                run.log({"eval/gold_accuracy": metrics["gold_accuracy"]}, step=built.trainer.state.global_step)
    return save_and_finish(run, built, folder="reward_model", kind="reward_model")
