"""The scaled-down real models behave like the checkpoints they stand for: architecture class and
config, chat template renderings (expected strings written by hand from the real templates'
behaviour), BOS/EOS/pad conventions, one token per digit, generation_config.json defaults, and
deterministic builds."""

from __future__ import annotations

import filecmp
import json

import pytest

from rlhf_exp.scaled_models import FAMILIES, TEMPLATES_DIR, main
from tests import scaled_fixtures
from tests.scaled_fixtures import chat_ids, load

# the session fixture; redundant (and harmless: builds are cached on disk) once tests/conftest.py imports it
scaled_model = scaled_fixtures.scaled_model

SYSTEM = "You are terse."
USER = "Sort these digits: 3 1 2"
ANSWER = "1 2 3"
USER2 = "Sort these digits: 5 4"

CONVERSATIONS = {  # name: (messages, add_generation_prompt)
    "full": ([{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER},
              {"role": "assistant", "content": ANSWER}], False),
    "prompt": ([{"role": "user", "content": USER}], True),
    "multi": ([{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER},
               {"role": "assistant", "content": ANSWER}, {"role": "user", "content": USER2}], True),
}

_LLAMA_SYS = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
              "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n")
EXPECTED = {
    "llama3_1": {
        "full": _LLAMA_SYS + "You are terse.<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nSort these digits: 3 1 2<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n1 2 3<|eot_id|>",
        # no system message: the date header is still there, with an empty system text
        "prompt": _LLAMA_SYS + "<|eot_id|>"
                  "<|start_header_id|>user<|end_header_id|>\n\nSort these digits: 3 1 2<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "multi": _LLAMA_SYS + "You are terse.<|eot_id|>"
                 "<|start_header_id|>user<|end_header_id|>\n\nSort these digits: 3 1 2<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n1 2 3<|eot_id|>"
                 "<|start_header_id|>user<|end_header_id|>\n\nSort these digits: 5 4<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n",
    },
    "mistral_v03": {
        # the system prompt goes before the *last* message only if that is the user's: a conversation
        # that ends with the assistant loses it (the real v0.3 template does this)
        "full": "<s>[INST] Sort these digits: 3 1 2[/INST] 1 2 3</s>",
        "prompt": "<s>[INST] Sort these digits: 3 1 2[/INST]",  # add_generation_prompt adds nothing
        "multi": "<s>[INST] Sort these digits: 3 1 2[/INST] 1 2 3</s>[INST] You are terse.\n\nSort these digits: 5 4[/INST]",
    },
    "qwen2_5": {
        "full": "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nSort these digits: 3 1 2<|im_end|>\n"
                "<|im_start|>assistant\n1 2 3<|im_end|>\n",
        # no system message: Qwen's default one
        "prompt": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                  "<|im_start|>user\nSort these digits: 3 1 2<|im_end|>\n<|im_start|>assistant\n",
        "multi": "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nSort these digits: 3 1 2<|im_end|>\n"
                 "<|im_start|>assistant\n1 2 3<|im_end|>\n<|im_start|>user\nSort these digits: 5 4<|im_end|>\n"
                 "<|im_start|>assistant\n",
    },
}

# family: (class, model_type, bos, eos, pad, unk, config eos names, generation_config.json values)
REAL = {
    "llama3_1": ("LlamaForCausalLM", "llama", "<|begin_of_text|>", "<|eot_id|>", None, None,
                 ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
                 {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "bos_token_id": "<|begin_of_text|>",
                  "eos_token_id": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]}),
    "mistral_v03": ("MistralForCausalLM", "mistral", "<s>", "</s>", None, "<unk>", "</s>",
                    {"bos_token_id": "<s>", "eos_token_id": "</s>"}),  # greedy: do_sample unset
    "qwen2_5": ("Qwen2ForCausalLM", "qwen2", None, "<|im_end|>", "<|endoftext|>", None, "<|im_end|>",
                {"do_sample": True, "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                 "bos_token_id": "<|endoftext|>", "pad_token_id": "<|endoftext|>",
                 "eos_token_id": ["<|im_end|>", "<|endoftext|>"]}),
}

families = pytest.mark.parametrize("family", FAMILIES)


@pytest.fixture(scope="module")
def loaded(scaled_model):
    """(folder, tokenizer, model) per family with the default sizes, loaded once per module."""
    cache = {}

    def get(family):
        if family not in cache:
            folder = scaled_model(family)
            cache[family] = (folder, *load(folder))
        return cache[family]

    return get


def _id(tokenizer, token):
    return None if token is None else tokenizer.convert_tokens_to_ids(token)


