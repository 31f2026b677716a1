"""White-box knowledge distillation: a small student learns from a larger MiniMind teacher's
full next-token distributions, not just from the reference answers.

Loads:  teacher {out_dir}/full_sft_{teacher_hidden}.pth (frozen), student {out_dir}/full_sft_{hidden}{_moe}.pth
        (--from_weight full_sft, or none for a random student)
Data:   SFT-format lines, dataset/sft_mini_512.jsonl (fallback: dataset/demo/sft.jsonl)
Loss:   α·CE(student, answer) + (1−α)·T²·KL(teacher_T ‖ student_T), both averaged over the
        assistant tokens; _T = softmax at temperature T (T² keeps the gradient scale of the soft
        term independent of T)
Saves:  {out_dir}/full_dist_{hidden}{_moe}.pth

    python trainer/train_distillation.py --hidden_size 512 --num_hidden_layers 8 \
        --teacher_hidden_size 768 --teacher_num_hidden_layers 16
"""
import os
import sys

if __package__ in (None, ""):  # run as a file: import from the repository root, not from trainer/
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dataset.lm_dataset import SFTDataset, pad_collate  # noqa: E402
from trainer.cli import build_parser, finish_args  # noqa: E402
from trainer.losses import forward_batch, masked_cross_entropy, with_aux_loss  # noqa: E402
from trainer.loop import train  # noqa: E402
from trainer.processes import log, training_processes  # noqa: E402
from trainer.reporting import describe_parameters  # noqa: E402
from trainer.stage import build_frozen_model, build_model, load_tokenizer, run_stage  # noqa: E402


def parse_args(argv=None):
    parser = build_parser("MiniMind white-box distillation", epochs=6, batch_size=32, learning_rate=5e-6,
                          max_seq_len=512, from_weight="full_sft")
    group = parser.add_argument_group("distillation")
    group.add_argument("--teacher_hidden_size", type=int, default=768, help="the teacher's width")
    group.add_argument("--teacher_num_hidden_layers", type=int, default=16, help="the teacher's depth")
    group.add_argument("--teacher_use_moe", type=int, default=0, choices=[0, 1], help="1: the teacher is MoE")
    group.add_argument("--alpha", type=float, default=0.5, help="weight of the hard-label CE; 1 - alpha goes to the KL")
    group.add_argument("--temperature", type=float, default=1.5, help="softmax temperature of the KL term")
    args = finish_args(parser, stage="full_dist", data_file="sft_mini_512.jsonl", demo_file="sft.jsonl", argv=argv)
    if not 0.0 <= args.alpha <= 1.0 or args.temperature <= 0:
        parser.error(f"--alpha must be in [0, 1] and --temperature > 0 (got {args.alpha}, {args.temperature})")
    return args


def distillation_kl(student_logits, teacher_logits, mask, temperature: float) -> torch.Tensor:
    """T²·KL(teacher ‖ student) of the temperature-softened distributions, mean over masked tokens."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl_per_token = (teacher.exp() * (teacher - student)).sum(-1)
    mask = mask.float()
    return temperature ** 2 * (kl_per_token * mask).sum() / mask.sum().clamp(min=1.0)


def make_distillation_loss(teacher: torch.nn.Module, alpha: float, temperature: float):
    def loss_fn(model, batch):
        with torch.inference_mode():
            teacher_logits = forward_batch(teacher, batch).logits
        out = forward_batch(model, batch)
        ce = masked_cross_entropy(out.logits, batch["labels"], batch["loss_mask"])
        kl = distillation_kl(out.logits, teacher_logits, batch["loss_mask"], temperature)
        loss, extras = with_aux_loss(model, alpha * ce + (1 - alpha) * kl, out)
        extras.update(ce=ce.detach(), kl=kl.detach())
        return loss, extras
    return loss_fn


def main(argv=None):
    args = parse_args(argv)
    with training_processes(args) as runtime:
        teacher = build_frozen_model(args, runtime, "full_sft", role="the frozen teacher",
                                     hidden_size=args.teacher_hidden_size,
                                     num_hidden_layers=args.teacher_num_hidden_layers,
                                     use_moe=bool(args.teacher_use_moe))
        student = build_model(args, args.from_weight, role="the student (trained)")
        log(f"teacher: {describe_parameters(teacher)}; student: {describe_parameters(student)}")
        dataset = SFTDataset(args.data_path, load_tokenizer(), max_length=args.max_seq_len, cache_dir=args.cache_dir)
        return train(args, runtime, student, dataset, pad_collate,
                     make_distillation_loss(teacher, args.alpha, args.temperature))


if __name__ == "__main__":
    run_stage(main)
