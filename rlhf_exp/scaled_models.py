"""Scaled-down copies of the real chat models, built locally with random weights.

Tests and CPU users need what a real checkpoint brings to the code that loads it, without the
download (no machine here reaches the hub) and without 8B parameters: the real architecture class
(``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``) with the real model's config
fields, the real chat template (our copies in ``templates/``), the real special tokens with their
BOS/EOS/pad conventions, and the real ``generation_config.json`` sampling defaults (which
``generate`` applies silently, so they change results). Only the sizes are small and the weights
random. The folder loads with ``AutoTokenizer``/``AutoModelForCausalLM.from_pretrained`` like a
hub snapshot:

    python -m rlhf_exp.scaled_models --family qwen2_5 --out /tmp/qwen_tiny
    python -m rlhf_exp model=local model.path=/tmp/qwen_tiny

The tokenizer is a byte-level BPE trained on the fly (``tokenizers``' BpeTrainer) on a corpus built
here: English-like sentences, Human/Assistant snippets, the embedded sorting task in plain and chat
form, and the family's chat-template text, with each family's real pre-tokenizer split rule. No
token holds two digits, so every digit is one token; as in all three real tokenizers, a space
before a digit is a token of its own ("1 2" is "1", "Ġ", "2"). The corpus does not depend on
``seed``: every seed of a family shares one tokenizer (models of a family are token-compatible);
``seed`` picks the weights only.

Known differences from the real checkpoints: the vocabulary is ~1k tokens, not 32k-152k, so the
ids differ (the layout does not: Mistral's specials come first, Llama's and Qwen's last); real
Llama 3 has tokens of up to three digits; Mistral v0.3's real tokenizer is SentencePiece BPE with
byte fallback ("▁hello", a prefix space on plain calls), here byte-level like the others
("hello"), so its tokenizer_config names the generic class rather than ``LlamaTokenizer``; the
hundreds of reserved tokens (Llama's <|reserved_special_token_N|> past 2, Mistral's [control_N])
are left out; weights are float32 (the real ones bfloat16).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
FAMILIES = ("llama3_1", "mistral_v03", "qwen2_5")
DIGITS = "0123456789"
# pre-tokenizer split rules, as the real tokenizer.json files have them: Llama 3 (tiktoken's, numbers in
# runs of up to 3 digits) and Qwen2 (single digits; used for Mistral too, whose SentencePiece splits
# digits one by one). Both keep a space apart from the digit after it.
_WORDS_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+"
_REST_SPLIT = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = _WORDS_SPLIT + r"|\p{N}{1,3}" + _REST_SPLIT
QWEN2_SPLIT = _WORDS_SPLIT + r"|\p{N}" + _REST_SPLIT


@dataclass(frozen=True)
class Family:
    """What one real checkpoint ships, with token ids given as token strings (mapped at build time)."""

    name: str
    scales_down: str  # the hub checkpoint this family imitates
    config_class: str
    architecture: str
    added_tokens: tuple[tuple[str, bool], ...]  # (content, special) in id order
    added_first: bool  # Mistral: added tokens take ids 0..k-1; Llama, Qwen: they follow the BPE vocabulary
    bos: str | None
    eos: str
    pad: str | None
    unk: str | None
    config: dict[str, Any]  # real config.json fields; *_token_id values are token strings
    generation: dict[str, Any]  # real generation_config.json; *_token_id values are token strings
    split: str  # the pre-tokenizer's split rule
    tokenizer_class: str  # as tokenizer_config.json names it
    tokenizer_config: dict[str, Any] = field(default_factory=dict)  # further real tokenizer_config.json fields
    nfc: bool = False  # Qwen2's tokenizer normalises to NFC


_LLAMA_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")
_MISTRAL_SPECIALS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                     "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]")
_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
# Qwen2.5 adds these as atomic tokens that are not special (skip_special_tokens keeps them)
_QWEN_PLAIN_ADDED = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                     "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")

SPECS: dict[str, Family] = {
    "llama3_1": Family(
        name="llama3_1",
        scales_down="meta-llama/Llama-3.1-8B-Instruct",
        config_class="LlamaConfig",
        architecture="LlamaForCausalLM",
        added_tokens=tuple((t, True) for t in _LLAMA_SPECIALS),
        added_first=False,
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",  # the Instruct tokenizer's eos; the base model's is <|end_of_text|>
        pad=None,
        unk=None,
        config={"attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "initializer_range": 0.02,
                "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0},
                "bos_token_id": "<|begin_of_text|>",
                "eos_token_id": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]},
        generation={"bos_token_id": "<|begin_of_text|>", "do_sample": True,
                    "eos_token_id": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
                    "temperature": 0.6, "top_p": 0.9},
        split=LLAMA3_SPLIT,
        tokenizer_class="PreTrainedTokenizerFast",
        # the real file also says clean_up_tokenization_spaces=true, which transformers 5 ignores for BPE
        # (with a warning on every load): left out
        tokenizer_config={"model_input_names": ["input_ids", "attention_mask"]},
    ),
    "mistral_v03": Family(
        name="mistral_v03",
        scales_down="mistralai/Mistral-7B-Instruct-v0.3",
        config_class="MistralConfig",
        architecture="MistralForCausalLM",
        added_tokens=tuple((t, True) for t in _MISTRAL_SPECIALS),
        added_first=True,
        bos="<s>",
        eos="</s>",
        pad=None,
        unk="<unk>",
        config={"hidden_act": "silu", "initializer_range": 0.02, "rms_norm_eps": 1e-5,
                "tie_word_embeddings": False, "sliding_window": None,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
                "bos_token_id": "<s>", "eos_token_id": "</s>"},
        generation={"bos_token_id": "<s>", "eos_token_id": "</s>"},
        split=QWEN2_SPLIT,
        # the real one says LlamaTokenizer, which transformers would rebuild as SentencePiece
        tokenizer_class="PreTrainedTokenizerFast",
        tokenizer_config={"add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
                          "use_default_system_prompt": False},
    ),
    "qwen2_5": Family(
        name="qwen2_5",
        scales_down="Qwen/Qwen2.5-7B-Instruct",
        config_class="Qwen2Config",
        architecture="Qwen2ForCausalLM",  # q/k/v projections carry a bias: the class has it
        added_tokens=tuple((t, True) for t in _QWEN_SPECIALS) + tuple((t, False) for t in _QWEN_PLAIN_ADDED),
        added_first=False,
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        unk=None,
        # sliding window off, as in the real config.json (transformers 5 then stores sliding_window as null)
        config={"hidden_act": "silu", "initializer_range": 0.02, "rms_norm_eps": 1e-6,
                "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 131072,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
                "bos_token_id": "<|endoftext|>", "eos_token_id": "<|im_end|>"},
        generation={"bos_token_id": "<|endoftext|>", "pad_token_id": "<|endoftext|>", "do_sample": True,
                    "eos_token_id": ["<|im_end|>", "<|endoftext|>"], "repetition_penalty": 1.05,
                    "temperature": 0.7, "top_p": 0.8, "top_k": 20},
        split=QWEN2_SPLIT,
        # transformers 5 loads any qwen2 checkpoint with this class, rebuilt from vocab and merges with
        # the NFC + QWEN2_SPLIT + ByteLevel pipeline that tokenizer.json holds here too
        tokenizer_class="Qwen2Tokenizer",
        tokenizer_config={"add_prefix_space": False, "clean_up_tokenization_spaces": False, "errors": "replace",
                          "split_special_tokens": False, "additional_special_tokens": list(_QWEN_SPECIALS[1:])},
        nfc=True,
    ),
}

# -- the training corpus -----------------------------------------------------------------------------

_WORDS = """
the a an this that these those some every each other any no one two three many few more most all
i you he she it we they me him her us them my your his its our their who what which where when why how
is are was were be been being have has had do does did can could will would should may might must
make made take took give gave find found think thought know knew see saw look want use work call try
ask need feel become leave put mean keep let begin seem help talk turn start show hear play run move
live believe hold bring happen write provide sit stand lose pay meet include continue set learn change
lead understand watch follow stop create speak read allow add spend grow open walk win offer remember
love consider appear buy wait serve die send expect build stay fall cut reach kill remain suggest raise
pass sell require report decide pull sort order list answer question number digit small large first
last long great little own old right big high different next early young important few public bad same
able time person year way day thing man world life hand part child eye woman place week case point
government company group problem fact water room mother area money story month lot book job word
business issue side kind head house service friend father power hour game line end member law car city
community name president team minute idea kid body information back parent face others level office
door health art war history party result morning reason research girl guy moment air teacher force
education good new well very also just only now then here there not but and or if because so than
with from into about over after before between under again still even quickly slowly carefully please
thanks sure yes maybe simple clear helpful honest happy sorry true false example step model data
""".split()

_QUESTIONS = ("Can you help me {v} the {n}?", "What is the best way to {v} a {n}?", "Why does the {n} {v}?",
              "How do I {v} my {n}?", "Could you explain the {n} to me?", "Is it possible to {v} this {n}?")
_ANSWERS = ("Sure, here is one way to {v} the {n}.", "Yes. First {v} the {n}, then check the result.",
            "I think the {n} will {v} if you wait a little.", "Sorry, I am not sure how to {v} that {n}.",
            "The {n} is simple: you {v} it step by step.", "It depends on the {n}, but most people {v} it.")
_SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are a careful assistant. Answer with digits only.", "")
_VERBS = ("sort", "read", "write", "build", "move", "open", "change", "find", "explain", "keep", "order", "check")
_NOUNS = ("list", "number", "story", "book", "answer", "question", "room", "problem", "team", "idea", "model", "door")


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 14))]
    if rng.random() < 0.3:
        words[rng.randrange(2, len(words))] += ","
    return words[0].capitalize() + " " + " ".join(words[1:]) + rng.choice(".?!.")


def _sort_pair(rng: random.Random) -> tuple[list[int], list[int]]:
    digits = [rng.randrange(10) for _ in range(rng.randint(3, 8))]
    return digits, sorted(digits)


def _template_literals(template: str) -> list[str]:
    """The quoted strings of a chat template: the fixed text it writes (headers, tool prompts)."""
    out = []
    for quoted in re.findall(r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'', template):
        text = quoted[1:-1].replace("\\n", "\n").replace('\\"', '"').replace("\\'", "'")
        if text.strip():
            out.append(text)
    return out


def _render(template: str, spec: Family, messages: list[dict], add_generation_prompt: bool) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    tokens = {"bos_token": spec.bos or "", "eos_token": spec.eos, "pad_token": spec.pad or ""}
    return render_jinja_template([messages], chat_template=template, add_generation_prompt=add_generation_prompt,
                                 **tokens)[0][0]


def training_corpus(family: str) -> list[str]:
    """The text the family's BPE is trained on, with every added token cut out, so no merge can build
    one. Fixed (seed-independent) so that every model of a family shares one tokenizer."""
    spec = SPECS[family]
    template = chat_template(family)
    rng = random.Random(f"rlhf_exp.scaled_models.corpus:{family}")
    lines = [_sentence(rng) for _ in range(1500)]
    for _ in range(300):
        v, n = rng.choice(_VERBS), rng.choice(_NOUNS)
        lines.append(f"\n\nHuman: {rng.choice(_QUESTIONS).format(v=v, n=n)}\n\nAssistant: "
                     f"{rng.choice(_ANSWERS).format(v=v, n=n)} {_sentence(rng)}")
    for i in range(600):
        digits, answer = _sort_pair(rng)
        user = "Sort these digits: " + " ".join(map(str, digits))
        reply = " ".join(map(str, answer))
        lines += [user, reply, " ".join(map(str, digits)) + " =", "".join(f" {d}" for d in answer)]
        if i < 150:  # the same task through the chat template, with and without a system prompt
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
            if i % 2:
                messages.insert(0, {"role": "system", "content": rng.choice(_SYSTEM_PROMPTS) or _sentence(rng)})
            lines.append(_render(template, spec, messages, add_generation_prompt=False))
            lines.append(_render(template, spec, messages[:-1], add_generation_prompt=True))
    lines += _template_literals(template) * 20
    added = "|".join(re.escape(t) for t, _ in sorted(spec.added_tokens, key=lambda x: -len(x[0])))
    return [piece for line in lines for piece in re.split(added, line) if piece]


# -- tokenizer -----------------------------------------------------------------------------------------


def chat_template(family: str) -> str:
    """The family's real chat template, from the project's own copy."""
    return (TEMPLATES_DIR / f"{family}.jinja").read_text(encoding="utf-8")


def _pre_tokenizer(spec: Family):
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(spec.split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _bpe_vocab(spec: Family, size: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Trains a byte-level BPE and keeps its first merges up to ``size`` tokens, leaving out any that
    would join two digits (and what builds on them): digits stay one token each."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    budget = size - len(alphabet)
    if budget < 0:
        raise ValueError(f"vocab_size too small: {spec.name} needs at least {len(alphabet) + len(spec.added_tokens)}")
    core = Tokenizer(models.BPE())
    if spec.nfc:
        core.normalizer = normalizers.NFC()
    core.pre_tokenizer = _pre_tokenizer(spec)
    trainer = trainers.BpeTrainer(vocab_size=size + 256, min_frequency=2, initial_alphabet=alphabet,
                                  show_progress=False)
    core.train_from_iterator(training_corpus(spec.name), trainer)
    learned = json.loads(core.to_str())["model"]["merges"]
    known, merges = set(alphabet), []
    for merge in learned:
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        if len(merges) < budget and a in known and b in known and sum(c in DIGITS for c in a + b) <= 1:
            merges.append((a, b))
            known.add(a + b)
    if len(merges) < budget:
        raise ValueError(f"vocab_size={size + len(spec.added_tokens)} is more than the {spec.name} corpus "
                         f"supports ({len(alphabet) + len(merges) + len(spec.added_tokens)} tokens at most)")
    return alphabet + [a + b for a, b in merges], merges


def build_tokenizer(family: str, vocab_size: int):
    """The family's ``tokenizers.Tokenizer``: byte-level BPE plus the real added tokens, in the real
    id layout (Mistral's first, Llama's and Qwen's after the BPE vocabulary), and the real rule for
    BOS on plain calls (Llama, Mistral: added by the post-processor; Qwen: none)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    spec = SPECS[family]
    n_added = len(spec.added_tokens)
    bpe_tokens, merges = _bpe_vocab(spec, vocab_size - n_added)
    offset = n_added if spec.added_first else 0
    vocab = {tok: offset + i for i, tok in enumerate(bpe_tokens)}
    if spec.added_first:  # SentencePiece-converted vocabularies hold their specials in the model vocab
        vocab.update({tok: i for i, (tok, _) in enumerate(spec.added_tokens)})
    # Llama 3's BPE looks a whole word up before merging (ignore_merges); older ones (Qwen2) do not
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=family == "llama3_1"))
    if spec.nfc:
        core.normalizer = normalizers.NFC()
    core.pre_tokenizer = _pre_tokenizer(spec)
    core.decoder = decoders.ByteLevel()
    for content, special in spec.added_tokens:  # one at a time: ids follow the real order
        token = AddedToken(content, special=special, normalized=False)
        core.add_special_tokens([token]) if special else core.add_tokens([token])
    ids = [core.token_to_id(content) for content, _ in spec.added_tokens]
    first = 0 if spec.added_first else len(bpe_tokens)
    assert ids == list(range(first, first + n_added)) and core.get_vocab_size() == vocab_size, ids
    if spec.bos is not None:
        bos = (spec.bos, core.token_to_id(spec.bos))
        template = processors.TemplateProcessing(single=f"{bos[0]}:0 $A:0", pair=f"{bos[0]}:0 $A:0 {bos[0]}:1 $B:1",
                                                 special_tokens=[bos])
        core.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), template])
    else:
        core.post_processor = processors.ByteLevel(trim_offsets=False)
    return core


