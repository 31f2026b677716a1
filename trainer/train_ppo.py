"""Online RL with PPO: an actor (the policy) and a critic (a value per token) trained together.

Loads:  the actor and a frozen reference from {out_dir}/full_sft_{hidden}{_moe}.pth (--from_weight);
        the critic is a copy of the actor's decoder with a scalar value head (initialised to
        0, so its first values are 0 and it learns the returns from there)
Data:   rlaif rows, dataset/rlaif.jsonl (fallback: dataset/demo/rlaif.jsonl), as GRPO
Step:   one rollout of --batch_size prompts (one reply each) through the generation engine, then
        rewards: the rules / --reward_fn / --reward_model_path score at the reply's last token,
                 and −kl_coef·(log π_old − log π_ref) at every reply token (the KL penalty is
                 part of the reward, as in InstructGPT)
        GAE (--gamma, --lam) on the critic's rollout-time values: advantages (whitened over the
                 rollout's reply tokens) and returns
        --ppo_update_iters passes over the rollout in shuffled pieces of --mini_batch_size, each
                 an optimizer step on  clipped actor loss + vf_coef · clipped value loss;
                 the passes stop early once the policy has moved more than --early_stop_kl
                 (approximate KL ½(log π − log π_old)², all processes agreeing) from the rollout's
Saves:  {out_dir}/ppo_actor_{hidden}{_moe}.pth (eval_model.py --model_mode 6) and
        {out_dir}/ppo_critic_{hidden}{_moe}.pth (the critic's decoder and value head)

A logged "step" is one rollout with its updates. --accumulation_steps and DeepSpeed are not
used by this stage (each mini-batch is one update).

    python trainer/train_ppo.py
"""
import os
import sys

if __package__ in (None, ""):  # run as a file: import from the repository root, not from trainer/
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import contextlib  # noqa: E402
import copy  # noqa: E402
import math  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from dataset.lm_dataset import RLAIFDataset, prompt_collate  # noqa: E402
from model.checkpoint import atomic_torch_save, half_precision_state_dict, save_weights, weight_path  # noqa: E402
from model.command_line import UserError  # noqa: E402
from trainer.accelerator import TORCH_DTYPES, make_optimizer  # noqa: E402
from trainer.checkpoints import TrainState, load_resume_state, run_files, save_checkpoint, write_run_info  # noqa: E402
from trainer.cli import build_parser, finish_args  # noqa: E402
from trainer.data_order import count_steps_per_epoch, make_loader  # noqa: E402
from trainer.loop import (MAX_BAD_STEPS_IN_A_ROW, forward_autocast, learning_rate_at, optimizer_step,  # noqa: E402
                          stop_or_save)
from trainer.loss_weighting import StepLossWeighting  # noqa: E402
from trainer.processes import StopRequest, log, seed_everything, training_processes, wrap_model  # noqa: E402
from trainer.reporting import Reporter, describe_parameters  # noqa: E402
from trainer.rewards import Rewards, add_reward_args  # noqa: E402
from trainer.rl_losses import aggregate, gae, masked_mean, ppo_actor_loss, ppo_value_loss  # noqa: E402
from trainer.rollout import (RolloutSampler, add_rollout_args, check_rollout_args, rollout_seed,  # noqa: E402
                             score_replies, token_entropy, token_log_probs)
from trainer.stage import build_frozen_model, build_model, load_tokenizer, run_stage  # noqa: E402


