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
# held-out evaluation at steps 2 and 4: shared out among the ranks, the same numbers as one process
EVAL = ["--eval_interval", "2", "--eval_documents", "6"]


def held_out(tmp) -> list[float]:
    """step, eval_bpb, eval_loss of each evaluated step, one flat list"""
    return [x for m in metrics(tmp, "pretrain_64") if "eval_bpb" in m for x in (m["step"], m["eval_bpb"], m["eval_loss"])]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    train("train_pretrain.py", tmp, *STEPS, *EVAL, "--accumulation_steps", "2", "--max_steps", "4")
    return {"model": resume_model(tmp), "losses": [m["loss"] for m in metrics(tmp, "pretrain_64")],
            "held_out": held_out(tmp)}


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
         *TINY, *dirs(tmp_path), *STEPS, *EVAL, "--accumulation_steps", "1", "--max_steps", "4"], cwd=tmp_path)
    assert max_difference(resume_model(tmp_path), reference["model"]) < 1e-5
    assert [m["loss"] for m in metrics(tmp_path, "pretrain_64")] == pytest.approx(reference["losses"], rel=1e-5)
    assert reference["held_out"][::3] == [2, 4]
    assert held_out(tmp_path) == pytest.approx(reference["held_out"], rel=1e-5)


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
         *TINY, *dirs(tmp_path), *STEPS, *EVAL, "--accumulation_steps", "1", "--max_steps", "4",
         "--deepspeed", f"{script('ds_zero%d.json' % zero)}", "--dtype", "bfloat16"], cwd=tmp_path, timeout=400)
    model = load_strict(tmp_path / "out" / "pretrain_64.pth")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # same data and optimizer as the fp32 reference: the bf16 losses follow it closely
    losses = [m["loss"] for m in metrics(tmp_path, "pretrain_64")]
    assert losses == pytest.approx(reference["losses"], abs=0.02)
    assert losses[-1] < losses[0]
    saved = {k: v.float() for k, v in model.state_dict().items()}
    assert max_difference(saved, reference["model"]) < 0.02
    # every rank evaluated its share with ZeRO's sharded weights (equal forward passes, no hang)
    assert held_out(tmp_path) == pytest.approx(reference["held_out"], abs=0.05)


def rng_round_trip(rank: int, world_size: int, port: int, folder: str):
    """One rank: seed its own stream, save every rank's streams the way a resume state does, draw,
    scramble, restore from the saved list, draw again."""
    import torch.distributed as dist
    from trainer.checkpoints import gather_rng_states, restore_rng_state
    from trainer.processes import Runtime, seed_everything
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    runtime = Runtime(rank, rank, world_size, torch.device("cpu"), use_deepspeed=False)
    seed_everything(100 + rank)
    states = gather_rng_states(runtime)
    expected = torch.rand(4)
    seed_everything(0)
    restore_rng_state(states, runtime)
    torch.save({"states": len(states), "expected": expected, "got": torch.rand(4)}, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


def test_resume_restores_each_ranks_own_random_stream(tmp_path):
    """Each rank continues its own dropout stream, not rank 0's (two gloo ranks)."""
    import torch.multiprocessing as mp
    mp.spawn(rng_round_trip, args=(2, free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(r["states"] == 2 and torch.equal(r["got"], r["expected"]) for r in ranks)
    assert not torch.equal(ranks[0]["got"], ranks[1]["got"])


def test_a_rank_the_saved_run_did_not_have_keeps_its_seed():
    from trainer.checkpoints import gather_rng_states, restore_rng_state
    from trainer.processes import Runtime, seed_everything
    single = Runtime(0, 0, 1, torch.device("cpu"), use_deepspeed=False)
    seed_everything(1)
    saved = gather_rng_states(single)
    seed_everything(2)
    expected = torch.rand(4)
    seed_everything(2)
    restore_rng_state(saved, Runtime(1, 1, 2, torch.device("cpu"), use_deepspeed=False))  # rank 1 of a larger world
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MINIMIND_COMPILE_TESTS") != "1",
                    reason="torch.compile on this CPU takes minutes; set MINIMIND_COMPILE_TESTS=1 to run it")
def test_compile_goes_through_deepspeed(tmp_path):
    """--compile 1 with --deepspeed is not ignored: the DeepSpeed engine compiles the model."""
    result = train("train_pretrain.py", tmp_path, "--batch_size", "2", "--max_steps", "1",
                   "--deepspeed", script("ds_zero2.json"), "--compile", "1", timeout=600)
    assert "torch.compile through DeepSpeed" in result.stdout
    load_strict(tmp_path / "out" / "pretrain_64.pth")
