"""The README's main command (SFT -> RM -> PPO -> DPO on the embedded task) written as plain PyTorch loops in one
process: the floor that ``python -m rlhf_exp pipeline=rlhf`` is compared with (benchmarks/chain.py).

    python benchmarks/floor_chain.py            # prints one JSON line with each phase's numbers and seconds

The line's "seconds" holds each phase's wall time; "cpu" each phase's CPU seconds, its gold evaluations' share
("<phase>_gold"), the set-up ("setup": composing the config, building the data and the model) and the imports
before main() ("imports").

The same work as the main command, phase by phase, with the same inputs (the embedded task's data from
rlhf_exp.data.synthetic, the tiny Llama from rlhf_exp.models, the same seed) and settings (the tiny recipes):

- SFT: 10 epochs of the 4,096 demonstrations in batches of 64 (shuffled each epoch), AdamW lr 3e-3 constant,
  gradient clipping 1.0, loss on the answer tokens; the eval loss on the 256 held-out demonstrations after each
  epoch, the best epoch's weights kept (early stopping after 2 epochs without improvement); greedy gold on the
  500 held-out prompts before and after.
- RM: the SFT weights with a new scalar head (embeddings frozen), 3 epochs of the 4,000 preference pairs in
  batches of 64, Bradley-Terry loss, AdamW lr 1e-3 constant; held-out pairwise accuracy on the 500 eval pairs
  after each epoch, the best kept; the mean/std of the held-out scores for PPO.
- PPO: 40 steps of 128 sampled answers (at most 8 new tokens, temperature 1), policy from SFT, a frozen
  reference, the frozen reward model (scores normalised by its stats, clipped at 10), a critic initialised from
  the reward model; per-token KL penalty (k1, adaptive controller from 0.05 towards 1 nat, horizon 1000), GAE
  (gamma 1, lambda 0.95), 2 epochs of 2 mini-batches, clipped policy and value losses (0.2, 0.2, vf 0.1), AdamW
  lr 1e-4 for both; held-out greedy evaluation (gold, RM score, KL) on 64 prompts every 10 steps; gold before and
  after.
- DPO: from SFT with a frozen reference, 2 epochs of the pairs in batches of 64, sigmoid loss beta 0.1, AdamW lr
  5e-4 constant; the eval loss on the held-out pairs every 32 steps; gold before and after.

The PPO math uses rlhf_exp.ppo.core (the functions, tested against hand-computed values), as a hand-written loop
would; no trainer class, accelerate, TRL, Hydra or run folder. Not reproduced (the framework's own work, counted in
the ratio): data checks, previews, manifests, metrics files, checkpoints, the health monitor, DPO's generation
evaluations, four processes' start-up.
"""

from __future__ import annotations

import copy
import json
import time

import torch
import torch.nn.functional as F

LR = {"sft": 3e-3, "rm": 1e-3, "ppo": 1e-4, "dpo": 5e-4}


def setup():
    from omegaconf import OmegaConf

    from rlhf_exp.cli import compose
    from rlhf_exp.data.synthetic import build_task_data
    from rlhf_exp.models import build_tiny_model, build_tiny_tokenizer

    cfg = OmegaConf.to_object(compose([]))
    torch.manual_seed(cfg.seed)
    tokenizer = build_tiny_tokenizer()
    return cfg, build_task_data(cfg.data.synthetic, cfg.data.seed), tokenizer, build_tiny_model(cfg.model, tokenizer)


def pad_right(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    return ids, torch.arange(width) < torch.tensor([len(r) for r in rows])[:, None]


CPU: dict[str, float] = {}  # CPU seconds by part, for the printout
PHASE = ["setup"]  # the phase running now: its gold evaluations are counted under "<phase>_gold"


def gold(model, tokenizer, prompts) -> float:
    from rlhf_exp.evaluation import gold_score

    start = time.process_time()
    try:
        return gold_score(model, tokenizer, prompts, max_new_tokens=8, batch_size=256)
    finally:
        key = f"{PHASE[0]}_gold"
        CPU[key] = CPU.get(key, 0.0) + time.process_time() - start


def opt(params, lr):
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr)


