"""Online RL with GRPO (group relative policy optimisation) or CISPO.

Loads:  the policy AND a frozen reference, both from {out_dir}/full_sft_{hidden}{_moe}.pth
        (--from_weight), and the reward model of --reward_model_path if given
Data:   rlaif rows {"conversations": [...], "answer": optional}, dataset/rlaif.jsonl
        (fallback: dataset/demo/rlaif.jsonl, demo sums and facts with their answers)
Step:   for each of --batch_size prompts, --num_generations (G) replies sampled through the
        generation engine; rewards (trainer/rewards.py); advantage of each reply = its reward
        normalised within its group of G; then one update on
            grpo:  −min(r·A, clip(r, 1−ε, 1+ε_high)·A) + β·KL_k3(π ‖ π_ref)   per reply token
            cispo: −sg(min(r, 1+ε_high))·A·log π      + β·KL_k3(π ‖ π_ref)
        averaged over all reply tokens of the optimizer step (--loss_agg token, DAPO: every
        token weighs the same, over all micro-batches and processes) or per reply first
        (--loss_agg sequence, the GRPO paper's).
Saves:  {out_dir}/grpo_{hidden}{_moe}.pth (eval_model.py --model_mode 5)

Each rollout is used for ONE update, so π_old is the policy itself and its log-probs are the
update's own forward pass (same autocast, same kernels): r = 1 exactly, clip_frac is 0, and
the objective's gradient is the policy gradient A·∇log π. The engine's own log-probs (computed
without the training precision path) are only compared with them (metric logprob_gap).

    python trainer/train_grpo.py
    python trainer/train_grpo.py --loss_type cispo --reward_fn my_rewards.py:reward
"""
import os
import sys

if __package__ in (None, ""):  # run as a file: import from the repository root, not from trainer/
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import time  # noqa: E402

import torch  # noqa: E402

from dataset.lm_dataset import RLAIFDataset, prompt_collate  # noqa: E402
from model.checkpoint import unwrap_model  # noqa: E402
from trainer.accelerator import TORCH_DTYPES  # noqa: E402
from trainer.cli import build_parser, finish_args  # noqa: E402
from trainer.losses import with_aux_loss  # noqa: E402
from trainer.loop import train  # noqa: E402
from trainer.processes import training_processes  # noqa: E402
from trainer.rewards import Rewards, add_reward_args  # noqa: E402
from trainer.rl_losses import (LOSS_AGGREGATIONS, aggregate, cispo_token_loss, clipped_fraction,  # noqa: E402
                               grpo_token_loss, group_advantages, kl_k3, masked_mean)
from trainer.rollout import (RolloutSampler, add_rollout_args, check_rollout_args, score_replies,  # noqa: E402
                             token_entropy, token_log_probs)
from trainer.stage import build_frozen_model, build_model, load_tokenizer, run_stage  # noqa: E402

# --epsilon_high when not given: DAPO's clip-higher bound for grpo; for cispo the importance
# weight is capped at 1 + 4 = 5, minimind-3's cap
DEFAULT_EPSILON_HIGH = {"grpo": 0.28, "cispo": 4.0}


def parse_args(argv=None):
    # MiniMind's RL stages use lr 1e-6..3e-7 on full data; 1e-6 is the same order
    parser = build_parser("MiniMind GRPO", epochs=1, batch_size=2, learning_rate=1e-6, max_seq_len=512,
                          from_weight="full_sft", log_interval=1, save_interval=10)
    group = parser.add_argument_group("GRPO")
    group.add_argument("--beta", type=float, default=0.02, help="weight of the KL penalty to the reference")
    group.add_argument("--loss_type", default="grpo", choices=["grpo", "cispo"],
                       help="grpo: clipped ratio objective; cispo: clipped importance weight, every token's gradient kept")
    group.add_argument("--epsilon", type=float, default=0.2, help="lower clip: the ratio may fall to 1 - epsilon")
    group.add_argument("--epsilon_high", type=float, default=None,
                       help=f"upper clip: the ratio may rise to 1 + epsilon_high (default {DEFAULT_EPSILON_HIGH})")
    group.add_argument("--loss_agg", default="token", choices=LOSS_AGGREGATIONS,
                       help="token: mean over every reply token of the step (DAPO); sequence: per reply, then over replies")
    add_rollout_args(parser)
    add_reward_args(parser)
    args = finish_args(parser, stage="grpo", data_file="rlaif.jsonl", demo_file="rlaif.jsonl", argv=argv)
    if args.epsilon_high is None:
        args.epsilon_high = DEFAULT_EPSILON_HIGH[args.loss_type]
    check_rollout_args(parser, args)
    if args.num_generations < 2:
        parser.error(f"--num_generations must be at least 2 (advantages compare replies to one prompt), "
                     f"got {args.num_generations}")
    return args


