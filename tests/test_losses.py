"""The trainers' pure parts, checked against hand computations: losses, LR schedule, data order,
and the metrics plot."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from trainer.train_distill_reason import REASONING_TAGS, tag_positions, tag_token_ids
from trainer.train_distillation import distillation_kl
from trainer.train_dpo import dpo_loss, sequence_log_probs
from model.checkpoint import REPO_ROOT
from trainer.cli import parse_step_list
from trainer.data_order import StepBatchSampler
from trainer.losses import masked_cross_entropy
from trainer.loop import learning_rate_at
from trainer.stage import load_tokenizer


def test_dpo_loss_matches_hand_computation():
    # two pairs of fixed mean log-probs: policy chosen/rejected, reference chosen/rejected
    policy_c, policy_r = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.5])
    ref_c, ref_r = torch.tensor([-1.5, -2.5]), torch.tensor([-2.0, -1.0])
    beta = 0.1
    loss, chosen, rejected = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta)
    # pair 1: ((-1 + 1.5) - (-3 + 2)) = 1.5 ; pair 2: ((-2 + 2.5) - (-1.5 + 1)) = 1.0
    expected = -(math.log(1 / (1 + math.exp(-0.1 * 1.5))) + math.log(1 / (1 + math.exp(-0.1 * 1.0)))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert chosen.tolist() == pytest.approx([0.05, 0.05])
    assert rejected.tolist() == pytest.approx([-0.1, -0.05])


def test_sequence_log_probs_is_the_masked_per_token_mean():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    targets = torch.randint(0, 7, (2, 4))
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    log_probs = torch.log_softmax(logits, -1)
    row0 = (log_probs[0, 1, targets[0, 1]] + log_probs[0, 2, targets[0, 2]]) / 2
    row1 = sum(log_probs[1, t, targets[1, t]] for t in range(4)) / 4
    got = sequence_log_probs(logits.bfloat16(), targets, mask)  # bf16 logits are upcast inside
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx([row0.item(), row1.item()], abs=0.05)
    assert sequence_log_probs(logits, targets, mask).tolist() == pytest.approx([row0.item(), row1.item()], rel=1e-5)


def test_masked_cross_entropy_ignores_masked_positions_and_weighs_tokens():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 5)
    targets = torch.tensor([[1, 2, 3]])
    mask = torch.tensor([[1, 0, 1]])
    ce = F.cross_entropy(logits[0], targets[0], reduction="none")
    assert masked_cross_entropy(logits, targets, mask).item() == pytest.approx((ce[0] + ce[2]).item() / 2, rel=1e-6)
    weights = torch.tensor([[10.0, 0.0, 1.0]])  # the denominator stays the mask count (MiniMind)
    assert masked_cross_entropy(logits, targets, mask, weights).item() == pytest.approx(
        (10 * ce[0] + ce[2]).item() / 2, rel=1e-6)


def test_distillation_kl_is_zero_for_identical_models_and_matches_definition():
    torch.manual_seed(0)
    student, teacher = torch.randn(1, 2, 5), torch.randn(1, 2, 5)
    mask = torch.tensor([[1, 0]])
    assert distillation_kl(teacher, teacher, mask, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    T = 2.0
    p = torch.softmax(teacher[0, 0] / T, -1)
    q = torch.softmax(student[0, 0] / T, -1)
    expected = T * T * (p * (p.log() - q.log())).sum().item()
    assert distillation_kl(student, teacher, mask, T).item() == pytest.approx(expected, rel=1e-5)


def test_tag_positions_marks_every_token_of_complete_tags_only():
    tags = [[5, 6, 7], [8]]
    targets = torch.tensor([[1, 5, 6, 7, 2, 5, 6, 9, 8]])
    marked = tag_positions(targets, tags)
    assert marked[0].tolist() == [False, True, True, True, False, False, False, False, True]


def test_reasoning_tags_are_found_in_the_demo_reasoning_data():
    from dataset.lm_dataset import SFTDataset
    tokenizer = load_tokenizer()
    tags = tag_token_ids(tokenizer)
    assert all(tags) and len(tags) == len(REASONING_TAGS)
    dataset = SFTDataset(os.path.join(REPO_ROOT, "dataset", "demo", "r1_mix.jsonl"), tokenizer, max_length=512)
    _, targets, mask = dataset[0]
    marked = tag_positions(targets[None], tags)[0] & mask.bool()
    # the answer holds <think>, </think>, <answer> and </answer> once each (closing tag may be truncated)
    expected_at_least = sum(len(t) for t in tags[:3])
    assert int(marked.sum()) >= expected_at_least


def minimind2_lr(step, total, lr):
    """MiniMind2's get_lr (trainer/train_pretrain.py at 5ffde04), written out independently."""
    return lr / 10 + 0.5 * lr * (1 + math.cos(math.pi * step / total))


