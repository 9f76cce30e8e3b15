"""The DeepSpeed and FSDP settings the TRL phases hand to transformers (rlhf_exp.launch.sharding), checked the way
the libraries themselves read them, the run folder's record of them, and SFT under ZeRO-3 on 2 CPU processes."""

from __future__ import annotations

import json
import math

import pytest
from omegaconf import OmegaConf

from rlhf_exp.launch.sharding import record, trainer_deepspeed, trainer_fsdp
from rlhf_exp.launch.trl_args import sft_config, training_kwargs
from tests.conftest import only_run, read_json, read_metrics, run_cli

ZERO3 = ["hardware=cpu_x2", "hardware.distributed=deepspeed_zero3"]


def typed(compose, *overrides: str):
    return OmegaConf.to_object(compose(list(overrides)))


def filled_by_transformers(cfg, tmp_path) -> dict:
    """The DeepSpeed dict with its "auto" values filled by transformers' own HfTrainerDeepSpeedConfig, as an
    SFTConfig does when it is built (before the model loads; what launch/deepspeed.json records)."""
    pytest.importorskip("deepspeed")
    args = sft_config(cfg, tmp_path, has_eval=True)
    config = args.hf_deepspeed_config.config
    assert "auto" not in json.dumps(config), config
    return config


@pytest.mark.parametrize("extra, checks", [
    ([], {"zero_optimization.stage": 3, "bf16.enabled": False, "train_micro_batch_size_per_gpu": 8,
          "train_batch_size": 16, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0}),
    (["hardware.precision=bf16", "hardware.offload_params=true", "hardware.offload_optimizer=true"],
     {"bf16.enabled": True, "zero_optimization.offload_param.device": "cpu",
      "zero_optimization.offload_optimizer.device": "cpu", "optimizer.type": "AdamW", "optimizer.params.lr": 1e-3}),
    (["hardware.distributed=deepspeed_zero2"], {"zero_optimization.stage": 2}),
])
def test_deepspeed_config_passes_deepspeeds_own_config_class(compose, tmp_path, extra, checks):
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = typed(compose, *ZERO3, "phase.per_device_train_batch_size=8", "phase.gradient_accumulation_steps=2",
                "phase.learning_rate=1e-3", *extra)
    config = filled_by_transformers(cfg, tmp_path)
    for key, value in checks.items():
        node = config
        for part in key.split("."):
            node = node[part]
        assert node == value, key
    # DeepSpeed's own pydantic classes: unknown keys, wrong types and inconsistent batch sizes are errors there
    # (this test process is a world of one: train_batch_size = 8 x 2 accumulation x 1 process)
    ds = DeepSpeedConfig(config)
    assert ds.zero_optimization_stage == checks.get("zero_optimization.stage", 3)
    assert ds.train_batch_size == config["train_batch_size"]
    if "hardware.offload_params=true" in extra:
        assert ds.zero_config.offload_param.device == "cpu" and ds.zero_config.offload_optimizer.device == "cpu"
        assert ds.bfloat16_config.enabled


def test_zero3_keeps_whole_weights_at_save_and_the_trainer_optimizer_otherwise(compose):
    config = trainer_deepspeed(typed(compose, *ZERO3).hardware)
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "optimizer" not in config  # the trainer's own (hardware.optimizer), not DeepSpeed's
    assert trainer_deepspeed(typed(compose, "hardware=cpu_x2").hardware) is None


