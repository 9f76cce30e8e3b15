"""Every file under conf/ composes, and the composed configs pass validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rlhf_exp.config.validate import validate

CONF = Path(__file__).resolve().parents[2] / "conf"

# options of groups that must be combined with others to be valid
COMPANIONS = {
    ("data", "hh_rlhf"): ["model=llama3_8b", "hardware=a100x1"],
    ("data", "ultrafeedback_binarized"): ["model=qwen2_5_7b", "hardware=a100x1"],
    ("data", "jsonl"): ["model=mistral_7b_v03", "hardware=a100x1"],
    ("model", "llama3_8b"): ["data=hh_rlhf", "hardware=a100x1"],
    ("model", "mistral_7b_v03"): ["data=ultrafeedback_binarized", "hardware=a100x1"],
    ("model", "qwen2_5_7b"): ["data=ultrafeedback_binarized", "hardware=a100x1"],
    ("model", "llama3_1_8b"): ["data=ultrafeedback_binarized", "hardware=a100x1"],
    ("model", "llama3_1_8b_instruct"): ["data=hh_rlhf", "hardware=a100x1"],
    ("model", "local"): ["model.path=org/my-model", "data=synthetic_chat"],
    ("data", "synthetic_chat"): ["model=local", "model.path=org/my-model"],
}


def all_options():
    for group_dir in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name != "recipe"):
        for yaml in sorted(group_dir.glob("*.yaml")):
            yield group_dir.name, yaml.stem


@pytest.mark.parametrize("group,option", list(all_options()), ids=lambda x: x if isinstance(x, str) else None)
def test_every_option_composes_and_validates(compose, group, option, tmp_path):
    overrides = [f"{group}={option}", *COMPANIONS.get((group, option), [])]
    if "data=jsonl" in overrides:
        train = tmp_path / "train.jsonl"
        train.write_text('{"prompt": "p", "completion": "c"}\n')
        overrides.append(f"data.train_file={train}")
    cfg = compose(overrides)
    assert cfg[group].name == option or (group == "phase" and cfg.phase.name == option)
    validate(cfg)
    OmegaConf.to_object(cfg)  # every value has the schema's type


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (CONF / "recipe").glob("*.yaml")))
def test_every_recipe_is_picked_by_its_model_and_phase(compose, recipe):
    model, phase = recipe.rsplit("_", 1)
    cfg = compose([f"model={model}", f"phase={phase}"])
    text = (CONF / "recipe" / f"{recipe}.yaml").read_text()
    recipe_values = OmegaConf.create(text)
    for key, value in recipe_values.phase.items():
        assert cfg.phase[key] == value, f"{recipe}: phase.{key}"


def test_defaults_are_the_embedded_task_on_cpu(compose):
    cfg = compose([])
    assert (cfg.model.name, cfg.data.name, cfg.phase.name, cfg.hardware.name, cfg.logger.name) == (
        "tiny", "synthetic", "sft", "cpu", "local")


def test_ppo_composes_on_a100x8(compose):
    cfg = compose(["phase=ppo", "hardware=a100x8"])
    assert cfg.phase.name == "ppo" and cfg.hardware.num_processes == 8 and cfg.hardware.gpus_per_node == 8
    validate(cfg)


def test_real_model_presets_name_hub_models_and_bf16(compose):
    expected = {
        "llama3_8b": "meta-llama/Meta-Llama-3-8B-Instruct",
        "mistral_7b_v03": "mistralai/Mistral-7B-Instruct-v0.3",
        "qwen2_5_7b": "Qwen/Qwen2.5-7B-Instruct",
    }
    for preset, hub_id in expected.items():
        cfg = compose([f"model={preset}", "data=hh_rlhf"])
        assert cfg.model.path == hub_id and cfg.model.source == "hub" and cfg.model.dtype == "bfloat16"


def test_real_data_presets_name_hub_sets_and_splits(compose):
    hh = compose(["data=hh_rlhf", "model=llama3_8b"]).data
    assert (hh.path, hh.format, hh.pref_train_split, hh.pref_eval_split) == ("Anthropic/hh-rlhf", "hh", "train", "test")
    uf = compose(["data=ultrafeedback_binarized", "model=qwen2_5_7b"]).data
    assert uf.path == "HuggingFaceH4/ultrafeedback_binarized"
    assert (uf.sft_train_split, uf.sft_eval_split, uf.pref_train_split, uf.pref_eval_split) == (
        "train_sft", "test_sft", "train_prefs", "test_prefs")


def _leaves(node, prefix=""):
    for key, value in node.items():
        if key == "defaults":
            continue
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("group,option", [(g, o) for g, o in all_options()])
def test_yaml_sets_only_values_that_differ_from_the_schema(group, option):
    """Rule 2: each default is written once, in the dataclass; a YAML copy would not follow a change."""
    import dataclasses

    from rlhf_exp.config.schema import GROUP_SCHEMAS, PHASE_SCHEMAS

    raw = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"))
    schema = PHASE_SCHEMAS[option] if group == "phase" else GROUP_SCHEMAS[group]
    defaults = OmegaConf.to_container(OmegaConf.structured(schema), enum_to_str=True)
    repeated = []
    for key, value in _leaves(raw):
        node = defaults
        for part in key.split("."):
            node = node.get(part, dataclasses.MISSING) if isinstance(node, dict) else dataclasses.MISSING
        if key != "name" and node == value:
            repeated.append(f"{key}={value!r}")
    assert not repeated, f"conf/{group}/{option}.yaml repeats schema defaults: {', '.join(repeated)}"
