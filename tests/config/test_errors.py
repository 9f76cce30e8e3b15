"""Bad input fails before any model loads, in one or two lines that name the key and the fix."""

from __future__ import annotations

import pytest

from rlhf_exp.config.errors import ConfigError
from rlhf_exp.config.validate import validate
from tests.conftest import run_cli


def error_of(compose, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        validate(compose(overrides))
    return str(info.value)


def test_unknown_key_names_it_and_suggests_the_right_one(compose):
    message = error_of(compose, ["phase=dpo", "phase.betta=0.1"])
    assert "unknown key 'phase.betta'" in message and "Did you mean 'phase.beta'?" in message
    assert "Valid keys under phase:" in message and "beta" in message


def test_wrong_type_names_key_value_and_type(compose):
    message = error_of(compose, ["phase.learning_rate=abc"])
    assert message.startswith("phase.learning_rate: 'abc' is not a valid float")


def test_unknown_group_option_lists_valid_ones(compose):
    message = error_of(compose, ["model=nope"])
    assert message == ("model=nope: no such option. Valid options for model: llama3_1_8b, llama3_1_8b_instruct, llama3_8b, "
                       "local, mistral_7b_v03, qwen2_5_7b, tiny")


def test_setting_of_another_phase_names_its_owner(compose):
    message = error_of(compose, ["phase=sft", "phase.beta=0.1"])
    assert "'phase.beta' is a setting of phase=dpo, not of phase=sft" in message


def test_ppo_setting_given_to_dpo(compose):
    assert "is a setting of phase=ppo, not of phase=dpo" in error_of(compose, ["phase=dpo", "phase.kl_coef=0.1"])


def test_missing_data_file(compose):
    message = error_of(compose, ["data=jsonl", "model=qwen2_5_7b", "hardware=a100x1", "data.train_file=/no/such/train.jsonl"])
    assert message.startswith("data.train_file=/no/such/train.jsonl: no such file") and "Fix the path" in message


def test_jsonl_without_a_file_says_which_key_to_add(compose):
    assert "add data.train_file=" in error_of(compose, ["data=jsonl", "model=qwen2_5_7b"])


def test_invalid_enum_lists_choices(compose):
    message = error_of(compose, ["hardware.precision=bf17"])
    assert message == "hardware.precision: 'bf17' is not a valid choice. Valid choices: fp32, bf16, fp16"


def test_plus_cannot_smuggle_a_key_past_the_schema(compose):
    assert "unknown key 'phase.foo'" in error_of(compose, ["+phase.foo=1"])


def test_top_level_typo(compose):
    assert "Did you mean 'model'?" in error_of(compose, ["modle=tiny"])


def test_sweep_syntax_without_multirun(compose):
    assert "add -m" in error_of(compose, ["phase.num_epochs=1,2"])


def test_cross_field_rules_are_gathered_in_one_message(compose):
    message = error_of(compose, ["phase.learning_rate=-1", "phase.per_device_train_batch_size=0"])
    assert "phase.learning_rate=-1.0: must be > 0" in message
    assert "phase.per_device_train_batch_size=0: must be >= 1" in message


def test_tiny_model_refuses_text_data(compose):
    assert "only covers data=synthetic" in error_of(compose, ["data=hh_rlhf"])


def test_error_inside_a_yaml_file_names_the_file_and_key(compose, tmp_path):
    import shutil

    from tests.conftest import CONF

    shutil.copytree(CONF, tmp_path / "conf")
    (tmp_path / "conf" / "recipe" / "tiny_sft.yaml").write_text("# @package _global_\nphase:\n  learning_rat: 1\n")
    with pytest.raises(ConfigError) as info:
        compose([], tmp_path / "conf")
    assert str(info.value).startswith("in conf/recipe/tiny_sft.yaml: unknown key 'phase.learning_rat'")


def test_bool_and_synthetic_limits(compose):
    assert "Use hardware.lora=true or hardware.lora=false" in error_of(compose, ["hardware.lora=maybe"])
    assert "at most 20 with num_digits=2" in error_of(compose, ["data.synthetic.num_digits=2"])
    assert "set phase.max_new_tokens=6 or more" in error_of(compose, ["phase.max_new_tokens=2"])


def test_fp16_on_cpu(compose):
    assert "needs a GPU" in error_of(compose, ["hardware.precision=fp16"])


@pytest.mark.parametrize(
    "args,expected",
    [
        (["phase=dpo", "phase.betta=0.1"], "unknown key 'phase.betta'"),
        (["phase.learning_rate=abc"], "'abc' is not a valid float"),
        (["model=nope"], "Valid options for model: llama3_1_8b, llama3_1_8b_instruct, llama3_8b, local, mistral_7b_v03, "
                         "qwen2_5_7b, tiny"),
        (["phase=sft", "phase.beta=0.1"], "is a setting of phase=dpo"),
        (["data=jsonl", "model=qwen2_5_7b", "hardware=a100x1", "data.train_file=/no/such.jsonl"], "no such file"),
        (["-m", "phase.learning_rate=1e-3,abc"], "'abc' is not a valid float"),
    ],
)
def test_cli_exits_2_with_a_short_message_and_no_traceback(args, expected, tmp_path):
    proc = run_cli([*args, f"output_root={tmp_path}"])
    assert proc.returncode == 2
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert proc.stderr.startswith("rlhf_exp: error: ")
    assert len(proc.stderr.strip().splitlines()) <= 2
    assert not (tmp_path / "runs").exists(), "nothing may be created before the config is valid"


def test_missing_parent_run_prints_the_command_that_makes_one(tmp_path):
    proc = run_cli(["phase=dpo", f"output_root={tmp_path}"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"python -m rlhf_exp phase=sft model=tiny data=synthetic output_root={tmp_path}" in proc.stderr
    assert "with their default settings (every model.* and data.* value must match)" in proc.stderr


def test_missing_parent_message_names_the_settings_and_keeps_them_in_the_command(tmp_path):
    proc = run_cli(["phase=dpo", "data.synthetic.sft_noise_fraction=0.1", "phase.beta=0.2", f"output_root={tmp_path}"])
    assert proc.returncode == 2
    assert "an sft run of model=tiny data=synthetic with data.synthetic.sft_noise_fraction=0.1 (every" in proc.stderr
    assert ("python -m rlhf_exp phase=sft model=tiny data=synthetic data.synthetic.sft_noise_fraction=0.1 "
            f"output_root={tmp_path}") in proc.stderr  # the phase's own settings are not carried over


@pytest.mark.parametrize("args", [["phase=dpo"], ["phase=rm"], ["phase=ppo"], ["hardware=a100x8"],
                                  ["-m", "phase=dpo", "seed=0,1"]])
def test_runs_that_cannot_start_leave_no_folder(args, tmp_path):
    """Parents, runner and launch are checked before Hydra makes a run folder."""
    proc = run_cli([*args, f"output_root={tmp_path}"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir())


def test_parent_of_the_wrong_phase_is_refused(tmp_path):
    run = tmp_path / "runs" / "x_dpo"
    run.mkdir(parents=True)
    (run / "manifest.json").write_text('{"run_id": "x_dpo", "phase": "dpo", "status": "succeeded"}')
    before = sorted(tmp_path.rglob("*"))
    proc = run_cli(["phase=dpo", f"phase.sft_run={run}", f"output_root={tmp_path}"])
    assert proc.returncode == 2
    assert "is a run of phase=dpo; phase.sft_run needs a run of phase=sft" in proc.stderr
    assert sorted(tmp_path.rglob("*")) == before
