"""PPO's math as small pure functions (tensors in, tensors out), each unit-tested by hand.

Shapes: ``[batch, response_len]`` per-token tensors with a float ``mask`` (1 = a real response token,
0 = padding or a token after the first EOS). The trainer loop (issue #3) only orchestrates these.

References: Ziegler et al. 2019 (adaptive KL controller), Schulman et al. 2017 (clipped surrogate),
Schulman et al. 2016 (GAE), Schulman 2020 "Approximating KL divergence" (k1/k3 estimators).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, total: torch.Tensor | float | None = None) -> torch.Tensor:
    """Mean of ``x`` over the mask's tokens; ``total`` replaces the token count as the denominator (a
    worker's share of a mini-batch split over processes divides by the whole mini-batch's count)."""
    return (x * mask).sum() / (mask.sum().clamp(min=1) if total is None else total)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def response_mask(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 up to and including the first EOS of each row, 0 after it. A padding token sampled inside an
    answer stays in: generate() attended to it, so the log-probabilities must too (padding only ever
    follows an EOS: generate pads finished rows, and processes pad only outputs whose rows all ended)."""
    is_eos = tokens == eos_id
    # count of EOS strictly before each position: a token is kept while none came before it
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (before == 0).float()


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy.

    k1 = log p - log q (unbiased, can be negative per token); k3 = (r - 1) - log r with r = q / p
    (unbiased, always >= 0, lower variance).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}: use k1 or k3")


def shaped_rewards(score: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards: -kl_coef * KL on every response token, plus the sequence score on its last one."""
    rewards = -kl_coef * kl * mask
    last = (mask.cumsum(dim=1) == mask.sum(dim=1, keepdim=True)) & (mask > 0)
    return rewards + last.float() * score.unsqueeze(1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each response; returns (advantages, returns).

    Positions with mask 0 contribute nothing and get advantage 0; the value after the last real token is 0.
    """
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        running = running * m  # padding after the response: no advantage, and nothing carried back
        advantages[:, t] = running
        next_value = torch.where(m > 0, values[:, t], next_value)
    returns = advantages + values * mask
    return advantages, returns


@dataclass
class PolicyLossStats:
    loss: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, cliprange: float, total=None) -> PolicyLossStats:
    """PPO's clipped surrogate: mean over tokens of max(-A r, -A clip(r, 1-e, 1+e)), r = pi/pi_old.
    ``total``: the denominator of every mean, see :func:`masked_mean`. Positions outside the mask get a ratio of
    1 before the mean (their log-probabilities may be anything, even far apart: exp() must not overflow there)."""
    log_ratio = torch.where(mask.bool(), logprobs - old_logprobs, 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask, total)
    clipfrac = masked_mean((clipped > unclipped).float(), mask, total)
    approx_kl = masked_mean(0.5 * log_ratio**2, mask, total)  # the update's KL, for target_kl early stop
    return PolicyLossStats(loss, clipfrac, approx_kl)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, cliprange_value: float, total=None) -> torch.Tensor:
    """0.5 * mean of max((v - R)^2, (clip(v, v_old +- e) - R)^2)."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask, total)


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019: coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        super().__init__(init_kl_coef)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value


def kl_controller(kind: str, kl_coef: float, target: float, horizon: int) -> FixedKLController:
    if kind == "fixed":
        return FixedKLController(kl_coef)
    if kind == "adaptive":
        return AdaptiveKLController(kl_coef, target, horizon)
    raise ValueError(f"unknown KL controller {kind!r}: use fixed or adaptive")
