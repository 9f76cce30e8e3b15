"""PPO against a reward-model run, from an SFT run (our own loop: rlhf_exp.ppo)."""

from __future__ import annotations

import sys
import time

from rlhf_exp.config.schema import RunConfig
from rlhf_exp.tracking.run import Run


def _prompts(cfg: RunConfig, tokenizer, run: Run) -> tuple[list, list[list[int]], object]:
    """Training prompts (the preference data's prompts, strings or message lists, each once), their ids
    as SFT tokenized them, and the phase's data. A prompt whose ids leave fewer than max_new_tokens within
    phase.max_length is dropped (cutting a chat prompt would cut its template), counted and reported once."""
    import json

    from rlhf_exp.data.encode import prompt_ids
    from rlhf_exp.runners.common import phase_data

    data = phase_data(cfg, tokenizer, preferences=True, run=run)
    unique = {json.dumps(p, sort_keys=True): p for p in data.train["prompt"]}
    budget = cfg.phase.max_length - cfg.phase.max_new_tokens
    with run.stage("data"):  # tokenised once, as SFT tokenised them
        encoded = [(p, prompt_ids(tokenizer, p)) for p in unique.values()]
    prompts = [(p, ids) for p, ids in encoded if len(ids) <= budget]
    run.count_length(dropped=len(unique) - len(prompts), truncated=0, total=len(unique), split="train prompts",
                     rule=f"prompt longer than phase.max_length - phase.max_new_tokens = {budget} tokens")
    if not prompts:
        from rlhf_exp.config.errors import ConfigError

        raise ConfigError(f"every PPO prompt is longer than phase.max_length={cfg.phase.max_length} - "
                          f"phase.max_new_tokens={cfg.phase.max_new_tokens} tokens: raise phase.max_length")
    return [p for p, _ in prompts], [ids for _, ids in prompts], data


