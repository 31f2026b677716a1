"""Stage 3, DPO (direct preference optimisation): prefer the chosen answer over the rejected one.

Loads:  the policy AND a frozen reference, both from {out_dir}/full_sft_{hidden}{_moe}.pth
Data:   {"chosen": [messages], "rejected": [messages]} lines, dataset/dpo.jsonl
        (fallback: dataset/demo/dpo.jsonl)
Loss:   -log σ(β·((log πθ(c) − log πref(c)) − (log πθ(r) − log πref(r))))
        where log π(answer) is the MEAN log-probability of the answer's tokens, as in MiniMind
        (the DPO paper sums them; the mean keeps long and short answers on one scale, so β and
        the learning rate do not depend on answer length).
Logs:   reward_margin = β·(chosen − rejected log-ratio), reward_accuracy = share of pairs where
        the chosen answer gets the higher reward.
Saves:  {out_dir}/rlhf_{hidden}{_moe}.pth

    python trainer/train_dpo.py
"""
import os
import sys

if __package__ in (None, ""):  # run as a file: import from the repository root, not from trainer/
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dataset.lm_dataset import DPODataset, dpo_collate  # noqa: E402
from trainer.cli import build_parser, finish_args  # noqa: E402
from trainer.losses import with_aux_loss  # noqa: E402
from trainer.loop import train  # noqa: E402
from trainer.processes import training_processes  # noqa: E402
from trainer.stage import build_frozen_model, build_model, load_tokenizer, run_stage  # noqa: E402


def parse_args(argv=None):
    # MiniMind2 uses lr 1e-8..4e-8, which barely moves a model; 5e-7 is the usual DPO value
    # (pass --learning_rate 4e-8 for MiniMind2's exact recipe).
    parser = build_parser("MiniMind DPO", epochs=2, batch_size=4, learning_rate=5e-7, max_seq_len=1024,
                          from_weight="full_sft")
    parser.add_argument_group("DPO").add_argument(
        "--beta", type=float, default=0.1, help="DPO temperature: how strongly to stay near the reference")
    return finish_args(parser, stage="rlhf", data_file="dpo.jsonl", demo_file="dpo.jsonl", argv=argv)


def sequence_log_probs(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row: mean log-probability of the target tokens where mask is 1 (fp32, so bf16 logits
    cannot overflow the softmax)."""
    token_log_probs = -F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                       reduction="none").view_as(targets)
    mask = mask.float()
    return (token_log_probs * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float):
    """The DPO loss over a batch of pairs, and each pair's implicit rewards β·log(πθ/πref)."""
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards, rejected_rewards


def stack_pairs(batch: dict):
    """Chosen rows then rejected rows, in one batch (right-padded to one length), so each model
    runs one forward pass."""
    length = max(batch["x_chosen"].shape[1], batch["x_rejected"].shape[1])
    return [torch.cat([F.pad(batch[f"{key}_{side}"], (0, length - batch[f"{key}_{side}"].shape[1]))
                       for side in ("chosen", "rejected")])
            for key in ("x", "y", "mask")]


def make_dpo_loss(reference: torch.nn.Module, beta: float):
    def loss_fn(model, batch):
        input_ids, targets, mask = stack_pairs(batch)
        with torch.inference_mode():
            reference_log_probs = sequence_log_probs(reference(input_ids).logits, targets, mask)
        out = model(input_ids)
        policy_log_probs = sequence_log_probs(out.logits, targets, mask)
        pairs = batch["x_chosen"].shape[0]
        loss, chosen, rejected = dpo_loss(policy_log_probs[:pairs], policy_log_probs[pairs:],
                                          reference_log_probs[:pairs], reference_log_probs[pairs:], beta)
        loss, extras = with_aux_loss(model, loss, out)
        extras.update(reward_margin=(chosen - rejected).mean().detach(),
                      reward_accuracy=(chosen > rejected).float().mean().detach())
        return loss, extras
    return loss_fn


def main(argv=None):
    args = parse_args(argv)
    with training_processes(args) as runtime:
        policy = build_model(args, args.from_weight, role="the policy (trained)")
        reference = build_frozen_model(args, runtime)
        dataset = DPODataset(args.data_path, load_tokenizer(), max_length=args.max_seq_len, cache_dir=args.cache_dir)
        return train(args, runtime, policy, dataset, dpo_collate, make_dpo_loss(reference, args.beta))


if __name__ == "__main__":
    run_stage(main)
