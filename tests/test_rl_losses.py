"""GRPO, CISPO and PPO losses against numbers worked out by hand on small fixed tensors."""
import math

import pytest
import torch

from trainer.rl_losses import (aggregate, cispo_token_loss, clipped_fraction, gae, grpo_token_loss,
                               group_advantages, kl_k3, ppo_actor_loss, ppo_value_loss)


def test_group_advantages_normalise_within_each_group():
    # group 1: rewards 1, 0 -> mean 0.5, population std 0.5 -> ±1 (up to eps)
    # group 2: rewards 2, 2 -> all equal: advantage 0, not NaN
    # group 3: rewards 0, 3 -> mean 1.5, std 1.5 -> ±1
    adv = group_advantages(torch.tensor([1.0, 0.0, 2.0, 2.0, 0.0, 3.0]), group_size=2)
    assert adv.tolist() == pytest.approx([0.5 / 0.5001, -0.5 / 0.5001, 0.0, 0.0, -1.5 / 1.5001, 1.5 / 1.5001])
    # a group of 4: 0, 0, 0, 4 -> mean 1, std sqrt((1+1+1+9)/4) = sqrt(3)
    adv = group_advantages(torch.tensor([0.0, 0.0, 0.0, 4.0]), group_size=4)
    assert adv.tolist() == pytest.approx([-1 / (3 ** 0.5 + 1e-4)] * 3 + [3 / (3 ** 0.5 + 1e-4)])


def test_k3_kl_estimator():
    log_probs = torch.tensor([[math.log(0.5), math.log(0.2), math.log(0.3)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.2), math.log(0.6)]])
    # x = log(ref/p): log 0.5, 0, log 2 -> e^x - x - 1
    expected = [0.5 - math.log(0.5) - 1, 0.0, 2 - math.log(2) - 1]
    assert kl_k3(log_probs, ref)[0].tolist() == pytest.approx(expected)
    assert (kl_k3(torch.randn(50), torch.randn(50)) >= 0).all()


def test_grpo_clips_in_both_directions():
    # ratios 1.5, 0.5, 1.1 for three tokens of one reply; eps 0.2, eps_high 0.3
    old = torch.zeros(1, 3)
    log_probs = torch.log(torch.tensor([[1.5, 0.5, 1.1]])).requires_grad_()
    for advantage, expected, live in [
        # A > 0: min(r·A, clip(r)·A): 1.5 -> 1.3 (clipped high), 0.5 stays 0.5 (unclipped is smaller), 1.1 stays
        (2.0, [-1.3 * 2, -0.5 * 2, -1.1 * 2], [False, True, True]),
        # A < 0: 1.5 stays 1.5 (the larger loss), 0.5 -> 0.8 (clipped low), 1.1 stays
        (-1.0, [1.5, 0.8, 1.1], [True, False, True]),
    ]:
        loss = grpo_token_loss(log_probs, old, torch.tensor([advantage]), epsilon=0.2, epsilon_high=0.3)
        assert loss[0].tolist() == pytest.approx(expected)
        grad, = torch.autograd.grad(loss.sum(), log_probs)
        assert [g != 0 for g in grad[0].tolist()] == live  # clipped tokens get no gradient
        frac = clipped_fraction(log_probs, old, torch.tensor([advantage]), torch.ones(1, 3), 0.2, 0.3)
        assert frac.item() == pytest.approx(1 / 3)


def test_grpo_at_ratio_one_is_minus_the_advantage_with_the_policy_gradient():
    log_probs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss = grpo_token_loss(log_probs, log_probs.detach(), torch.tensor([0.7]), 0.2, 0.28)
    assert loss[0].tolist() == pytest.approx([-0.7, -0.7])
    grad, = torch.autograd.grad(loss.sum(), log_probs)
    assert grad[0].tolist() == pytest.approx([-0.7, -0.7])  # d(-r·A)/dlogp = -r·A = -A at r = 1


