"""Reasoning distillation: SFT on answers written as <think>…</think><answer>…</answer> (traces
of a stronger reasoning model), with extra weight on the tags so the format is learned firmly.

Loads:  {out_dir}/rlhf_{hidden}{_moe}.pth (--from_weight rlhf)
Data:   SFT-format lines, dataset/r1_mix_1024.jsonl (fallback: dataset/demo/r1_mix.jsonl)
Loss:   assistant-token cross entropy where every token of a <think>, </think>, <answer>,
        </answer> tag counts --tag_weight times (the denominator stays the number of assistant
        tokens, as in MiniMind)
Saves:  {out_dir}/reason_{hidden}{_moe}.pth

    python trainer/train_distill_reason.py
"""
import os
import sys

if __package__ in (None, ""):  # run as a file: import from the repository root, not from trainer/
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from dataset.lm_dataset import SFTDataset, pad_collate  # noqa: E402
from trainer.cli import build_parser, finish_args  # noqa: E402
from trainer.losses import forward_batch, masked_cross_entropy, with_aux_loss  # noqa: E402
from trainer.loop import train  # noqa: E402
from trainer.processes import log, training_processes  # noqa: E402
from trainer.stage import build_model, load_tokenizer, run_stage  # noqa: E402

REASONING_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def parse_args(argv=None):
    parser = build_parser("MiniMind reasoning distillation", epochs=1, batch_size=8, learning_rate=1e-6,
                          max_seq_len=1024, from_weight="rlhf")
    parser.add_argument_group("reasoning distillation").add_argument(
        "--tag_weight", type=float, default=10.0,
        help="loss weight of the reasoning tags' tokens (other answer tokens weigh 1)")
    return finish_args(parser, stage="reason", data_file="r1_mix_1024.jsonl", demo_file="r1_mix.jsonl", argv=argv)


def tag_token_ids(tokenizer) -> list[list[int]]:
    """Each tag as the token ids the tokenizer gives it (a tag may span several tokens)."""
    return [tokenizer.encode(tag, add_special_tokens=False) for tag in REASONING_TAGS]


def tag_positions(targets: torch.Tensor, tags: list[list[int]]) -> torch.Tensor:
    """Boolean mask of every position covered by a complete occurrence of one of the tags."""
    found = torch.zeros_like(targets, dtype=torch.bool)
    for tag in tags:
        n = len(tag)
        if n == 0 or targets.shape[1] < n:
            continue
        windows = targets.unfold(1, n, 1)  # (batch, starts, n): every run of n consecutive tokens
        starts = (windows == torch.tensor(tag, device=targets.device)).all(-1)
        for offset in range(n):
            found[:, offset:offset + starts.shape[1]] |= starts
    return found


def reasoning_token_weights(labels: torch.Tensor, loss_mask: torch.Tensor, tags: list[list[int]],
                            tag_weight: float) -> torch.Tensor:
    """tag_weight on the trained tokens of complete tags, 1 on other trained tokens, 0 elsewhere
    (a reply cut by max_seq_len keeps the weights of the tags that fit)."""
    mask = loss_mask.float()
    is_tag = tag_positions(labels, tags) & loss_mask.bool()
    return torch.where(is_tag, torch.full_like(mask, tag_weight), mask)


def make_reasoning_loss(tags: list[list[int]], tag_weight: float):
    def loss_fn(model, batch):
        out = forward_batch(model, batch)
        weights = reasoning_token_weights(batch["labels"], batch["loss_mask"], tags, tag_weight)
        loss = masked_cross_entropy(out.logits, batch["labels"], batch["loss_mask"], token_weights=weights)
        return with_aux_loss(model, loss, out)
    return loss_fn


def main(argv=None):
    args = parse_args(argv)
    with training_processes(args) as runtime:
        tokenizer = load_tokenizer()
        tags = tag_token_ids(tokenizer)
        log("reasoning tags as tokens: " + ", ".join(f"{t}={ids}" for t, ids in zip(REASONING_TAGS, tags)))
        model = build_model(args, args.from_weight)
        dataset = SFTDataset(args.data_path, tokenizer, max_length=args.max_seq_len, cache_dir=args.cache_dir)
        return train(args, runtime, model, dataset, pad_collate, make_reasoning_loss(tags, args.tag_weight))


if __name__ == "__main__":
    run_stage(main)
