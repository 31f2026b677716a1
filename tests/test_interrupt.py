"""Ctrl-C and SIGTERM during training: the run finishes its step, saves the resume state and the
weights, says how to continue in one line and exits with 130; `--resume 1` then continues
exactly (alone and under torchrun, where one rank's signal stops every rank at the same step)."""
import signal
import subprocess
import sys
import time

import pytest
import torch

from trainer_helpers import (BIN, TEST_ENV, TINY, dirs, free_port, max_difference, metrics, resume_model, run,
                             script, train)

STEPS = ["--epochs", "1", "--batch_size", "2", "--log_interval", "1", "--save_interval", "100", "--seed", "7",
         "--max_steps", "4"]
MESSAGE = "interrupted at step {}; continue with the same command plus --resume 1"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    train("train_pretrain.py", tmp, *STEPS, "--accumulation_steps", "2")
    return resume_model(tmp)


def test_interrupt_saves_and_resume_continues_exactly(reference, tmp_path):
    command = [*STEPS, "--accumulation_steps", "2", "--debug_interrupt_at_step", "2"]
    result = train("train_pretrain.py", tmp_path, *command, check=False)
    assert result.returncode == 130, result.stderr[-2000:]
    assert MESSAGE.format(2) in result.stdout and "Traceback" not in result.stderr
    assert torch.load(tmp_path / "checkpoints" / "pretrain_64_resume.pth", weights_only=True)["step"] == 2
    assert (tmp_path / "out" / "pretrain_64.pth").is_file()  # the weights are saved as well
    assert [m["step"] for m in metrics(tmp_path, "pretrain_64")] == [1, 2]

    train("train_pretrain.py", tmp_path, *command, "--resume", "1")
    assert max_difference(resume_model(tmp_path), reference) < 1e-6
    assert [m["step"] for m in metrics(tmp_path, "pretrain_64")] == [1, 2, 3, 4]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_from_outside_stops_after_a_saved_step(tmp_path, sig):
    """A real signal at an unknown moment: the saved state is exactly the steps that were logged."""
    command = [sys.executable, script("train_pretrain.py"), *TINY, *dirs(tmp_path), "--batch_size", "2",
               "--max_steps", "100000", "--save_interval", "100000", "--log_interval", "1"]
    process = subprocess.Popen(command, cwd=tmp_path, env={**__import__("os").environ, **TEST_ENV},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics_file = tmp_path / "out" / "pretrain_64_metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics_file.is_file() and metrics_file.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    steps = [m["step"] for m in metrics(tmp_path, "pretrain_64")]
    assert len(steps) >= 2 and steps == list(range(1, len(steps) + 1))
    assert MESSAGE.format(steps[-1]) in stdout and "Traceback" not in stderr
    state = torch.load(tmp_path / "checkpoints" / "pretrain_64_resume.pth", weights_only=True)
    assert state["step"] == steps[-1]


def test_torchrun_every_rank_stops_at_the_same_step(reference, tmp_path):
    """Only the last rank gets the signal; rank 0 stops with it, and the resumed run matches."""
    def torchrun(*extra):
        return run([f"{BIN}/torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()),
                    script("train_pretrain.py"), *TINY, *dirs(tmp_path), *STEPS, "--accumulation_steps", "1",
                    "--debug_interrupt_at_step", "2", *extra], cwd=tmp_path, check=False)
    result = torchrun()
    assert result.returncode != 0
    assert MESSAGE.format(2) in result.stdout + result.stderr
    assert torch.load(tmp_path / "checkpoints" / "pretrain_64_resume.pth", weights_only=True)["step"] == 2
    result = torchrun("--resume", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert max_difference(resume_model(tmp_path), reference) < 1e-5