def make_grpo_loss(args, reference, rewards: Rewards, sampler: RolloutSampler):
    G = args.num_generations

    def loss_fn(model, batch):
        policy = unwrap_model(model)
        rollout = sampler(policy, batch, G)
        reward, reward_parts = score_replies(rewards, batch, rollout, G)
        device = next(policy.parameters()).device
        advantages = group_advantages(reward, G).to(device)
        input_ids, mask = rollout.input_ids.to(device), rollout.response_mask.to(device)

        update_started = time.perf_counter()
        out = model(input_ids)
        log_probs = token_log_probs(out.logits, input_ids)
        old_log_probs = log_probs.detach()  # one update per rollout: π_old is the policy itself
        if args.loss_type == "grpo":
            per_token = grpo_token_loss(log_probs, old_log_probs, advantages, args.epsilon, args.epsilon_high)
        else:
            per_token = cispo_token_loss(log_probs, old_log_probs, advantages, args.epsilon_high)
        kl = torch.zeros_like(log_probs)
        if args.beta > 0:
            with torch.inference_mode():
                ref_log_probs = token_log_probs(reference(input_ids).logits, input_ids)
            kl = kl_k3(log_probs, ref_log_probs.clone())
            per_token = per_token + args.beta * kl
        loss = aggregate(per_token, mask, args.loss_agg)
        loss, extras = with_aux_loss(model, loss, out)

        # what the loop counts: the loss's terms, the tokens of the update and its padded size
        batch["num_loss_terms"] = int(mask.sum()) if args.loss_agg == "token" else mask.shape[0]
        batch["num_tokens"] = int((input_ids != 0).sum())
        batch["num_positions"] = input_ids.numel()
        with torch.no_grad():
            grouped_std = reward.view(-1, G).std(dim=1, unbiased=False).mean()
            extras.update(
                reward=reward.mean(), reward_std=grouped_std, **reward_parts,
                kl=masked_mean(kl.detach(), mask),
                clip_frac=clipped_fraction(log_probs, old_log_probs, advantages, mask, args.epsilon,
                                           args.epsilon_high),
                response_len=mask.sum(1).float().mean(),
                entropy=masked_mean(token_entropy(out.logits.detach()), mask),
                logprob_gap=masked_mean((log_probs.detach() - rollout.engine_log_probs.to(device)).abs(), mask),
                rollout_tokens_per_s=torch.tensor(rollout.reply_tokens / max(rollout.seconds, 1e-9)),
                rollout_s=torch.tensor(rollout.seconds),
                forward_s=torch.tensor(time.perf_counter() - update_started))
        return loss, extras
    return loss_fn


def main(argv=None):
    args = parse_args(argv)
    with training_processes(args) as runtime:
        policy = build_model(args, args.from_weight, role="the policy (trained)")
        reference = build_frozen_model(args, runtime) if args.beta > 0 else None  # the KL anchor
        rewards = Rewards.from_args(args, runtime.device, TORCH_DTYPES[args.dtype])
        tokenizer = load_tokenizer()
        dataset = RLAIFDataset(args.data_path, tokenizer, max_length=args.max_seq_len, cache_dir=args.cache_dir)
        sampler = RolloutSampler(args, tokenizer, args.batch_size * args.num_generations)
        return train(args, runtime, policy, dataset, prompt_collate, make_grpo_loss(args, reference, rewards, sampler))


if __name__ == "__main__":
    run_stage(main)