@families
def test_loads_as_the_real_architecture(family, loaded):
    folder, tokenizer, model = loaded(family)
    arch, model_type = REAL[family][:2]
    assert type(model).__name__ == arch and model.config.model_type == model_type
    assert model.config.architectures == [arch]
    assert len(tokenizer) == model.config.vocab_size == 1024
    assert model.config.tie_word_embeddings is False
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.bias is not None) == (family == "qwen2_5")  # Qwen2 has a q/k/v bias, the others none
    rope = model.config.rope_parameters
    assert rope["rope_theta"] == {"llama3_1": 500000.0, "mistral_v03": 1e6, "qwen2_5": 1e6}[family]
    assert model.config.rms_norm_eps == {"llama3_1": 1e-5, "mistral_v03": 1e-5, "qwen2_5": 1e-6}[family]
    if family == "llama3_1":
        assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    if family == "mistral_v03":
        assert model.config.sliding_window is None
    if family == "qwen2_5":
        assert model.config.use_sliding_window is False
    info = json.loads((folder / "scaled_model.json").read_text())
    assert info["weights"] == "random" and info["num_parameters"] == model.num_parameters()


@families
def test_chat_template_is_the_project_copy(family, loaded):
    _, tokenizer, _ = loaded(family)
    assert tokenizer.chat_template == (TEMPLATES_DIR / f"{family}.jinja").read_text(encoding="utf-8")


@families
@pytest.mark.parametrize("case", sorted(CONVERSATIONS))
def test_chat_template_renders_as_the_real_one(family, case, loaded):
    _, tokenizer, _ = loaded(family)
    messages, add_generation_prompt = CONVERSATIONS[case]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert rendered == EXPECTED[family][case]


def test_llama_date_string_replaces_the_default_date(loaded):
    _, tokenizer, _ = loaded("llama3_1")
    rendered = tokenizer.apply_chat_template(CONVERSATIONS["prompt"][0], tokenize=False, add_generation_prompt=True,
                                             date_string="01 Jan 2025")
    assert "Cutting Knowledge Date: December 2023\nToday Date: 01 Jan 2025\n\n<|eot_id|>" in rendered


@pytest.mark.parametrize("family, marker", [("llama3_1", "Environment: ipython\n"), ("mistral_v03", "[AVAILABLE_TOOLS]"),
                                            ("qwen2_5", "# Tools\n\nYou may call one or more functions")])
def test_tool_branches_render(family, marker, loaded):
    _, tokenizer, _ = loaded(family)
    tool = {"type": "function", "function": {"name": "sort_digits", "description": "Sort digits.",
                                             "parameters": {"type": "object", "properties": {}}}}
    rendered = tokenizer.apply_chat_template(CONVERSATIONS["prompt"][0], tools=[tool], tokenize=False,
                                             add_generation_prompt=True)
    assert marker in rendered and "sort_digits" in rendered


@families
def test_tokenized_chat_has_one_bos_for_llama_and_mistral_none_for_qwen(family, loaded):
    _, tokenizer, _ = loaded(family)
    bos = REAL[family][2]
    for messages, add_generation_prompt in CONVERSATIONS.values():
        ids = chat_ids(tokenizer, messages, add_generation_prompt=add_generation_prompt)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ids == tokenizer(text, add_special_tokens=False).input_ids
        if bos is None:
            assert tokenizer.bos_token is None and ids[0] == _id(tokenizer, "<|im_start|>")
        else:
            assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


@families
def test_plain_calls_add_bos_for_llama_and_mistral_not_qwen(family, loaded):
    _, tokenizer, _ = loaded(family)
    with_special = tokenizer("hello").input_ids
    without = tokenizer("hello", add_special_tokens=False).input_ids
    if REAL[family][2] is None:
        assert with_special == without
    else:
        assert with_special == [tokenizer.bos_token_id, *without]
    assert tokenizer.eos_token_id not in with_special  # no tokenizer adds EOS on its own
    assert tokenizer.decode(without) == "hello"


@families
def test_every_digit_is_one_token(family, loaded):
    folder, tokenizer, _ = loaded(family)
    space = _id(tokenizer, "Ġ")
    for digit in "0123456789":
        assert tokenizer(digit, add_special_tokens=False).input_ids == [_id(tokenizer, digit)]
        # as in the real tokenizers, the space before a digit is a token of its own
        assert tokenizer(f" {digit}", add_special_tokens=False).input_ids == [space, _id(tokenizer, digit)]
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(" 1 1 3 4 5 = 12 2023", add_special_tokens=False).input_ids)
    assert [t for t in tokens if t != "Ġ"] == ["1", "1", "3", "4", "5", "Ġ=", "1", "2", "2", "0", "2", "3"]
    assert not [t for t in tokenizer.get_vocab() if sum(c.isdigit() for c in t) > 1]


