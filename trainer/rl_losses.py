"""The losses of online reinforcement learning (GRPO, CISPO, PPO), written out by hand.

Every function works on per-token tensors of shape (rows, response_len) with a `mask` that is
1 on the response tokens the loss is about (0 on padding after the reply's end):

    group_advantages(rewards, G)                       GRPO: reward vs the other replies to its prompt
    kl_k3(log_probs, ref_log_probs)                    KL(π ‖ π_ref) estimated per token (Schulman's k3)
    grpo_token_loss(log_probs, old, adv, ε, ε_high)    clipped policy-ratio objective (PPO-style)
    cispo_token_loss(log_probs, old, adv, ε_high)      clipped importance weight, gradient on every token
    aggregate(per_token, mask, "token"|"sequence")     how the per-token terms become one number
    gae(rewards, values, mask, γ, λ)                   PPO: advantages and returns
    ppo_actor_loss / ppo_value_loss                    PPO's clipped actor and critic losses

Notation: ratio r = π(a|s) / π_old(a|s) = exp(log_probs − old_log_probs), advantage A.
"""
import torch

ADVANTAGE_EPS = 1e-4  # a group whose replies all got the same reward has std 0: A = 0, not 0/0


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """(r − mean of its group) / (std of its group + eps), per reply.

    `rewards` holds group_size consecutive replies per prompt. The std is the population std
    (divide by G, as minimind-3): with G=2 the unbiased one would give ±0.71 instead of ±1."""
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, unbiased=False, keepdim=True)
    return ((grouped - mean) / (std + eps)).view(-1)


def kl_k3(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) on tokens sampled from π: with x = log π_ref − log π,
    k3 = e^x − x − 1. Unbiased, never negative (e^x ≥ 1 + x), and low-variance (the GRPO paper's)."""
    x = ref_log_probs - log_probs
    return torch.exp(x) - x - 1


def policy_ratio(log_probs: torch.Tensor, old_log_probs: torch.Tensor) -> torch.Tensor:
    return torch.exp(log_probs - old_log_probs)


def grpo_token_loss(log_probs, old_log_probs, advantages, epsilon: float, epsilon_high: float):
    """−min(r·A, clip(r, 1−ε, 1+ε_high)·A) per token; `advantages` is one value per row.

    The min makes the objective pessimistic: once the ratio has moved past the clip range in the
    direction the advantage pushes it (r > 1+ε_high with A > 0, r < 1−ε with A < 0), the clipped
    term is the smaller one, it is constant, and the token's gradient is 0. A larger upper bound
    ε_high (DAPO's "clip higher") lets unlikely tokens with a positive advantage grow further."""
    ratio = policy_ratio(log_probs, old_log_probs)
    advantages = advantages.unsqueeze(1)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * advantages
    return -torch.min(unclipped, clipped)


def cispo_token_loss(log_probs, old_log_probs, advantages, epsilon_high: float):
    """−sg(min(r, 1+ε_high))·A·log π per token (MiniMax-M1's CISPO).

    The importance weight is clipped and treated as a constant (stop-gradient), and the gradient
    flows through log π itself, so EVERY token keeps a gradient A·∇log π scaled by the weight;
    GRPO's clipping instead zeroes the gradient of tokens outside the range. Its value at r = 1
    is −A·log π (not −A like GRPO's): the gradients agree there, the losses do not."""
    weight = torch.clamp(policy_ratio(log_probs, old_log_probs), max=1 + epsilon_high).detach()
    return -weight * advantages.unsqueeze(1) * log_probs


def clipped_fraction(log_probs, old_log_probs, advantages, mask, epsilon: float, epsilon_high: float):
    """Share of response tokens whose gradient the clip removed (see grpo_token_loss)."""
    ratio = policy_ratio(log_probs, old_log_probs)
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    clipped = ((ratio > 1 + epsilon_high) & (advantages > 0)) | ((ratio < 1 - epsilon) & (advantages < 0))
    return masked_mean(clipped.float(), mask)


LOSS_AGGREGATIONS = ("token", "sequence")


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str = "token") -> torch.Tensor:
    """One number from the per-token terms of a batch of replies.

    token:    sum over all response tokens / number of response tokens (DAPO). Every token
              weighs the same, so a long reply's tokens are not worth less than a short one's.
    sequence: mean over each reply's tokens, then mean over replies (the GRPO paper's). A long
              wrong reply is then penalised per token less than a short wrong one, which
              rewards rambling; a long right reply's tokens get less credit each."""
    mask = mask.to(per_token.dtype)
    if how == "token":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    if how == "sequence":
        return ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).mean()
    raise ValueError(f"aggregation {how!r}: use one of {LOSS_AGGREGATIONS}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return aggregate(values, mask, "token")


# ----------------------------------------------------------------------------------------------
# PPO
# ----------------------------------------------------------------------------------------------

def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over each row's response tokens.

    δ_t = r_t + γ·V_{t+1} − V_t  (V after the last response token is 0: the episode ends there)
    A_t = δ_t + γλ·A_{t+1}       computed backwards;  returns R_t = A_t + V_t (the critic's target)

    `mask` must be 1 on a prefix of each row (the reply) and 0 after it. Returns (advantages,
    returns), both 0 where mask is 0."""
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def ppo_actor_loss(log_probs, old_log_probs, advantages, clip_epsilon: float):
    """PPO's clipped surrogate per token: −min(r·A, clip(r, 1−ε, 1+ε)·A), with A per token."""
    ratio = policy_ratio(log_probs, old_log_probs)
    return -torch.min(ratio * advantages, torch.clamp(ratio, 1 - clip_epsilon, 1 + clip_epsilon) * advantages)


def ppo_value_loss(values, old_values, returns, cliprange_value: float):
    """½·max((V − R)², (V_clipped − R)²) per token, V_clipped = old_V + clip(V − old_V, ±c): the
    critic may not move further than c from its rollout-time value in one rollout's updates."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    return 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