def parse_args(argv=None):
    parser = build_parser("MiniMind PPO", epochs=1, batch_size=4, learning_rate=1e-6, max_seq_len=512,
                          from_weight="full_sft", log_interval=1, save_interval=10)
    group = parser.add_argument_group("PPO")
    group.add_argument("--critic_learning_rate", type=float, default=5e-6, help="peak learning rate of the critic")
    group.add_argument("--clip_epsilon", type=float, default=0.2, help="the actor's ratio is clipped to 1 ± this")
    group.add_argument("--cliprange_value", type=float, default=0.2, help="a value may move this far from its rollout value")
    group.add_argument("--vf_coef", type=float, default=0.5, help="weight of the value loss")
    group.add_argument("--kl_coef", type=float, default=0.02, help="KL penalty to the reference, in the per-token reward")
    group.add_argument("--gamma", type=float, default=1.0, help="GAE discount")
    group.add_argument("--lam", type=float, default=0.95, help="GAE lambda")
    group.add_argument("--ppo_update_iters", type=int, default=2, help="passes over each rollout")
    group.add_argument("--mini_batch_size", type=int, default=2, help="replies per update")
    group.add_argument("--early_stop_kl", type=float, default=0.25,
                       help="stop a rollout's passes once the approximate KL to the rollout policy exceeds this")
    add_rollout_args(parser, num_generations=False)
    add_reward_args(parser)
    args = finish_args(parser, stage="ppo_actor", data_file="rlaif.jsonl", demo_file="rlaif.jsonl", argv=argv)
    check_rollout_args(parser, args)
    if args.accumulation_steps != 1 or args.deepspeed:
        parser.error("PPO makes one update per mini-batch: --accumulation_steps must be 1 and --deepspeed is not supported")
    if not 1 <= args.mini_batch_size <= args.batch_size or args.ppo_update_iters < 1:
        parser.error(f"--mini_batch_size must be in 1..--batch_size ({args.batch_size}) and --ppo_update_iters >= 1")
    return args


class ActorCritic(nn.Module):
    """The actor (a MiniMind) and the critic (a copy of its decoder + a scalar value head) as one
    module, so one optimizer, one DDP wrapper and one resume state hold both."""

    def __init__(self, actor):
        super().__init__()
        self.actor = actor
        self.critic = copy.deepcopy(actor.model)
        self.value_head = nn.Linear(actor.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @property
    def config(self):
        return self.actor.config

    def forward(self, input_ids):
        """(the actor's output, the critic's value at every position (rows, length))."""
        hidden, _, _ = self.critic(input_ids=input_ids)
        return self.actor(input_ids), self.value_head(hidden).squeeze(-1).float()

    def optimizer_groups(self, actor_lr: float, critic_lr: float) -> list[dict]:
        critic = list(self.critic.parameters()) + list(self.value_head.parameters())
        return [{"params": list(self.actor.parameters()), "lr": actor_lr, "lr_scale": 1.0},
                {"params": critic, "lr": critic_lr, "lr_scale": critic_lr / actor_lr}]


def critic_path(args) -> str:
    return weight_path(args.out_dir, "ppo_critic", args.hidden_size, bool(args.use_moe))


def save_actor_and_critic(args):
    def save(model: ActorCritic, path: str) -> None:
        save_weights(model.actor, path)
        critic = {f"model.{k}": v for k, v in half_precision_state_dict(model.critic).items()}
        critic.update({f"value_head.{k}": v.half() for k, v in model.value_head.state_dict().items()})
        atomic_torch_save(critic, critic_path(args))
    return save


# ----------------------------------------------------------------------------------------------
# One rollout and its updates
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def advantages_and_returns(args, model: ActorCritic, reference, input_ids, mask, reward):
    """Per reply token: the rollout policy's log-probs, the critic's values, and GAE's
    advantages (whitened) and returns on the rewards (KL penalty + final reward)."""
    out, values = model(input_ids)
    old_log_probs = token_log_probs(out.logits, input_ids)
    values = values[:, :-1] * mask  # the value of the state before each reply token
    ref_log_probs = token_log_probs(reference(input_ids).logits, input_ids)
    kl_to_reference = (old_log_probs - ref_log_probs) * mask
    token_rewards = -args.kl_coef * kl_to_reference
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # each row's last reply token
    token_rewards[torch.arange(len(last)), last] += reward.to(token_rewards.device)
    advantages, returns = gae(token_rewards, values, mask, args.gamma, args.lam)
    mean = masked_mean(advantages, mask)
    std = masked_mean((advantages - mean) ** 2, mask).sqrt()
    advantages = (advantages - mean) / (std + 1e-8) * mask
    return {"old_log_probs": old_log_probs, "old_values": values, "advantages": advantages, "returns": returns,
            "kl": masked_mean(kl_to_reference, mask), "entropy": masked_mean(token_entropy(out.logits), mask)}


def mean_over_ranks(values: dict, runtime) -> dict:
    keys = sorted(values)
    vector = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=runtime.device)
    if runtime.distributed:
        dist.all_reduce(vector)
        vector /= runtime.world_size
    return dict(zip(keys, vector.tolist()))