def test_cispo_keeps_the_gradient_of_every_token_where_grpo_drops_it():
    old = torch.zeros(1, 3)
    log_probs = torch.log(torch.tensor([[1.5, 0.5, 1.1]])).requires_grad_()
    advantage = torch.tensor([2.0])
    cispo = cispo_token_loss(log_probs, old, advantage, epsilon_high=0.3)
    # weight min(r, 1.3) held constant: loss = -w·A·log π
    weights = [1.3, 0.5, 1.1]
    assert cispo[0].tolist() == pytest.approx([-w * 2.0 * lp for w, lp in zip(weights, log_probs[0].tolist())])
    grad, = torch.autograd.grad(cispo.sum(), log_probs)
    assert grad[0].tolist() == pytest.approx([-w * 2.0 for w in weights])  # all three non-zero
    grpo = grpo_token_loss(log_probs, old, advantage, 0.2, 0.3)
    grpo_grad, = torch.autograd.grad(grpo.sum(), log_probs)
    assert grpo_grad[0, 0] == 0 and grad[0, 0] != 0  # the pinned difference: the clipped token
    # at ratio 1 both give the plain policy gradient -A·∇log π
    at_one = log_probs.detach().clone().requires_grad_()
    g_cispo, = torch.autograd.grad(cispo_token_loss(at_one, at_one.detach(), advantage, 0.3).sum(), at_one)
    g_grpo, = torch.autograd.grad(grpo_token_loss(at_one, at_one.detach(), advantage, 0.2, 0.3).sum(), at_one)
    assert torch.allclose(g_cispo, g_grpo)


def test_token_and_sequence_aggregation():
    per_token = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    assert aggregate(per_token, mask, "token").item() == pytest.approx((4 + 4) / 5)
    assert aggregate(per_token, mask, "sequence").item() == pytest.approx((1 + 4) / 2)
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(per_token, mask, "row")


def test_gae_by_hand():
    # one reply of 3 tokens then padding; reward only at the last token
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    gamma, lam = 0.9, 0.8
    d2 = 1.0 + 0 - 0.3                      # last token: nothing after it
    d1 = 0.0 + gamma * 0.3 - 0.4
    d0 = 0.0 + gamma * 0.4 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    assert advantages[0].tolist() == pytest.approx([a0, a1, a2, 0.0])
    assert returns[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.4, a2 + 0.3, 0.0])
    # gamma = lam = 1: the advantage is the reward to go minus the value
    advantages, _ = gae(rewards, values, mask, 1.0, 1.0)
    assert advantages[0, :3].tolist() == pytest.approx([0.5, 0.6, 0.7])


def test_ppo_actor_loss_clips_per_token():
    old = torch.zeros(1, 2)
    log_probs = torch.log(torch.tensor([[1.5, 0.5]]))
    advantages = torch.tensor([[1.0, -1.0]])
    # token 0: A>0, r=1.5 -> min(1.5, 1.2) = 1.2; token 1: A<0, r=0.5 -> min(-0.5, -0.8) = -0.8
    assert ppo_actor_loss(log_probs, old, advantages, 0.2)[0].tolist() == pytest.approx([-1.2, 0.8])


def test_ppo_value_loss_takes_the_worse_of_clipped_and_unclipped():
    old_values = torch.tensor([1.0, 1.0, 1.0])
    values = torch.tensor([2.0, 1.1, 0.0])
    returns = torch.tensor([2.0, 0.0, 1.0])
    # v=2.0: unclipped 0, clipped v=1.2 -> (1.2-2)^2 = 0.64 -> the max, 0.64
    # v=1.1: inside the range, both (1.1)^2 = 1.21
    # v=0.0: unclipped (0-1)^2 = 1, clipped v=0.8 -> 0.04 -> 1
    loss = ppo_value_loss(values, old_values, returns, cliprange_value=0.2)
    assert loss.tolist() == pytest.approx([0.5 * 0.64, 0.5 * 1.21, 0.5 * 1.0])


def test_plot_has_a_reward_panel_for_rl_runs():
    from scripts.plot_metrics import make_figure
    sft = [{"step": s, "loss": 2.0 / s, "lr": 1e-3} for s in range(1, 5)]
    grpo = [{"step": s, "loss": 0.01, "lr": 1e-6, "reward": 0.1 * s} for s in range(1, 5)]
    assert len(make_figure({"full_sft_64": sft}).axes) == 2
    fig = make_figure({"full_sft_64": sft, "grpo_64": grpo})
    reward_ax = fig.axes[2]
    assert reward_ax.get_title().startswith("mean reward")
    lines = reward_ax.get_lines()
    assert len(lines) == 1 and list(lines[0].get_ydata()) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert lines[0].get_color() == fig.axes[0].get_lines()[1].get_color()  # grpo's colour in every panel
