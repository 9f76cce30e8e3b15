"""PPO against a reward-model run, from an SFT run (our own loop: rlhf_exp.ppo)."""

from __future__ import annotations

import time

from rlhf_exp.config.schema import RunConfig
from rlhf_exp.tracking.run import Run


def _prompts(cfg: RunConfig, tokenizer) -> tuple[list[str], object]:
    """Training prompts (from the preference data's prompts) as text, and the phase's data."""
    from rlhf_exp.runners.common import phase_data

    data = phase_data(cfg, tokenizer, preferences=True)
    prompts = list(dict.fromkeys(
        p if isinstance(p, str) else tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        for p in data.train["prompt"]))
    return prompts, data


def run(cfg: RunConfig, run: Run) -> dict:
    from accelerate import Accelerator

    from rlhf_exp.config.schema import resumable_checkpoints
    from rlhf_exp.data.synthetic import gold_reward
    from rlhf_exp.models import load_causal_lm, load_reward_model, load_value_model, lora_config, save_for_next_phase
    from rlhf_exp.ppo.trainer import PPOTrainer, frozen_copy, load_reward_stats
    from rlhf_exp.runners.common import announce_resume, finish_checkpoints, gold, record_initial_gold, start
    from rlhf_exp.tracking.checkpoints import best_unless_final, latest_complete, metric_of

    sft, tokenizer = start(cfg, run)
    rm = run.parent("rm")
    prompts, data = _prompts(cfg, tokenizer)
    policy = load_causal_lm(cfg.model, cfg.hardware, tokenizer, checkpoint=sft["checkpoint"])
    metrics: dict = {"sft_run": sft["run_id"], "reward_run": rm["run_id"]}
    record_initial_gold(cfg, policy, tokenizer, data, run, metrics)

    peft = lora_config(cfg.model, cfg.hardware)
    if peft is not None:
        from peft import get_peft_model

        policy, reference = get_peft_model(policy, peft), None  # reference = adapters disabled
    else:
        reference = frozen_copy(policy)
    reward_model = load_reward_model(cfg.model, cfg.hardware, tokenizer, rm["checkpoint"])
    critic = load_value_model(cfg.model, cfg.hardware, rm["checkpoint"])
    accelerator = Accelerator(cpu=cfg.hardware.accelerator == "cpu",
                              mixed_precision={"fp32": "no"}.get(str(cfg.hardware.precision), str(cfg.hardware.precision)))
    trainer = PPOTrainer(cfg.phase, policy, critic, reward_model, tokenizer, prompts,
                         load_reward_stats(rm["path"]), cfg.seed, accelerator, reference=reference,
                         gold_fn=gold_reward if data.eval_prompts else None)
    steps = cfg.phase.max_steps if cfg.phase.max_steps > 0 else max(
        1, int(cfg.phase.num_epochs * len(prompts) / cfg.phase.rollout_batch_size))
    checkpoints = run.checkpoint_dir / "trainer" if resumable_checkpoints(cfg.phase) else None
    if run.resuming:
        resume_from = latest_complete(run.checkpoint_dir / "trainer")
        if resume_from is not None:
            trainer.load_checkpoint(resume_from)
        announce_resume(run, trainer.steps_done, resume_from)
    start = time.monotonic()
    last = trainer.train(steps, run.log, checkpoints, cfg.phase.save_steps, cfg.phase.save_minutes,
                         cfg.phase.keep_checkpoints)
    metrics["train_runtime_s"] = round(time.monotonic() - start, 2)
    if not last:  # resumed from the last step's checkpoint: its numbers are in metrics.jsonl
        last = next(r for r in reversed(run.previous) if "ppo/kl" in r)

    metrics.update(steps=steps, num_processes=accelerator.num_processes, kl=last["ppo/kl"], reward=last["ppo/reward"],
                   kl_coef_final=trainer.kl_ctl.value)
    policy = accelerator.unwrap_model(trainer.policy)
    score = gold(cfg, policy, tokenizer, data, run, "final")
    if score is not None:
        metrics["gold_score"] = score
        run.log({"eval/gold_score": score}, step=steps)
    final_dir = save_for_next_phase(policy, tokenizer, run.checkpoint_dir / "final", "policy", steps,
                                    run.run_id)
    # the best checkpoint by rollout reward stays when it is not the final policy
    best = best_unless_final(run.checkpoint_dir / "trainer", steps)
    kept = finish_checkpoints(run, best, metric_of(best) if best else None)
    if kept is not None:
        metrics["best_checkpoint"], metrics["best_ppo_reward"] = kept["path"], kept["metric"]
    run.finish(metrics, final_dir)
    return metrics
