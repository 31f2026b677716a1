"""Stage 1, pretraining: a randomly initialised MiniMind learns to continue text.

Loads:  nothing (random init), or the stage named by --from_weight
Data:   {"text": ...} lines, dataset/pretrain_hq.jsonl (bundled fallback: dataset/demo/pretrain.jsonl)
Loss:   next-token cross entropy on every real token (+ the MoE balancing loss with --use_moe 1)
Saves:  {out_dir}/pretrain_{hidden}{_moe}.pth

    python trainer/train_pretrain.py
    torchrun --nproc_per_node 2 trainer/train_pretrain.py
"""
import os
import sys

if __package__ in (None, ""):  # run as a file: import from the repository root, not from trainer/
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from dataset.lm_dataset import PretrainDataset, pack_collate, pad_collate  # noqa: E402
from trainer.cli import build_parser, finish_args  # noqa: E402
from trainer.losses import language_model_loss  # noqa: E402
from trainer.loop import train  # noqa: E402
from trainer.processes import training_processes  # noqa: E402
from trainer.stage import build_model, load_tokenizer, run_stage  # noqa: E402


def parse_args(argv=None):
    parser = build_parser("MiniMind pretraining", epochs=1, batch_size=32, learning_rate=5e-4,
                          accumulation_steps=8, max_seq_len=512, from_weight="none")
    parser.add_argument_group("pretraining").add_argument(
        "--packing", type=int, default=0, choices=[0, 1],
        help="1: pack several documents into each row (attention stays inside each document)")
    return finish_args(parser, stage="pretrain", data_file="pretrain_hq.jsonl", demo_file="pretrain.jsonl",
                       argv=argv)


def main(argv=None):
    args = parse_args(argv)
    with training_processes(args) as runtime:
        model = build_model(args, args.from_weight)
        dataset = PretrainDataset(args.data_path, load_tokenizer(), max_length=args.max_seq_len, cache_dir=args.cache_dir)
        collate = pack_collate if args.packing else pad_collate
        return train(args, runtime, model, dataset, collate, language_model_loss)


if __name__ == "__main__":
    run_stage(main)
