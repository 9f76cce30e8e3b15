"""PPO pieces against values computed by hand (the numbers in each test are worked out in comments)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_exp.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    kl_controller,
    kl_per_token,
    masked_mean,
    response_mask,
    shaped_rewards,
)

T = torch.tensor


def test_gae_on_four_tokens():
    # gamma=1, lam=0.95, reward 1 on the last token, values 0.5 0.6 0.7 0.8, terminal value 0:
    # d3 = 1 - 0.8 = 0.2                      A3 = 0.2
    # d2 = 0.8 - 0.7 = 0.1                    A2 = 0.1 + 0.95 * 0.2    = 0.29
    # d1 = 0.7 - 0.6 = 0.1                    A1 = 0.1 + 0.95 * 0.29   = 0.3755
    # d0 = 0.6 - 0.5 = 0.1                    A0 = 0.1 + 0.95 * 0.3755 = 0.456725
    rewards, values, mask = T([[0.0, 0, 0, 1]]), T([[0.5, 0.6, 0.7, 0.8]]), T([[1.0, 1, 1, 1]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    assert torch.allclose(adv, T([[0.456725, 0.3755, 0.29, 0.2]]))
    assert torch.allclose(ret, T([[0.956725, 0.9755, 0.99, 1.0]]))


def test_gae_with_discount_and_padding():
    # gamma=0.9, lam=0.5; three real tokens then padding (whose value 9.9 must be ignored):
    # d2 = 1 - 0.3 = 0.7                      A2 = 0.7
    # d1 = 0.9 * 0.3 - 0.2 = 0.07             A1 = 0.07 + 0.45 * 0.7  = 0.385
    # d0 = 0.9 * 0.2 - 0.1 = 0.08             A0 = 0.08 + 0.45 * 0.385 = 0.25325
    rewards, values, mask = T([[0.0, 0, 1, 5]]), T([[0.1, 0.2, 0.3, 9.9]]), T([[1.0, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    assert torch.allclose(adv, T([[0.25325, 0.385, 0.7, 0.0]]))
    assert torch.allclose(ret, T([[0.35325, 0.585, 1.0, 0.0]]))


@pytest.mark.parametrize("ratio,advantage,loss,clipfrac", [
    (1.1, 1.0, -1.1, 0.0),   # inside the clip range: plain -A * r
    (1.5, 1.0, -1.2, 1.0),   # above 1 + e with A > 0: clipped to -A * 1.2
    (1.5, -1.0, 1.5, 0.0),   # above 1 + e with A < 0: the pessimistic unclipped term wins
    (0.5, -1.0, 0.8, 1.0),   # below 1 - e with A < 0: clipped to -A * 0.8
    (0.5, 1.0, -0.5, 0.0),   # below 1 - e with A > 0: unclipped
])
def test_clipped_policy_loss(ratio, advantage, loss, clipfrac):
    old = torch.zeros(1, 1)
    stats = clipped_policy_loss(torch.full((1, 1), math.log(ratio)), old, torch.full((1, 1), advantage),
                                torch.ones(1, 1), cliprange=0.2)
    assert stats.loss.item() == pytest.approx(loss)
    assert stats.clipfrac.item() == pytest.approx(clipfrac)
    assert stats.approx_kl.item() == pytest.approx(0.5 * math.log(ratio) ** 2)


def test_policy_loss_ignores_masked_tokens():
    stats = clipped_policy_loss(T([[0.0, 5.0]]), T([[0.0, 0.0]]), T([[1.0, 100.0]]), T([[1.0, 0.0]]), 0.2)
    assert stats.loss.item() == pytest.approx(-1.0)


def test_clipped_value_loss():
    # v=1.0, v_old=0.5, R=0.0, e=0.2: unclipped (1-0)^2 = 1, clipped (0.7-0)^2 = 0.49 -> 0.5 * max = 0.5
    # v=0.6, v_old=0.5, R=2.0: unclipped 1.96, clipped (0.6-2)^2 = 1.96 -> 0.98; mean over both = 0.74
    loss = clipped_value_loss(T([[1.0, 0.6]]), T([[0.5, 0.5]]), T([[0.0, 2.0]]), T([[1.0, 1.0]]), 0.2)
    assert loss.item() == pytest.approx(0.74)


def test_kl_estimators():
    # p = 0.5, q = 0.25: k1 = log 2 = 0.693147; r = q/p = 0.5, k3 = (r - 1) - log r = -0.5 + 0.693147
    logp, ref = T([[math.log(0.5)]]), T([[math.log(0.25)]])
    assert kl_per_token(logp, ref, "k1").item() == pytest.approx(0.693147, abs=1e-6)
    assert kl_per_token(logp, ref, "k3").item() == pytest.approx(0.193147, abs=1e-6)
    assert kl_per_token(ref, logp, "k3").item() >= 0  # k3 is never negative
    with pytest.raises(ValueError, match="k1 or k3"):
        kl_per_token(logp, ref, "k2")


def test_adaptive_kl_controller_update():
    # init 0.2, target 6, horizon 10000, 64 steps per update:
    # KL 12  -> error clip(1, .2) = 0.2    -> 0.2 * (1 + 0.2 * 64 / 10000) = 0.200256
    # KL 3   -> error -0.5 -> -0.2         -> 0.2 * (1 - 0.00128)         = 0.199744
    # KL 6.6 -> error 0.1                  -> 0.2 * (1 + 0.00064)         = 0.200128
    for kl, expected in ((12.0, 0.200256), (3.0, 0.199744), (6.6, 0.200128)):
        controller = AdaptiveKLController(0.2, target=6.0, horizon=10000)
        assert controller.update(kl, n_steps=64) == pytest.approx(expected)
    fixed = FixedKLController(0.1)
    assert fixed.update(100.0, 64) == 0.1
    restored = kl_controller("adaptive", 0.5, 6.0, 100)
    restored.load_state_dict(AdaptiveKLController(0.3, 6.0, 100).state_dict())
    assert restored.value == 0.3


def test_response_mask_stops_after_the_first_eos_only():
    """Padding after EOS is masked; a pad token sampled inside an answer is part of it (generate attended
    to it), so the mask has no holes."""
    eos = 2
    tokens = T([[5, 2, 7, 0], [5, 6, 7, 8], [2, 5, 2, 0], [5, 0, 6, 2]])
    assert response_mask(tokens, eos).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]]


def test_shaped_rewards_put_the_score_on_the_last_real_token():
    # coef 0.5, KL 0.1 0.2 0.3 (0.9 on padding): -0.05 -0.1 -0.15 + score 1 = 0.85, padding 0
    rewards = shaped_rewards(T([1.0]), T([[0.1, 0.2, 0.3, 0.9]]), 0.5, T([[1.0, 1, 1, 0]]))
    assert torch.allclose(rewards, T([[-0.05, -0.1, 0.85, 0.0]]))


def test_masked_mean():
    assert masked_mean(T([[1.0, 3.0, 100.0]]), T([[1.0, 1.0, 0.0]])).item() == 2.0


def test_positions_outside_the_mask_cannot_overflow_the_ratio():
    """Past an answer's EOS the old and new log-probabilities may be far apart (the sampler's pick against the
    padding's): the loss and its gradient stay finite and equal those without those positions."""
    from rlhf_exp.ppo.core import clipped_policy_loss

    new = torch.tensor([[-1.0, -0.1]], requires_grad=True)
    old = torch.tensor([[-1.2, -200.0]])
    mask = torch.tensor([[1.0, 0.0]])
    stats = clipped_policy_loss(new, old, torch.tensor([[1.0, 1.0]]), mask, 0.2)
    stats.loss.backward()
    assert torch.isfinite(stats.loss) and torch.isfinite(new.grad).all() and new.grad[0, 1] == 0
    alone = clipped_policy_loss(torch.tensor([[-1.0]]), torch.tensor([[-1.2]]), torch.tensor([[1.0]]),
                                torch.tensor([[1.0]]), 0.2)
    assert stats.loss.item() == pytest.approx(alone.loss.item()) and stats.approx_kl.item() == pytest.approx(
        alone.approx_kl.item())
