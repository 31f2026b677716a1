"""PPO through its real command line with a tiny model: actor and critic files, eval_model.py
loading the actor, exact resume, early stop on KL, and 2 processes under torchrun."""
import math
import sys

import pytest
import torch

from model.checkpoint import read_state_dict
from test_trainers import load_strict
from trainer_helpers import (BIN, REPO_ROOT, TINY, dirs, free_port, max_difference, metrics, resume_model, run,
                             script, train)

PPO = ["--from_weight", "none", "--batch_size", "4", "--mini_batch_size", "2", "--max_gen_len", "12",
       "--learning_rate", "1e-3", "--critic_learning_rate", "1e-3", "--log_interval", "1", "--save_interval", "100",
       "--seed", "5"]
FIELDS = ("reward", "reward_std", "kl", "clip_frac", "response_len", "entropy", "actor_loss", "value_loss",
          "approx_kl", "rollout_tokens_per_s", "update_tokens_per_s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ppo")
    train("train_ppo.py", tmp, *PPO, "--max_steps", "4")
    return tmp, metrics(tmp, "ppo_actor_64")


def test_ppo_writes_actor_and_critic(reference):
    tmp, records = reference
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:
        assert all(math.isfinite(record[k]) for k in FIELDS), record
        assert record["updates"] == 4  # 2 passes x (4 replies / mini-batches of 2)
    assert any(r["value_loss"] > 0 for r in records) and any(r["kl"] != 0 for r in records[1:])
    actor = load_strict(tmp / "out" / "ppo_actor_64.pth")
    critic = read_state_dict(str(tmp / "out" / "ppo_critic_64.pth"))
    expected = {k for k in actor.state_dict() if k != "lm_head.weight"} | {"value_head.weight", "value_head.bias"}
    assert set(critic) == expected
    assert critic["value_head.weight"].abs().sum() > 0  # the critic learned (its head starts at 0)
    ask = [sys.executable, f"{REPO_ROOT}/eval_model.py", "--model_mode", "6", "--out_dir", str(tmp / "out"),
           "--hidden_size", "64", "--num_hidden_layers", "2", "--prompt", "1加1等于几？", "--temperature", "0",
           "--max_new_tokens", "8"]
    assert run(ask, cwd=tmp).stdout.strip()


def test_ppo_resume_is_exact(reference, tmp_path):
    train("train_ppo.py", tmp_path, *PPO, "--max_steps", "2")
    result = train("train_ppo.py", tmp_path, *PPO, "--max_steps", "4", "--resume", "1")
    assert "resumed ppo_actor_64" in result.stdout
    assert max_difference(resume_model(tmp_path, "ppo_actor_64"), resume_model(reference[0], "ppo_actor_64")) < 1e-6
    assert [r["reward"] for r in metrics(tmp_path, "ppo_actor_64")] == [r["reward"] for r in reference[1]]


def test_early_stop_on_kl(tmp_path):
    # threshold 0: the first mini-batch (ratio exactly 1, KL 0) updates, the next sees KL > 0 and stops
    train("train_ppo.py", tmp_path, *PPO, "--max_steps", "2", "--early_stop_kl", "0")
    assert [r["updates"] for r in metrics(tmp_path, "ppo_actor_64")] == [1, 1]


def test_ppo_under_torchrun(tmp_path):
    run([f"{BIN}/torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), script("train_ppo.py"),
         *TINY, *dirs(tmp_path), *PPO, "--batch_size", "2", "--mini_batch_size", "1", "--max_steps", "2"], cwd=tmp_path)
    records = metrics(tmp_path, "ppo_actor_64")
    assert [r["updates"] for r in records] == [4, 4] and all(math.isfinite(r["actor_loss"]) for r in records)
    state = torch.load(tmp_path / "checkpoints" / "ppo_actor_64_resume.pth", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 2


def test_bad_mini_batch_is_a_flag_error(tmp_path):
    result = train("train_ppo.py", tmp_path, *PPO, "--mini_batch_size", "8", check=False)
    assert result.returncode == 2 and "--mini_batch_size must be in 1..--batch_size (4)" in result.stderr
