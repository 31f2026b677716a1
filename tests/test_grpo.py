"""GRPO through its real command line with a tiny model: files and metrics, eval_model.py
loading the result, resume exactness, torchrun with 2 processes equal to 1 process, the user's
reward function and a tiny reward model driving the reward, the NaN guard, and (slow) a reward
that rises."""
import json
import math
import sys

import pytest

from test_rewards import make_tiny_reward_model
from trainer_helpers import (BIN, REPO_ROOT, TINY, dirs, free_port, max_difference, metrics, resume_model, run,
                             script, train)

# 2 prompts x 4 replies a step, replies of at most 12 tokens, from random init (fast; the
# rewards are still real: most random replies get a length or repetition penalty, some not)
GRPO = ["--from_weight", "none", "--num_generations", "4", "--max_gen_len", "12", "--learning_rate", "1e-3",
        "--log_interval", "1", "--save_interval", "100", "--seed", "3"]
ARITHMETIC_FIELDS = ("reward", "reward_std", "kl", "clip_frac", "response_len", "entropy", "rollout_tokens_per_s",
                     "update_tokens_per_s", "reward_correctness", "reward_format", "reward_length", "reward_repetition")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """4 steps of 2 prompts in one process (batch 1 x accumulation 2)."""
    tmp = tmp_path_factory.mktemp("grpo")
    result = train("train_grpo.py", tmp, *GRPO, "--batch_size", "1", "--accumulation_steps", "2", "--max_steps", "4")
    return tmp, result, metrics(tmp, "grpo_64")


def test_grpo_writes_weights_and_every_metric(reference):
    tmp, result, records = reference
    assert "training on the bundled demo file dataset/demo/rlaif.jsonl" in result.stdout
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:
        assert all(math.isfinite(record[k]) for k in ARITHMETIC_FIELDS), record
        total = sum(record[k] for k in record if k.startswith("reward_") and k != "reward_std")
        assert record["reward"] == pytest.approx(total, abs=1e-6)  # the parts add up to the reward
        assert 0 < record["response_len"] <= 12 and record["entropy"] > 0 and record["kl"] >= 0
        assert record["clip_frac"] == 0.0  # one update per rollout: the ratio is exactly 1
        assert record["logprob_gap"] < 1e-4  # the engine's log-probs agree with the update's (fp32)
    assert records[0]["kl"] == 0.0 and records[-1]["kl"] > 0  # the policy moves away from the reference
    # eval_model.py loads it as model mode 5 (and names that file when it is missing)
    ask = [sys.executable, f"{REPO_ROOT}/eval_model.py", "--model_mode", "5", "--hidden_size", "64",
           "--num_hidden_layers", "2", "--prompt", "1加1等于几？", "--temperature", "0", "--max_new_tokens", "8"]
    assert run([*ask, "--out_dir", str(tmp / "out")], cwd=tmp).stdout.strip()
    missing = run([*ask, "--out_dir", str(tmp / "nothing")], cwd=tmp, check=False)
    assert missing.returncode == 2 and "grpo_64.pth" in missing.stdout + missing.stderr


def test_grpo_resume_is_exact(reference, tmp_path):
    _, _, records = reference
    flags = [*GRPO, "--batch_size", "1", "--accumulation_steps", "2"]
    train("train_grpo.py", tmp_path, *flags, "--max_steps", "2")
    result = train("train_grpo.py", tmp_path, *flags, "--max_steps", "4", "--resume", "1")
    assert "resumed grpo_64" in result.stdout
    assert max_difference(resume_model(tmp_path, "grpo_64"), resume_model(reference[0], "grpo_64")) < 1e-6
    resumed = metrics(tmp_path, "grpo_64")
    assert [r["reward"] for r in resumed] == [r["reward"] for r in records]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in records], rel=1e-6, abs=1e-9)