def run(cfg: RunConfig, run: Run) -> dict:
    from accelerate import Accelerator

    from rlhf_exp.config.schema import learning_rate, resumable_checkpoints
    from rlhf_exp.data.loading import held_out_prompts
    from rlhf_exp.data.synthetic import gold_reward
    from rlhf_exp.models import load_causal_lm, load_reward_model, load_value_model, save_for_next_phase, wrap_lora
    from rlhf_exp.ppo.engines import loading_context
    from rlhf_exp.ppo.trainer import PPOTrainer, load_reward_stats
    from rlhf_exp.runners.common import (
        after_loading,
        announce_resume,
        finish_checkpoints,
        gold,
        record_initial_gold,
        start,
    )
    from rlhf_exp.tracking.checkpoints import best_unless_final, latest_complete, metric_of

    # first: the process group (and, on GPUs, this process's device) for everything below
    accelerator = Accelerator(cpu=cfg.hardware.accelerator == "cpu",
                              mixed_precision={"fp32": "no"}.get(str(cfg.hardware.precision), str(cfg.hardware.precision)))
    sft, tokenizer = start(cfg, run)
    rm = run.parent("rm")
    prompts, prompt_ids, data = _prompts(cfg, tokenizer, run)
    hw, lora = cfg.hardware, cfg.hardware.lora
    # ZeRO-3: every model loads partitioned; FSDP: rank 0 reads the checkpoints, the backend broadcasts its weights
    with loading_context(cfg):
        with run.stage("models"):
            policy = load_causal_lm(cfg.model, hw, tokenizer, checkpoint=sft["checkpoint"], trained=not lora)
            if lora:
                policy, reference = wrap_lora(policy, cfg.model, hw), None  # reference = adapters disabled
            else:
                reference = load_causal_lm(cfg.model, hw, tokenizer, checkpoint=sft["checkpoint"], trained=False)
            reward_model = load_reward_model(cfg.model, hw, tokenizer, rm["checkpoint"], trained=False)
            critic = load_value_model(cfg.model, hw, rm["checkpoint"], trained=not cfg.phase.critic_lora)
            if cfg.phase.critic_lora:  # adapters on the critic's body; its value head trained whole
                critic = wrap_lora(critic, cfg.model, hw, task_type="TOKEN_CLS", force=True)
        after_loading(run, policy=policy, reference=reference, reward_model=reward_model, critic=critic)
        with run.stage("setup"):  # wrapping (and sharding) the models, their optimizers, the rollout engine
            trainer = PPOTrainer(cfg, policy, critic, reward_model, tokenizer, prompts, load_reward_stats(rm["path"]),
                                 accelerator, reference=reference, gold_fn=gold_reward if data.eval_prompts else None,
                                 policy_lr=learning_rate(cfg.phase, hw), prompt_ids=prompt_ids, run_dir=run.dir,
                                 eval_prompts=held_out_prompts(data), model_path=sft["checkpoint"])
    metrics: dict = {"sft_run": sft["run_id"], "reward_run": rm["run_id"]}
    record_initial_gold(cfg, trainer.engines.bare_policy(), tokenizer, data, run, metrics)
    from rlhf_exp.data.report import preview_prompts

    run.write_preview(preview_prompts(trainer.prompt_ids, tokenizer))
    steps = cfg.phase.max_steps if cfg.phase.max_steps > 0 else max(
        1, int(cfg.phase.num_epochs * len(prompts) / cfg.phase.rollout_batch_size))
    checkpoints = run.checkpoint_dir / "trainer" if resumable_checkpoints(cfg.phase) else None
    if run.resuming:
        resume_from = latest_complete(run.checkpoint_dir / "trainer")
        if resume_from is not None:
            trainer.load_checkpoint(resume_from)
        announce_resume(run, trainer.steps_done, resume_from)
    from rlhf_exp.monitor import monitor_of

    monitor = monitor_of(cfg, run)
    start = time.monotonic()
    with run.stage("train"):
        last = trainer.train(steps, run.log, checkpoints, cfg.phase.save_steps, cfg.phase.save_minutes,
                             cfg.phase.keep_checkpoints, monitor=monitor)
    metrics["train_runtime_s"] = round(time.monotonic() - start, 2)
    if not last:  # resumed from the last step's checkpoint: its numbers are in metrics.jsonl
        last = next(r for r in reversed(run.previous) if "ppo/kl" in r)

    if trainer.stopped_by_monitor:  # the policy of the step it stopped at is the final one
        steps = trainer.steps_done
        reason = f"{trainer.stopped_by_monitor}: its policy is the final one (checkpoints/final)"
        metrics["stopped_by_monitor"] = run.manifest["stopped_by_monitor"] = reason
        if run.main:
            print(f"rlhf_exp: {reason}", file=sys.stderr, flush=True)
    if monitor is not None:
        metrics["monitor_alarms"] = [a.as_dict() for a in monitor.alarms]
    metrics.update(steps=steps, num_processes=accelerator.num_processes, kl=last["ppo/kl"], reward=last["ppo/reward"],
                   kl_coef_final=trainer.kl_ctl.value)
    policy = trainer.engines.bare_policy()
    score = gold(cfg, policy, tokenizer, data, run, "final")
    if score is not None:
        metrics["gold_score"] = score
        run.log({"eval/gold_score": score}, step=steps)
    model, saver = trainer.engines.final_policy()  # sharded: the backend gathers the whole weights
    with run.stage("save"):
        final_dir = save_for_next_phase(model, tokenizer, run.checkpoint_dir / "final", "policy", steps, run.run_id,
                                        trainer=saver)
    if trainer.last_eval:  # the last held-out evaluation (phase.eval_steps)
        metrics.update({k.replace("/", "_"): v for k, v in trainer.last_eval.items() if k != "step"})
    # the best checkpoint by a held-out signal (PPOTrainer.selection_metric) stays when it is not the final policy
    best = best_unless_final(run.checkpoint_dir / "trainer", steps)
    kept = finish_checkpoints(run, best, metric_of(best) if best else None)
    if kept is not None:
        metrics["best_checkpoint"], metrics["best_eval_metric"] = kept["path"], kept["metric"]
    run.finish(metrics, final_dir)
    return metrics
