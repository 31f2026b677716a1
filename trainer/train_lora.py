"""LoRA fine-tuning: teach a frozen model something new (an identity, a domain) through small
low-rank adapters; only the adapters are trained and saved.

Loads:  the base model, {out_dir}/full_sft_{hidden}{_moe}.pth by default (--from_weight)
Data:   SFT-format lines, dataset/{lora_name}.jsonl (fallback: dataset/demo/{lora_name}.jsonl)
Loss:   cross entropy on the assistant tokens, as in full SFT
Saves:  {out_dir}/lora/{lora_name}_{hidden}.pth (the adapters only)

    python trainer/train_lora.py --lora_name lora_identity
    python trainer/train_lora.py --lora_name lora_medical
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset.lm_dataset import SFTDataset, pad_collate  # noqa: E402
from model.checkpoint import lora_path  # noqa: E402
from model.model_lora import apply_lora, mark_only_lora_trainable, save_lora  # noqa: E402
from trainer.trainer_utils import (REPO_ROOT, Trainer, build_model, build_parser, finish_args,  # noqa: E402
                                   init_runtime, language_model_loss, load_tokenizer, log, run_stage, shutdown)


def parse_args(argv=None):
    parser = build_parser("MiniMind LoRA fine-tuning", epochs=10, batch_size=32, learning_rate=1e-4,
                          max_seq_len=512, from_weight="full_sft")
    parser.add_argument("--lora_name", default="lora_identity",
                        help="adapter name: the data file dataset/<name>.jsonl and the output lora/<name>_<hidden>.pth")
    parser.add_argument("--lora_rank", type=int, default=8, help="rank r of the B·A update")
    args = parser.parse_args(argv)
    has_demo = os.path.isfile(os.path.join(REPO_ROOT, "dataset", "demo", f"{args.lora_name}.jsonl"))
    return finish_args(args, stage="lora", data_file=f"{args.lora_name}.jsonl",
                       demo_file=f"{args.lora_name}.jsonl" if has_demo else "lora_identity.jsonl")


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
    runtime = init_runtime(args)
    try:
        model = build_model(args, args.from_weight)
        add_adapters(model, args.lora_rank)
        dataset = SFTDataset(args.data_path, load_tokenizer(), max_length=args.max_seq_len)
        trainer = Trainer(args, runtime, model, dataset, pad_collate, language_model_loss,
                          name=f"{args.lora_name}_{args.hidden_size}",
                          weights_file=lora_path(args.out_dir, args.lora_name, args.hidden_size), save_fn=save_lora)
        return trainer.fit()
    finally:
        shutdown(runtime)


if __name__ == "__main__":
    run_stage(main)