def step(optimizer, params, loss) -> None:
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------------ SFT
def sft(model, tokenizer, data) -> dict:
    pad = tokenizer.pad_token_id

    def encode(rows):
        full = [tokenizer(r["prompt"] + r["completion"])["input_ids"] + [tokenizer.eos_token_id] for r in rows]
        n_prompt = [len(tokenizer(r["prompt"])["input_ids"]) for r in rows]
        ids, mask = pad_right(full, pad)
        labels = ids.masked_fill(~mask, -100)
        for i, n in enumerate(n_prompt):
            labels[i, :n] = -100
        return ids, mask, labels

    train, held = encode(data["sft_train"]), encode(data["sft_eval"])
    optimizer = opt(model.parameters(), LR["sft"])
    best, best_loss, bad = None, float("inf"), 0
    for _ in range(10):
        model.train()
        for idx in torch.randperm(len(train[0])).split(64):
            step(optimizer, list(model.parameters()), model(input_ids=train[0][idx], attention_mask=train[1][idx],
                                                            labels=train[2][idx]).loss)
        model.eval()
        with torch.no_grad():
            loss = model(input_ids=held[0], attention_mask=held[1], labels=held[2]).loss.item()
        if loss < best_loss:
            best, best_loss, bad = copy.deepcopy(model.state_dict()), loss, 0
        else:
            bad += 1
            if bad >= 2:
                break
    model.load_state_dict(best)
    return {"eval_loss": best_loss}


# ------------------------------------------------------------------------------------------------ RM
def pair_ids(tokenizer, pairs):
    eos = [tokenizer.eos_token_id]
    chosen = [tokenizer(p.prompt + p.chosen)["input_ids"] + eos for p in pairs]
    rejected = [tokenizer(p.prompt + p.rejected)["input_ids"] + eos for p in pairs]
    return chosen, rejected


def scores(model, rows, pad) -> torch.Tensor:
    ids, mask = pad_right(rows, pad)
    return model(input_ids=ids, attention_mask=mask.long()).logits[:, 0]


def reward_model(sft_model, tokenizer, data) -> tuple[object, dict]:
    from transformers import LlamaForSequenceClassification

    config = copy.deepcopy(sft_model.config)
    config.num_labels, config.pad_token_id = 1, tokenizer.pad_token_id
    model = LlamaForSequenceClassification(config)
    model.model.load_state_dict(sft_model.model.state_dict())
    model.get_input_embeddings().requires_grad_(False)
    pad = tokenizer.pad_token_id
    chosen, rejected = pair_ids(tokenizer, data["pref_train"])
    held_c, held_r = pair_ids(tokenizer, data["pref_eval"])
    optimizer = opt(model.parameters(), LR["rm"])
    best, best_acc = None, -1.0
    for _ in range(3):
        model.train()
        for idx in torch.randperm(len(chosen)).split(64):
            margin = scores(model, [chosen[i] for i in idx], pad) - scores(model, [rejected[i] for i in idx], pad)
            loss = -F.logsigmoid(margin).mean()
            step(optimizer, [p for p in model.parameters() if p.requires_grad], loss)
        model.eval()
        with torch.no_grad():
            c, r = scores(model, held_c, pad), scores(model, held_r, pad)
        acc = (c > r).float().mean().item()
        if acc > best_acc:
            best, best_acc, stats = copy.deepcopy(model.state_dict()), acc, torch.cat([c, r])
    model.load_state_dict(best)
    return model, {"eval_accuracy": best_acc, "mean": stats.mean().item(), "std": stats.std().item()}


# ------------------------------------------------------------------------------------------------ PPO
def token_logprobs(model, ids, attn, prompt_len):
    from rlhf_exp.data.encode import position_ids

    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn)).logits[:, prompt_len - 1:-1]
    logp = torch.log_softmax(logits.float(), -1)
    return torch.gather(logp, 2, ids[:, prompt_len:, None])[..., 0], -(logp.exp() * logp).sum(-1)