def update_on_rollout(args, state: TrainState, runtime, rollout_data: dict, input_ids, mask, lr: float, step: int):
    """--ppo_update_iters shuffled passes of mini-batch updates; returns the logged means."""
    for group in state.optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    rows = input_ids.shape[0]
    sums = {"actor_loss": 0.0, "value_loss": 0.0, "clip_frac": 0.0, "approx_kl": 0.0}
    updates, grad_norm, skipped_any = 0, 0.0, False
    for iteration in range(args.ppo_update_iters):
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(rollout_seed(args.seed, step, -1, iteration)))
        for start in range(0, rows, args.mini_batch_size):
            pick = order[start:start + args.mini_batch_size].to(input_ids.device)
            m = mask[pick]
            with forward_autocast(args, runtime):
                out, values = state.engine(input_ids[pick])
            log_probs = token_log_probs(out.logits, input_ids[pick])
            old = rollout_data["old_log_probs"][pick]
            approx_kl = mean_over_ranks({"kl": masked_mean(0.5 * (log_probs.detach() - old) ** 2, m)}, runtime)["kl"]
            if approx_kl > args.early_stop_kl:  # every rank sees the same mean: all stop together
                (log_probs.sum() * 0 + values.sum() * 0).backward()  # DDP expects a backward after a forward
                state.optimizer.zero_grad(set_to_none=True)
                return sums, updates, grad_norm, skipped_any
            actor_loss = aggregate(ppo_actor_loss(log_probs, old, rollout_data["advantages"][pick], args.clip_epsilon), m)
            value_loss = aggregate(ppo_value_loss(values[:, :-1], rollout_data["old_values"][pick],
                                                  rollout_data["returns"][pick], args.cliprange_value), m)
            loss = actor_loss + args.vf_coef * value_loss
            if state.model.config.use_moe:
                loss = loss + out.aux_loss
            if step in args.debug_nan_steps:
                loss = loss * float("nan")  # test hook
            state.scaler.scale(loss).backward()
            loss_value = mean_over_ranks({"loss": loss.detach()}, runtime)["loss"]
            grad_norm, skipped = optimizer_step(state, {"loss": loss_value, "loss_terms": 0}, args, runtime)
            skipped_any |= skipped
            ratio = torch.exp(log_probs.detach() - old)
            sums["actor_loss"] += actor_loss.item()
            sums["value_loss"] += value_loss.item()
            sums["clip_frac"] += float(masked_mean(((ratio - 1).abs() > args.clip_epsilon).float(), m))
            sums["approx_kl"] += approx_kl
            updates += 1
    return sums, updates, grad_norm, skipped_any


def ppo_step(args, state, runtime, sampler, reference, rewards, batch, lr):
    """One rollout and its updates; the step's totals for the reporter."""
    policy = state.model.actor
    batch["optimizer_step"] = state.step + 1
    rollout = sampler(policy, batch, 1)
    reward, reward_parts = score_replies(rewards, batch, rollout, 1)
    input_ids, mask = rollout.input_ids.to(runtime.device), rollout.response_mask.to(runtime.device)
    state.model.eval()
    with forward_autocast(args, runtime):
        rollout_data = advantages_and_returns(args, state.model, reference, input_ids, mask, reward)
    state.model.train()
    sums, updates, grad_norm, skipped = update_on_rollout(args, state, runtime, rollout_data, input_ids, mask, lr,
                                                          state.step + 1)
    logged = {k: v / max(updates, 1) for k, v in sums.items()}
    logged.update(reward=reward.mean(), reward_std=reward.std(unbiased=False), **reward_parts,
                  kl=rollout_data["kl"], entropy=rollout_data["entropy"], response_len=mask.sum(1).float().mean(),
                  updates=updates, rollout_tokens_per_s=rollout.reply_tokens / max(rollout.seconds, 1e-9),
                  rollout_s=rollout.seconds, loss=logged["actor_loss"] + args.vf_coef * logged["value_loss"],
                  tokens=float((input_ids != 0).sum()), positions=float(input_ids.numel()))
    totals = mean_over_ranks(logged, runtime)
    totals["tokens"] *= runtime.world_size
    totals["positions"] *= runtime.world_size
    return totals, grad_norm, skipped


