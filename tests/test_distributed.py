"""Exactness across runs: resume, torchrun DDP (one node and two nodes on loopback) and
DeepSpeed ZeRO-2/3 all reproduce one reference run of train_pretrain.py."""
import os
import subprocess

import pytest
import torch

from model.checkpoint import config_from_sizes, load_weights
from model.model_minimind import MiniMindForCausalLM
from trainer_helpers import (BIN, TEST_ENV, TINY, dirs, free_port, max_difference, metrics, resume_model, run,
                                   script, train)

# 4 optimizer steps of 4 samples: batch 2 x accumulation 2 in one process, or batch 2 x 2 ranks
STEPS = ["--epochs", "1", "--batch_size", "2", "--log_interval", "1", "--save_interval", "100", "--seed", "7"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    train("train_pretrain.py", tmp, *STEPS, "--accumulation_steps", "2", "--max_steps", "4")
    return {"model": resume_model(tmp), "losses": [m["loss"] for m in metrics(tmp, "pretrain_64")]}


def test_resume_continues_exactly(reference, tmp_path):
    train("train_pretrain.py", tmp_path, *STEPS, "--accumulation_steps", "2", "--max_steps", "2")
    assert len(metrics(tmp_path, "pretrain_64")) == 2
    result = train("train_pretrain.py", tmp_path, *STEPS, "--accumulation_steps", "2", "--max_steps", "4",
                   "--resume", "1")
    assert "resumed pretrain_64" in result.stdout
    assert max_difference(resume_model(tmp_path), reference["model"]) < 1e-6
    # the metrics file was appended to: steps 1-4 once each, same losses as the uninterrupted run
    records = metrics(tmp_path, "pretrain_64")
    assert [m["step"] for m in records] == [1, 2, 3, 4]
    assert [m["loss"] for m in records] == pytest.approx(reference["losses"], rel=1e-6)


def test_torchrun_two_processes_match_one_process_with_twice_the_accumulation(reference, tmp_path):
    run([f"{BIN}/torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), script("train_pretrain.py"),
         *TINY, *dirs(tmp_path), *STEPS, "--accumulation_steps", "1", "--max_steps", "4"], cwd=tmp_path)
    assert max_difference(resume_model(tmp_path), reference["model"]) < 1e-5
    assert [m["loss"] for m in metrics(tmp_path, "pretrain_64")] == pytest.approx(reference["losses"], rel=1e-5)


def test_two_nodes_on_loopback(reference, tmp_path):
    port = str(free_port())
    nodes = [subprocess.Popen(
        [f"{BIN}/torchrun", "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
         "--master_addr", "127.0.0.1", "--master_port", port, script("train_pretrain.py"),
         *TINY, *dirs(tmp_path), *STEPS, "--accumulation_steps", "1", "--max_steps", "4"],
        cwd=tmp_path, env={**os.environ, **TEST_ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "2 process(es)" in outputs[0]
    assert max_difference(resume_model(tmp_path), reference["model"]) < 1e-5


def load_strict(path) -> MiniMindForCausalLM:
    model = MiniMindForCausalLM(config_from_sizes(64, 2))
    load_weights(model, str(path))
    return model


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_zero_with_two_cpu_ranks(reference, tmp_path, zero):
    """`deepspeed --num_gpus 2` on a CPU box (gloo), bf16, through deepspeed.initialize."""
    run([f"{BIN}/deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), script("train_pretrain.py"),
         *TINY, *dirs(tmp_path), *STEPS, "--accumulation_steps", "1", "--max_steps", "4",
         "--deepspeed", f"{script('ds_zero%d.json' % zero)}", "--dtype", "bfloat16"], cwd=tmp_path, timeout=400)
    model = load_strict(tmp_path / "out" / "pretrain_64.pth")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # same data and optimizer as the fp32 reference: the bf16 losses follow it closely
    losses = [m["loss"] for m in metrics(tmp_path, "pretrain_64")]
    assert losses == pytest.approx(reference["losses"], abs=0.02)
    assert losses[-1] < losses[0]
    saved = {k: v.float() for k, v in model.state_dict().items()}
    assert max_difference(saved, reference["model"]) < 0.02