def ppo(policy, rm, stats, tokenizer, data) -> dict:
    from transformers import LlamaForTokenClassification

    from rlhf_exp.data.encode import pad as pad_left
    from rlhf_exp.data.encode import position_ids
    from rlhf_exp.data.synthetic import gold_reward
    from rlhf_exp.evaluation import own_generation_config
    from rlhf_exp.ppo import core

    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    rm.eval().requires_grad_(False)
    critic = LlamaForTokenClassification(rm.config)
    critic.model.load_state_dict(rm.model.state_dict())
    with torch.no_grad():  # the reward head's weights, a zero bias (the token classifier's head has one)
        critic.score.weight.copy_(rm.score.weight)
        critic.score.bias.zero_()
    for m in (policy, critic):
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
    prompts = list(dict.fromkeys(p.prompt for p in data["pref_train"]))
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    held = list(data["eval_prompts"])[:64]
    held_ids = [tokenizer(p)["input_ids"] for p in held]
    p_opt, c_opt = opt(policy.parameters(), LR["ppo"]), opt(critic.parameters(), LR["ppo"])
    kl_ctl = core.kl_controller("adaptive", 0.05, 1.0, 1000)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    generator = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def roll(ids_list, sample: bool):
        ids, attn = pad_left(ids_list, pad, side="left")
        policy.eval()
        # sampling from the full distribution: top-k 50 cuts nothing from a 15-token vocabulary
        with own_generation_config(policy, tokenizer, do_sample=sample, max_new_tokens=8, temperature=1.0) as config:
            out = policy.generate(input_ids=ids, attention_mask=attn, generation_config=config)
        n = ids.shape[1]
        mask = core.response_mask(out[:, n:], eos)
        full = torch.cat([attn, mask.long()], 1)
        logprobs, entropy = token_logprobs(policy, out, full, n)
        ref_logprobs, _ = token_logprobs(reference, out, full, n)
        texts = tokenizer.batch_decode(out[:, n:] * mask.long() + pad * (1 - mask.long()), skip_special_tokens=True)
        rows = [p + [t for t, m in zip(r.tolist(), mm.tolist()) if m] for p, r, mm in zip(ids_list, out[:, n:], mask)]
        raw = scores(rm, rows, pad)
        return out, full, n, mask, logprobs, ref_logprobs, raw, texts, entropy

    evals = []
    for it in range(1, 41):
        pick = torch.randint(len(prompts), (128,), generator=generator).tolist()
        out, attn, n, mask, old_lp, ref_lp, raw, texts, _ = roll([prompt_ids[i] for i in pick], sample=True)
        with torch.no_grad():
            values = critic(input_ids=out, attention_mask=attn, position_ids=position_ids(attn)).logits[:, n - 1:-1, 0]
        score = ((raw - stats["mean"]) / max(stats["std"], 1e-6)).clamp(-10, 10)
        kl = core.kl_per_token(old_lp, ref_lp, "k1") * mask
        rewards = core.shaped_rewards(score, kl, kl_ctl.value, mask)
        adv, returns = core.gae(rewards, values, mask, 1.0, 0.95)
        adv = core.masked_whiten(adv, mask)
        policy.train()
        critic.train()
        for _ in range(2):
            for idx in torch.randperm(128, generator=generator).chunk(2):
                tokens = mask[idx].sum().clamp(min=1)
                lp, _ = token_logprobs(policy, out[idx], attn[idx], n)
                v = critic(input_ids=out[idx], attention_mask=attn[idx],
                           position_ids=position_ids(attn[idx])).logits[:, n - 1:-1, 0]
                pl = core.clipped_policy_loss(lp, old_lp[idx], adv[idx], mask[idx], 0.2, tokens)
                vl = core.clipped_value_loss(v, values[idx], returns[idx], mask[idx], 0.2, tokens)
                (pl.loss + 0.1 * vl).backward()
                for model, o in ((policy, p_opt), (critic, c_opt)):
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    o.step()
                    o.zero_grad(set_to_none=True)
        kl_ctl.update(kl.sum(1).mean().item(), n_steps=128)
        _ = [gold_reward(p, t) for p, t in zip([prompts[i] for i in pick], texts)]  # the rollouts' gold, as logged
        if it % 10 == 0:
            _, _, _, hmask, hlp, hrlp, hraw, htexts, _ = roll(held_ids, sample=False)
            evals.append({"step": it, "gold": sum(gold_reward(p, t) for p, t in zip(held, htexts)) / len(held),
                          "rm_score": hraw.mean().item(), "kl": ((hlp - hrlp) * hmask).sum(1).mean().item()})
    return {"kl": kl.sum(1).mean().item(), "evals": evals}


