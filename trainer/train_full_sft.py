"""Stage 2, full supervised fine-tuning: the pretrained model learns to chat (ChatML turns).

Loads:  {out_dir}/pretrain_{hidden}{_moe}.pth (--from_weight pretrain)
Data:   {"conversations": [...]} lines, dataset/sft_mini_512.jsonl (fallback: dataset/demo/sft.jsonl)
Loss:   cross entropy on the assistant tokens only (system and user turns are masked out)
Saves:  {out_dir}/full_sft_{hidden}{_moe}.pth

    python trainer/train_full_sft.py
"""
import os
import sys

if __package__ in (None, ""):  # run as a file: import from the repository root, not from trainer/
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from dataset.lm_dataset import SFTDataset, pad_collate  # noqa: E402
from trainer.cli import build_parser, finish_args  # noqa: E402
from trainer.losses import language_model_loss  # noqa: E402
from trainer.loop import train  # noqa: E402
from trainer.processes import training_processes  # noqa: E402
from trainer.stage import build_model, load_tokenizer, run_stage  # noqa: E402


def parse_args(argv=None):
    parser = build_parser("MiniMind full SFT", epochs=2, batch_size=16, learning_rate=5e-7,
                          max_seq_len=512, from_weight="pretrain")
    return finish_args(parser, stage="full_sft", data_file="sft_mini_512.jsonl", demo_file="sft.jsonl", argv=argv)


def main(argv=None):
    args = parse_args(argv)
    with training_processes(args) as runtime:
        model = build_model(args, args.from_weight)
        dataset = SFTDataset(args.data_path, load_tokenizer(), max_length=args.max_seq_len, cache_dir=args.cache_dir)
        return train(args, runtime, model, dataset, pad_collate, language_model_loss)


if __name__ == "__main__":
    run_stage(main)
