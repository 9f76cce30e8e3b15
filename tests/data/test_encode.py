"""PPO, the gold evaluation and the RM statistics tokenize exactly as TRL's trainers do, for each preset's
chat template on a scaled-down model of its architecture (tests/scaled_fixtures.py): the prompt ids PPO
generates from equal SFT's and DPO's prompt ids (one BOS), and the ids the reward model scores equal
RewardTrainer's, so the score is read at the position it was trained at."""

from __future__ import annotations

import pytest

from rlhf_exp.data.encode import prompt_ids, scored_ids, sft_ids
from rlhf_exp.data.synthetic import chat_answer, chat_prompt

FAMILIES = ("llama3_1", "mistral_v03", "qwen2_5")


def record(family: str):
    """A chat record with a system message, except for Mistral v0.3: its template writes the system
    message into the *last* user turn only, so a prompt rendered alone (system included) is no prefix
    of prompt + answer (system left out); TRL then trains on the common prefix and warns."""
    system = [] if family == "mistral_v03" else [{"role": "system", "content": "Answer with digits only."}]
    return [*system, *chat_prompt("3 1 4 1 5 =")], chat_answer(" 1 1 3 4 5"), chat_answer(" 1 1 3 5 4")


def trainer_datasets(folder, family, tmp_path):
    """TRL's own prepared datasets for one SFT example and one preference pair."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    prompt, chosen, rejected = record(family)
    common = dict(output_dir=str(tmp_path / "t"), report_to="none", use_cpu=True, max_length=None)
    lm = AutoModelForCausalLM.from_pretrained(folder)
    sft = SFTTrainer(model=lm, args=SFTConfig(**common), processing_class=tok,
                     train_dataset=Dataset.from_list([{"prompt": prompt, "completion": chosen}]))
    pairs = Dataset.from_list([{"prompt": prompt, "chosen": chosen, "rejected": rejected}])
    dpo = DPOTrainer(model=lm, args=DPOConfig(**common), processing_class=tok, train_dataset=pairs)
    rm = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    reward = RewardTrainer(model=rm, args=RewardConfig(**common), processing_class=tok, train_dataset=pairs)
    return tok, sft.train_dataset[0], dpo.train_dataset[0], reward.train_dataset[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_and_scored_ids_equal_trls_preprocessing(scaled_model, family, tmp_path):
    tok, sft, dpo, reward = trainer_datasets(scaled_model(family), family, tmp_path)
    prompt, chosen, rejected = record(family)
    ids = prompt_ids(tok, prompt)
    assert ids == dpo["prompt_ids"]  # DPO's prompt, and SFT's (the part without loss)
    assert sft_ids(tok, prompt, chosen) == sft["input_ids"]
    assert sft["input_ids"][:len(ids)] == ids and all(label == -100 for label in sft["labels"][:len(ids)])
    assert scored_ids(tok, prompt, chosen) == reward["chosen_ids"]
    assert scored_ids(tok, prompt, rejected) == reward["rejected_ids"]
    assert scored_ids(tok, prompt, "1 1 3 4 5") == reward["chosen_ids"]  # an answer's text, as PPO scores it
    if tok.bos_token_id is not None:  # Llama 3.1, Mistral: exactly one BOS, first
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    if family == "qwen2_5":  # the RM reads the turn's last token: the template's "\n" after <|im_end|>
        assert tok.decode(reward["chosen_ids"][-2:]) == "<|im_end|>\n"


def test_plain_strings_keep_the_tokenizers_special_tokens():
    """The embedded tokenizer (plain strings): BOS added once, EOS closes a scored answer."""
    from rlhf_exp.models import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    assert prompt_ids(tok, "3 1 4 1 5 =") == tok("3 1 4 1 5 =")["input_ids"]
    scored = scored_ids(tok, "3 1 4 1 5 =", " 1 1 3 4 5")
    assert scored[0] == tok.bos_token_id and scored[-1] == tok.eos_token_id and scored.count(tok.bos_token_id) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_a_cut_off_answer_is_scored_without_an_end_of_turn(scaled_model, family):
    """An answer that ran into max_new_tokens: the conversation up to its last token, no EOS or template
    tail, the same ids as the finished answer's up to that point."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(scaled_model(family))
    prompt = chat_prompt("3 1 4 1 5 =")
    finished, cut = scored_ids(tok, prompt, "1 1 3"), scored_ids(tok, prompt, "1 1 3", finished=False)
    assert finished[:len(cut)] == cut and len(finished) > len(cut)
    assert tok.eos_token_id not in cut[len(prompt_ids(tok, prompt)):]
    assert tok.decode(cut).endswith("1 1 3")
    plain = scored_ids(tok, "Sort 3 1:", " 1 3", finished=False)
    assert plain[-1] != tok.eos_token_id and scored_ids(tok, "Sort 3 1:", " 1 3")[-1] == tok.eos_token_id