def train_ppo(args, runtime, model: ActorCritic, reference, rewards, dataset, tokenizer):
    files = run_files(args, save_fn=save_actor_and_critic(args))
    samples_per_step = args.batch_size * runtime.world_size
    log(f"{args.data_path}: {dataset.window_report('--max_seq_len')}")
    steps_per_epoch = count_steps_per_epoch(len(dataset), samples_per_step, args.data_path)
    total_steps = steps_per_epoch * args.epochs
    last_step = min(args.max_steps, total_steps) if args.max_steps else total_steps

    model = model.to(runtime.device).train()
    seed_everything(args.seed + runtime.rank)
    optimizer = make_optimizer(model.optimizer_groups(args.learning_rate, args.critic_learning_rate),
                               args.learning_rate, runtime.device)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=args.dtype == "float16")
    state = TrainState(model, optimizer, scaler, StepLossWeighting("micro_batch", 1, 1, runtime.world_size),
                       wrap_model(model, args, runtime))
    if args.resume:
        load_resume_state(state, files, runtime, samples_per_step)
    write_run_info(files, args, runtime)
    reporter = Reporter(args, runtime, files, state, steps_per_epoch, last_step)
    log(f"{files.name}: actor + critic {describe_parameters(model)}; {len(dataset)} prompts, {steps_per_epoch} "
        f"rollouts per epoch of {samples_per_step} prompts, {args.ppo_update_iters} passes in mini-batches of "
        f"{args.mini_batch_size}, {runtime.world_size} process(es), device {runtime.device}, {args.dtype}")
    sampler = RolloutSampler(args, tokenizer, args.batch_size)
    bad_steps_in_a_row = 0
    with StopRequest() as stop, contextlib.closing(reporter):
        while state.epoch < args.epochs and state.step < last_step:
            loader = make_loader(dataset, prompt_collate, args, runtime, state.epoch, state.samples_in_epoch)
            reporter.start_epoch()
            for batch in loader:
                lr = learning_rate_at(state.step, total_steps, args.learning_rate, args.warmup_iters)
                totals, grad_norm, skipped = ppo_step(args, state, runtime, sampler, reference, rewards, batch, lr)
                state.step += 1
                state.samples_in_epoch += samples_per_step
                bad_steps_in_a_row = bad_steps_in_a_row + 1 if skipped else 0
                reporter.step(totals, lr, grad_norm, skipped, bad_steps_in_a_row, MAX_BAD_STEPS_IN_A_ROW)
                stop_or_save(state, files, args, runtime, samples_per_step, skipped, bad_steps_in_a_row,
                             stop_requested=mean_over_ranks({"stop": float(stop.requested)}, runtime)["stop"] > 0)
                if state.step >= last_step:
                    break
            else:
                state.epoch += 1
                state.samples_in_epoch = 0
        save_checkpoint(state, files, runtime, samples_per_step)
    log(f"{files.name}: done after {state.step} rollouts; actor in {files.weights}, critic in {critic_path(args)}")
    return model.actor


def main(argv=None):
    args = parse_args(argv)
    with training_processes(args) as runtime:
        actor = build_model(args, args.from_weight, role="the actor (trained)")
        reference = build_frozen_model(args, runtime)  # fp32 weights: PPO runs without DeepSpeed
        model = ActorCritic(actor)
        rewards = Rewards.from_args(args, runtime.device, TORCH_DTYPES[args.dtype])
        tokenizer = load_tokenizer()
        dataset = RLAIFDataset(args.data_path, tokenizer, max_length=args.max_seq_len, cache_dir=args.cache_dir)
        if not math.isfinite(args.critic_learning_rate) or args.critic_learning_rate <= 0:
            raise UserError("--critic_learning_rate must be a positive number")
        return train_ppo(args, runtime, model, reference, rewards, dataset, tokenizer)


if __name__ == "__main__":
    run_stage(main)