# ------------------------------------------------------------------------------------------------ DPO
def dpo(policy, tokenizer, data) -> dict:
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    pad = tokenizer.pad_token_id

    def encode(pairs):
        out = []
        for p in pairs:
            n = len(tokenizer(p.prompt)["input_ids"])
            for answer in (p.chosen, p.rejected):
                out.append((tokenizer(p.prompt + answer)["input_ids"] + [tokenizer.eos_token_id], n))
        return out

    def seq_logps(model, rows):
        ids, mask = pad_right([r for r, _ in rows], pad)
        logits = model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1].float()
        lp = torch.gather(torch.log_softmax(logits, -1), 2, ids[:, 1:, None])[..., 0]
        keep = mask[:, 1:].clone()
        for i, (_, n) in enumerate(rows):
            keep[i, :n - 1] = False
        return (lp * keep).sum(1)

    def loss_of(rows):
        pol = seq_logps(policy, rows)
        with torch.no_grad():
            ref = seq_logps(reference, rows)
        logits = 0.1 * ((pol[0::2] - ref[0::2]) - (pol[1::2] - ref[1::2]))
        return -F.logsigmoid(logits).mean()

    train, held = encode(data["pref_train"]), encode(data["pref_eval"])
    optimizer = opt(policy.parameters(), LR["dpo"])
    steps, losses = 0, []
    for _ in range(2):
        policy.train()
        for idx in torch.randperm(len(train) // 2).split(64):
            rows = [train[2 * i + k] for i in idx.tolist() for k in (0, 1)]
            step(optimizer, list(policy.parameters()), loss_of(rows))
            steps += 1
            if steps % 32 == 0:
                policy.eval()
                with torch.no_grad():
                    losses.append(sum(loss_of(held[i:i + 512]).item() for i in range(0, len(held), 512))
                                  / -(-len(held) // 512))
                policy.train()
    return {"steps": steps, "eval_losses": losses}


def main() -> None:
    CPU["imports"] = time.process_time()
    torch.set_num_threads(1)
    times, out = {}, {}
    start = time.perf_counter()

    def begin(phase: str) -> tuple[float, float]:
        PHASE[0] = phase
        return time.perf_counter(), time.process_time()

    def end(phase: str, t: tuple[float, float]) -> None:
        times[phase] = time.perf_counter() - t[0]
        CPU[phase] = time.process_time() - t[1]

    t = begin("setup")
    cfg, data, tokenizer, model = setup()
    prompts = list(data["eval_prompts"])
    end("setup", t)
    t = begin("sft")
    out["sft"] = {"gold_initial": gold(model, tokenizer, prompts), **sft(model, tokenizer, data)}
    out["sft"]["gold"] = gold(model, tokenizer, prompts)
    end("sft", t)
    t = begin("rm")
    rm, stats = reward_model(model, tokenizer, data)
    out["rm"] = stats
    end("rm", t)
    t = begin("ppo")
    policy = copy.deepcopy(model)
    gold_before = gold(policy, tokenizer, prompts)
    out["ppo"] = {"gold_initial": gold_before, **ppo(policy, rm, stats, tokenizer, data)}
    out["ppo"]["gold"] = gold(policy, tokenizer, prompts)
    end("ppo", t)
    t = begin("dpo")
    policy = copy.deepcopy(model)
    out["dpo"] = {"gold_initial": gold(policy, tokenizer, prompts), **dpo(policy, tokenizer, data)}
    out["dpo"]["gold"] = gold(policy, tokenizer, prompts)
    end("dpo", t)
    out["seconds"] = {k: round(v, 2) for k, v in times.items()} | {"total": round(time.perf_counter() - start, 2)}
    out["cpu"] = {k: round(v, 2) for k, v in CPU.items()} | {"total": round(time.process_time(), 2)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