@families
def test_special_tokens_and_ids_as_the_real_tokenizer(family, loaded):
    folder, tokenizer, model = loaded(family)
    _, _, bos, eos, pad, unk, config_eos, _ = REAL[family]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (bos, eos, pad, unk)
    expected_eos = _id(tokenizer, config_eos) if isinstance(config_eos, str) else [_id(tokenizer, t) for t in config_eos]
    assert model.config.eos_token_id == expected_eos
    assert model.config.bos_token_id == _id(tokenizer, {"qwen2_5": "<|endoftext|>"}.get(family, bos))
    added = tokenizer.added_tokens_decoder
    ids = sorted(added)
    if family == "mistral_v03":  # SentencePiece layout: <unk> <s> </s> [INST] [/INST] ... first
        assert [str(added[i]) for i in ids[:5]] == ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"] and ids[0] == 0
    else:  # tiktoken / Qwen layout: after the BPE vocabulary
        assert ids[-1] == len(tokenizer) - 1
        first = {"llama3_1": "<|begin_of_text|>", "qwen2_5": "<|endoftext|>"}[family]
        assert str(added[ids[0]]) == first
    names = {"llama3_1": ["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                          "<|python_tag|>", "<|finetune_right_pad_id|>"],
             "mistral_v03": ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[TOOL_RESULTS]"],
             "qwen2_5": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]}[family]
    for name in names:  # unsplittable, special (skipped on decode)
        token_id = _id(tokenizer, name)
        assert added[token_id].special
        assert tokenizer(f"a{name}b", add_special_tokens=False).input_ids == [_id(tokenizer, "a"), token_id,
                                                                                _id(tokenizer, "b")]
    # no BPE merge builds an added token
    merges = json.loads((folder / "tokenizer.json").read_text())["model"]["merges"]
    built = {"".join(m.split(" ") if isinstance(m, str) else m) for m in merges}
    assert not built & {str(t) for t in added.values()}


@families
def test_generation_config_is_the_real_checkpoint_one(family, loaded):
    folder, tokenizer, model = loaded(family)
    from transformers import GenerationConfig

    saved = GenerationConfig.from_pretrained(folder)
    for key, value in REAL[family][7].items():
        if key.endswith("_token_id"):
            value = [_id(tokenizer, v) for v in value] if isinstance(value, list) else _id(tokenizer, value)
        assert getattr(saved, key) == value, key
        assert getattr(model.generation_config, key) == value, key
    assert bool(saved.do_sample) == (family != "mistral_v03")


def test_generation_config_overrides_and_extends(scaled_model):
    from transformers import GenerationConfig

    qwen = GenerationConfig.from_pretrained(scaled_model("qwen2_5", generation_config={"repetition_penalty": 1.3}))
    assert (qwen.repetition_penalty, qwen.temperature, qwen.top_k) == (1.3, 0.7, 20)
    mistral = GenerationConfig.from_pretrained(scaled_model("mistral_v03", generation_config={"max_new_tokens": 7}))
    assert (mistral.max_new_tokens, mistral.bos_token_id, mistral.eos_token_id) == (7, 1, 2)


@families
def test_same_seed_same_bytes(family, tmp_path):
    from rlhf_exp.scaled_models import build_scaled_model

    a = build_scaled_model(family, tmp_path / "a", seed=3)
    b = build_scaled_model(family, tmp_path / "b", seed=3)
    other = build_scaled_model(family, tmp_path / "c", seed=4)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)
    # another seed: other weights, the same tokenizer (a family's models are token-compatible)
    assert not filecmp.cmp(a / "model.safetensors", other / "model.safetensors", shallow=False)
    assert filecmp.cmp(a / "tokenizer.json", other / "tokenizer.json", shallow=False)


@families
def test_forward_pass_and_generate(family, loaded):
    import torch

    _, tokenizer, model = loaded(family)
    messages, _ = CONVERSATIONS["full"]
    ids = torch.tensor([chat_ids(tokenizer, messages)])
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(out.loss)
    torch.manual_seed(0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, pad_token_id=pad)
    assert generated.shape[1] <= ids.shape[1] + 3 and torch.equal(generated[:, : ids.shape[1]], ids)


def test_sizes_are_arguments(scaled_model):
    _, model = load(scaled_model("llama3_1", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                 intermediate_size=48, vocab_size=600))
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size) == (32, 1, 2, 1, 48, 600)


def test_cli_writes_a_loadable_folder(tmp_path, capsys):
    assert main(["--family", "qwen2_5", "--out", str(tmp_path / "q"), "--hidden-size", "32",
                 "--generation-config", '{"repetition_penalty": 1.3}']) == 0
    out = capsys.readouterr().out
    assert "Qwen2ForCausalLM" in out and "model=local model.path=" in out
    tokenizer, model = load(tmp_path / "q")
    assert model.config.hidden_size == 32 and model.generation_config.repetition_penalty == 1.3


def test_unknown_family_and_too_large_vocab_are_refused(tmp_path, capsys):
    from rlhf_exp.scaled_models import build_scaled_model

    with pytest.raises(ValueError, match="unknown family"):
        build_scaled_model("gpt2", tmp_path / "x")
    assert main(["--family", "llama3_1", "--out", str(tmp_path / "y"), "--vocab-size", "100000"]) == 2
    assert "corpus supports" in capsys.readouterr().err