def test_torchrun_two_processes_match_one_process(reference, tmp_path):
    run([f"{BIN}/torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), script("train_grpo.py"),
         *TINY, *dirs(tmp_path), *GRPO, "--batch_size", "1", "--accumulation_steps", "1", "--max_steps", "4"],
        cwd=tmp_path)
    assert max_difference(resume_model(tmp_path, "grpo_64"), resume_model(reference[0], "grpo_64")) < 1e-5
    two = metrics(tmp_path, "grpo_64")
    assert [r["reward"] for r in two] == pytest.approx([r["reward"] for r in reference[2]], abs=1e-6)


def test_reward_function_and_reward_model_drive_the_reward(tmp_path):
    (tmp_path / "mine.py").write_text(
        "def reward(prompt, response, sample):\n    return -len(response) / 10\n")
    folder = make_tiny_reward_model(tmp_path / "rm")
    train("train_grpo.py", tmp_path, *GRPO, "--batch_size", "2", "--max_steps", "2", "--reward_rules", "none",
          "--reward_fn", f"{tmp_path}/mine.py:reward", "--reward_model_path", folder)
    for record in metrics(tmp_path, "grpo_64"):
        assert not any(f"reward_{rule}" in record for rule in ("correctness", "format", "length", "repetition"))
        assert record["reward"] == pytest.approx(record["reward_function"] + record["reward_model"], abs=1e-6)
        assert record["reward_function"] < 0 and record["reward_model"] != 0
        assert record["reward_std"] > 0  # replies differ in reward: the advantages are not all 0


def test_cispo_and_a_nan_step(tmp_path):
    result = train("train_grpo.py", tmp_path, *GRPO, "--batch_size", "2", "--max_steps", "3", "--loss_type", "cispo",
                   "--debug_nan_steps", "2")
    assert "step 2: non-finite loss" in result.stdout
    assert [r["skipped"] for r in metrics(tmp_path, "grpo_64")] == [False, True, False]


def test_bad_flags_are_one_line_errors(tmp_path):
    result = train("train_grpo.py", tmp_path, *GRPO, "--num_generations", "1", check=False)
    assert result.returncode == 2 and "--num_generations must be at least 2" in result.stderr
    result = train("train_grpo.py", tmp_path, *GRPO, "--reward_fn", "nope.py:f", check=False)
    assert result.returncode == 2 and "no such file nope.py" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_reward_rises_for_a_tiny_sft_model_on_demo_arithmetic(tmp_path):
    """A tiny model SFT-trained on the demo chats (100 steps), then 30 GRPO steps on 8 demo
    arithmetic prompts (all 8 every step, 8 replies each) with the default rules: the share
    of correct sums rises well above its start (about 0.03 -> 0.18 with this seed), about
    30 s on 2 CPU cores."""
    rows = [json.loads(line) for line in open(f"{REPO_ROOT}/dataset/demo/rlaif.jsonl", encoding="utf-8")]
    arithmetic = [r for r in rows if r["answer"].isdigit()][:8]
    data = tmp_path / "arithmetic.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in arithmetic), encoding="utf-8")
    train("train_full_sft.py", tmp_path, "--from_weight", "none", "--max_seq_len", "64", "--batch_size", "16",
          "--learning_rate", "5e-3", "--warmup_iters", "5", "--max_steps", "100", "--save_interval", "1000")
    train("train_grpo.py", tmp_path, "--max_seq_len", "64", "--data_path", str(data), "--batch_size", "8",
          "--num_generations", "8", "--max_gen_len", "16", "--epochs", "30", "--learning_rate", "2e-3",
          "--beta", "0", "--save_interval", "1000")
    records = metrics(tmp_path, "grpo_64")
    first, last = records[:5], records[-5:]

    def mean(rs, key):
        return sum(r[key] for r in rs) / len(rs)
    assert mean(last, "reward") > mean(first, "reward") + 0.08
    assert mean(last, "reward_correctness") > 2 * mean(first, "reward_correctness")