def test_default_learning_rate_is_minimind2s_curve():
    lr, total = 5e-4, 200
    assert learning_rate_at(0, total, lr) == pytest.approx(1.1 * lr)
    assert learning_rate_at(total // 2, total, lr) == pytest.approx(0.6 * lr)
    assert learning_rate_at(total, total, lr) == pytest.approx(lr / 10)
    for step in (0, 1, 37, total // 2, total - 1, total):
        assert learning_rate_at(step, total, lr) == pytest.approx(minimind2_lr(step, total, lr), rel=1e-12)


def test_warmup_ramps_up_to_the_curve_then_leaves_it_unchanged():
    lr, total, warmup = 1e-3, 100, 10
    assert learning_rate_at(0, total, lr, warmup) == pytest.approx(minimind2_lr(0, total, lr) / warmup)
    assert learning_rate_at(4, total, lr, warmup) == pytest.approx(minimind2_lr(4, total, lr) * 5 / warmup)
    for step in (9, 10, 50, total):  # the last warm-up step reaches the curve; after it, no change
        assert learning_rate_at(step, total, lr, warmup) == pytest.approx(minimind2_lr(step, total, lr))
    ramp = [learning_rate_at(s, total, lr, warmup) for s in range(warmup)]
    assert all(a < b for a, b in zip(ramp, ramp[1:]))
    decay = [learning_rate_at(s, total, lr, warmup) for s in range(warmup - 1, total + 1)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def steps_of(sampler_factory, world_size):
    """Sample-index sets per optimizer step, merged over ranks."""
    per_rank = [list(sampler_factory(rank)) for rank in range(world_size)]
    micro_per_step = len(per_rank[0]) // sampler_factory(0).steps
    steps = []
    for s in range(sampler_factory(0).steps):
        merged = []
        for rank in range(world_size):
            for micro in per_rank[rank][s * micro_per_step:(s + 1) * micro_per_step]:
                merged += micro
        steps.append(sorted(merged))
    return steps


def test_step_sampler_gives_two_ranks_the_same_steps_as_one_process_accumulating():
    one = steps_of(lambda r: StepBatchSampler(50, 3, 2, r, 1, seed=1, epoch=0), 1)
    two = steps_of(lambda r: StepBatchSampler(50, 3, 1, r, 2, seed=1, epoch=0), 2)
    assert one == two and len(one) == 50 // 6


def test_step_sampler_resumes_at_a_sample_count_even_with_another_world_size():
    full = [i for batch in StepBatchSampler(40, 2, 1, 0, 1, seed=3, epoch=1) for i in batch]
    # 1 process stopped after 6 steps (12 samples); 2 processes take over from sample 12
    rest = steps_of(lambda r: StepBatchSampler(40, 2, 1, r, 2, seed=3, epoch=1, skip_samples=12), 2)
    assert sorted(i for step in rest for i in step) == sorted(full[12:])
    assert StepBatchSampler(40, 2, 1, 0, 1, seed=3, epoch=2).__iter__().__next__() != full[:2]  # new epoch, new order


def test_parse_step_list():
    assert parse_step_list("3, 7-9") == {3, 7, 8, 9}
    assert parse_step_list("") == set()


def test_plot_metrics_writes_a_png_and_names_bad_lines(tmp_path):
    from scripts.plot_metrics import main as plot_main
    metrics = tmp_path / "pretrain_64_metrics.jsonl"
    records = [{"step": s, "epoch": 1, "loss": 5.0 / s, "lr": 1e-3 * (1 - s / 20), "tokens_per_s": 100.0}
               for s in range(1, 11)]
    records.append({"step": 11, "epoch": 1, "loss": float("nan"), "lr": 1e-4, "tokens_per_s": 100.0})
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = plot_main([str(metrics), "--smooth", "3"])
    assert out == str(tmp_path / "pretrain_64_metrics.png")
    data = open(out, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    bad = tmp_path / "bad_metrics.jsonl"
    bad.write_text(json.dumps(records[0]) + "\n{not json\n")
    with pytest.raises(SystemExit, match=r"bad_metrics.jsonl:2"):
        plot_main([str(bad)])


def test_plot_legend_lists_stages_in_training_order_beside_the_curves(tmp_path):
    from scripts.plot_metrics import in_stage_order, make_figure, metrics_files, read_metrics, run_labels
    for i, name in enumerate(["full_sft_64", "lora_identity_64", "pretrain_64", "reason_64", "rlhf_64"]):
        (tmp_path / f"{name}_metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "loss": 5.0 - i - s / 10, "lr": 1e-3}) + "\n" for s in range(1, 6)))
    files = in_stage_order(metrics_files([str(tmp_path)]))
    labels = run_labels(files)
    assert labels == ["pretrain_64", "full_sft_64", "rlhf_64", "reason_64", "lora_identity_64"]
    fig = make_figure({label: read_metrics(path) for label, path in zip(labels, files)})
    fig.canvas.draw()
    for ax in fig.axes:
        legend = ax.get_legend()
        assert [t.get_text() for t in legend.get_texts()] == labels
        renderer = fig.canvas.get_renderer()
        assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1  # not over the curves


def test_plot_adds_a_held_out_panel_for_runs_that_evaluated(tmp_path):
    from scripts.plot_metrics import make_figure
    evaluated = [{"step": s, "loss": 5.0, "lr": 1e-3, **({"eval_bpb": 4.0 - s / 10} if s % 2 == 0 else {})}
                 for s in range(1, 7)]
    plain = [{"step": s, "loss": 4.0, "lr": 1e-3} for s in range(1, 7)]
    fig = make_figure({"pretrain_64": evaluated, "full_sft_64": plain})
    assert len(fig.axes) == 3
    lines = fig.axes[2].get_lines()
    assert [line.get_label() for line in lines] == ["pretrain_64"]
    assert list(lines[0].get_xdata()) == [2, 4, 6] and list(lines[0].get_ydata()) == pytest.approx([3.8, 3.6, 3.4])
    assert len(make_figure({"full_sft_64": plain}).axes) == 2  # no evaluation, no empty panel


def test_length_grouping_keeps_resume_and_rank_equivalence_and_cuts_padding():
    lengths = torch.randint(5, 500, (300,)).tolist()
    grouped = lambda world, accum, skip=0: (lambda r: StepBatchSampler(300, 4, accum, r, world, seed=0, epoch=0,
                                                                        skip_samples=skip, lengths=lengths,
                                                                        group_size=64))
    assert steps_of(grouped(1, 2), 1) == steps_of(grouped(2, 1), 2)
    full = [i for batch in grouped(1, 1)(0) for i in batch]
    resumed = sorted(i for s in steps_of(grouped(2, 1, skip=40), 2) for i in s)
    assert resumed == sorted(full[40:40 + len(resumed)]) and len(resumed) == (300 - 40) // 8 * 8

    def padding(batches):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)
    plain = list(StepBatchSampler(300, 4, 1, 0, 1, seed=0, epoch=0))
    assert padding(list(grouped(1, 1)(0))) < padding(plain) / 3