def _tokenizer_config(spec: Family, core, model_max_length: int) -> dict[str, Any]:
    added = {
        str(core.token_to_id(content)): {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                                         "single_word": False, "special": special}
        for content, special in spec.added_tokens
    }
    return {
        "added_tokens_decoder": added,
        **spec.tokenizer_config,
        "bos_token": spec.bos,
        "chat_template": chat_template(spec.name),
        "eos_token": spec.eos,
        "model_max_length": model_max_length,
        "pad_token": spec.pad,
        "tokenizer_class": spec.tokenizer_class,
        "unk_token": spec.unk,
    }


# -- model ---------------------------------------------------------------------------------------------


def _ids(value: Any, core) -> Any:
    if isinstance(value, list):
        return [core.token_to_id(v) for v in value]
    return core.token_to_id(value)


def build_scaled_model(family: str, out_dir: Path, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                       num_kv_heads: int = 2, intermediate_size: int = 128, max_position_embeddings: int = 512,
                       vocab_size: int = 1024, seed: int = 0, generation_config: dict | None = None) -> Path:
    """Writes ``family``'s scaled-down checkpoint (random weights from ``seed``) to ``out_dir``.

    The folder holds config.json, model.safetensors (float32), generation_config.json (the real
    checkpoint's, updated with ``generation_config``), tokenizer.json, tokenizer_config.json (with the
    chat template) and scaled_model.json (what was built, so nobody mistakes it for real weights).
    Same arguments, same bytes.
    """
    if family not in SPECS:
        raise ValueError(f"unknown family {family!r}: choose one of {', '.join(FAMILIES)}")
    import torch
    import transformers

    spec = SPECS[family]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    core = build_tokenizer(family, vocab_size)
    core.save(str(out_dir / "tokenizer.json"))
    tok_cfg = _tokenizer_config(spec, core, model_max_length=max_position_embeddings)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")

    fields = {k: _ids(v, core) if k.endswith("_token_id") else v for k, v in spec.config.items()}
    if fields["rope_parameters"]["rope_type"] == "llama3":
        # Llama 3.1 was trained at 8192 positions and extended 16x (to 131072): keep that ratio
        fields["rope_parameters"] = {**fields["rope_parameters"],
                                     "original_max_position_embeddings": max(1, max_position_embeddings // 16)}
    if family == "qwen2_5":
        fields["max_window_layers"] = num_layers  # 28 of 28 layers in the real model
    config = getattr(transformers, spec.config_class)(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, dtype="float32", **fields,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        model = getattr(transformers, spec.architecture)(config)
    generation = {k: _ids(v, core) if k.endswith("_token_id") else v for k, v in spec.generation.items()}
    model.generation_config = transformers.GenerationConfig(**{**generation, **(generation_config or {})})
    model.save_pretrained(out_dir)

    info = {
        "built_by": "rlhf_exp.scaled_models", "family": family, "scales_down": spec.scales_down,
        "weights": "random", "seed": seed, "architecture": spec.architecture,
        "num_parameters": sum(p.numel() for p in model.parameters()), "vocab_size": vocab_size,
        "hidden_size": hidden_size, "num_layers": num_layers, "num_heads": num_heads, "num_kv_heads": num_kv_heads,
        "intermediate_size": intermediate_size, "max_position_embeddings": max_position_embeddings,
        "special_tokens": {name: (tok, core.token_to_id(tok)) if tok else None
                           for name, tok in (("bos", spec.bos), ("eos", spec.eos), ("pad", spec.pad))},
        "generation_config_overrides": generation_config or {},
    }
    (out_dir / "scaled_model.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_exp.scaled_models",
                                     description="Write a scaled-down copy of a real chat model (random weights).")
    parser.add_argument("--family", required=True, choices=FAMILIES)
    parser.add_argument("--out", required=True, type=Path, help="folder to write (created if missing)")
    for flag, default in (("hidden-size", 64), ("num-layers", 2), ("num-heads", 4), ("num-kv-heads", 2),
                          ("intermediate-size", 128), ("max-position-embeddings", 512), ("vocab-size", 1024),
                          ("seed", 0)):
        parser.add_argument(f"--{flag}", type=int, default=default)
    parser.add_argument("--generation-config", type=json.loads, default=None, metavar="JSON",
                        help='overrides for generation_config.json, e.g. \'{"repetition_penalty": 1.3}\'')
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar for writing one small file is noise here
    try:
        out = build_scaled_model(args.family, args.out, hidden_size=args.hidden_size, num_layers=args.num_layers,
                                 num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                                 intermediate_size=args.intermediate_size,
                                 max_position_embeddings=args.max_position_embeddings, vocab_size=args.vocab_size,
                                 seed=args.seed, generation_config=args.generation_config)
    except ValueError as exc:
        print(f"rlhf_exp.scaled_models: error: {exc}", file=sys.stderr)
        return 2
    info = json.loads((out / "scaled_model.json").read_text())
    special = ", ".join(f"{k} {v[0]} ({v[1]})" if v else f"{k} none" for k, v in info["special_tokens"].items())
    print(f"wrote {out.resolve()}: {info['architecture']} scaled down from {info['scales_down']}, random weights "
          f"(seed {info['seed']})")
    print(f"  parameters  {info['num_parameters']:,} (hidden {info['hidden_size']}, {info['num_layers']} layers, "
          f"{info['num_heads']} heads / {info['num_kv_heads']} kv heads, MLP {info['intermediate_size']})")
    print(f"  tokenizer   byte-level BPE, {info['vocab_size']} tokens; {special}; chat template {args.family}.jinja")
    print(f"  files       {', '.join(sorted(p.name for p in out.iterdir() if p.is_file()))}")
    print(f"try: python -m rlhf_exp model=local model.path={out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