def test_fsdp_settings_reach_accelerate_as_fsdp2(compose, tmp_path):
    cfg = typed(compose, "hardware=cpu_x2", "hardware.distributed=fsdp", "hardware.gradient_checkpointing=true")
    kwargs = training_kwargs(cfg, tmp_path, has_eval=True)
    assert kwargs["fsdp"] is True and kwargs["fsdp_config"]["version"] == 2
    # FSDP's own activation checkpointing, not the trainer's (which would all-gather once more)
    assert kwargs["fsdp_config"]["activation_checkpointing"] is True
    assert not any(kwargs.get(k) for k in ("gradient_checkpointing", "activation_checkpointing"))
    plugin = sft_config(cfg, tmp_path, has_eval=True).fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["cpu_ram_efficient_loading"] is True
    assert plugin["reshard_after_forward"] is True and plugin["state_dict_type"] == "FULL_STATE_DICT"
    assert "cpu_offload" not in plugin
    gpus = typed(compose, "hardware=a100x4", "hardware.distributed=fsdp", "hardware.offload_params=true")
    offload = trainer_fsdp(gpus.hardware)
    assert offload["fsdp_config"]["cpu_offload"] is True
    assert trainer_fsdp(typed(compose, "hardware=a100x4").hardware) is None


def test_record_writes_launch_files_on_rank_0_only(tmp_path, monkeypatch):
    path = record(tmp_path, "deepspeed.json", {"steps_per_print": math.inf, "zero_optimization": {"stage": 3}})
    assert path == tmp_path / "launch" / "deepspeed.json"
    written = json.loads(path.read_text())  # strict JSON: no Infinity
    assert written == {"steps_per_print": 2**63 - 1, "zero_optimization": {"stage": 3}}
    monkeypatch.setenv("RANK", "1")
    assert record(tmp_path, "fsdp.json", {"fsdp": True}) is None and not (tmp_path / "launch" / "fsdp.json").exists()
    assert record(None, "x.json", {}) is None


@pytest.mark.slow
def test_sft_under_zero3_on_two_cpu_processes_loads_partitioned_and_learns(scaled_model, tmp_path):
    """The a100x4 recipe's engine (ZeRO-3, models loaded partitioned by zero.Init) on 2 CPU processes over gloo."""
    pytest.importorskip("deepspeed")
    proc = run_cli([*ZERO3, "model=local", f"model.path={scaled_model('qwen2_5')}", "data=synthetic_chat",
                    "phase.max_steps=8", "phase.logging_steps=2", "data.synthetic.num_sft_eval=64",
                    "data.synthetic.num_eval_prompts=32", "phase.save_minutes=null", f"output_root={tmp_path}"],
                   env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = only_run(tmp_path, "sft")
    m = read_json(run / "summary.json")["metrics"]
    assert m["num_processes"] == 2 and m["train_loss_last"] < m["train_loss_first"], m
    losses = [r["train/loss"] for r in read_metrics(run) if "train/loss" in r]
    assert len(losses) >= 3 and losses[-1] < losses[0]
    ds = json.loads((run / "launch" / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_batch_size"] == 2 * ds["train_micro_batch_size_per_gpu"]
    loading = json.loads((run / "launch" / "loading.json").read_text())["policy"]
    # rank 0 held half of the weights right after from_pretrained: loaded into partitions, never whole
    assert loading["zero3_init"] and loading["partitioned"], loading
    assert loading["params_this_process"] < loading["params_total"]
    # the saved checkpoint is whole (gathered 16-bit weights), loadable by the next phase
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "final")
    assert sum(p.numel() for p in saved.parameters()) == loading["params_total"]



@pytest.mark.parametrize("phase", ["sft", "rm", "dpo"])
def test_trl_phases_under_fsdp_on_cpu_processes_are_refused_not_run_as_ddp(phase, tmp_path):
    """accelerate turns FSDP on for GPU process groups only: on CPU processes the TRL trainer would silently run DDP
    (whole model per process). Refused in one line, before anything is written; PPO's own FSDP is accepted."""
    proc = run_cli([f"phase={phase}", "hardware=cpu_x2", "hardware.distributed=fsdp", f"output_root={tmp_path}"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"hardware.distributed=fsdp with hardware.accelerator=cpu for phase={phase}" in proc.stderr
    assert "deepspeed_zero3" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())
