"""LoRA fine-tuning: teach a frozen model something new (an identity, a domain) through small
low-rank adapters; only the adapters are trained and saved.

Loads:  the base model, {out_dir}/full_sft_{hidden}{_moe}.pth by default (--from_weight)
Data:   SFT-format lines, dataset/{lora_name}.jsonl (fallback: dataset/demo/{lora_name}.jsonl)
Loss:   cross entropy on the assistant tokens, as in full SFT
Saves:  {out_dir}/lora/{lora_name}_{hidden}{_moe}.pth (the adapters only)

    python trainer/train_lora.py --lora_name lora_identity
    python trainer/train_lora.py --lora_name lora_medical
"""
import os
import sys

if __package__ in (None, ""):  # run as a file: import from the repository root, not from trainer/
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from dataset.lm_dataset import SFTDataset, pad_collate  # noqa: E402
from model.checkpoint import REPO_ROOT, lora_path, run_name  # noqa: E402
from model.model_lora import apply_lora, mark_only_lora_trainable, save_lora  # noqa: E402
from trainer.checkpoints import run_files  # noqa: E402
from trainer.cli import build_parser, finish_args  # noqa: E402
from trainer.losses import language_model_loss  # noqa: E402
from trainer.loop import train  # noqa: E402
from trainer.processes import log, training_processes  # noqa: E402
from trainer.stage import build_model, load_tokenizer, run_stage  # noqa: E402


def parse_args(argv=None):
    parser = build_parser("MiniMind LoRA fine-tuning", epochs=10, batch_size=32, learning_rate=1e-4,
                          max_seq_len=512, from_weight="full_sft")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora_name", default="lora_identity",
                      help="adapter name: the data file dataset/<name>.jsonl and the output lora/<name>_<hidden>[_moe].pth")
    lora.add_argument("--lora_rank", type=int, default=8, help="rank r of the B·A update")
    args = parser.parse_args(argv)
    has_demo = os.path.isfile(os.path.join(REPO_ROOT, "dataset", "demo", f"{args.lora_name}.jsonl"))
    return finish_args(parser, stage="lora", data_file=f"{args.lora_name}.jsonl",
                       demo_file=f"{args.lora_name}.jsonl" if has_demo else "lora_identity.jsonl", args=args)


def add_adapters(model, rank: int) -> int:
    """Attach LoRA adapters and freeze every base weight; returns the trainable parameter count."""
    layers = apply_lora(model, rank=rank)
    trainable = mark_only_lora_trainable(model)
    adapter_params = sum(p.numel() for name, p in model.named_parameters() if ".lora." in name)
    assert trainable == adapter_params > 0, "only the LoRA adapters may be trainable"
    total = sum(p.numel() for p in model.parameters())
    log(f"LoRA rank {rank} on {len(layers)} layers: {trainable:,} trainable parameters of {total:,} "
        f"({100 * trainable / total:.2f}%); every base weight is frozen")
    return trainable


def main(argv=None):
    args = parse_args(argv)
    with training_processes(args) as runtime:
        model = build_model(args, args.from_weight)
        add_adapters(model, args.lora_rank)
        dataset = SFTDataset(args.data_path, load_tokenizer(), max_length=args.max_seq_len, cache_dir=args.cache_dir)
        files = run_files(args, name=run_name(args.lora_name, args.hidden_size, args.use_moe), save_fn=save_lora,
                          weights=lora_path(args.out_dir, args.lora_name, args.hidden_size, args.use_moe))
        return train(args, runtime, model, dataset, pad_collate, language_model_loss, files)


if __name__ == "__main__":
    run_stage(main)
