"""What a newcomer meets on the command line: a mistake in a flag is one line and exit code 2
(trainers, eval_model.py), --help shows each real default once, in its group, without test hooks."""
import os
import subprocess
import sys

import pytest

from model.command_line import size_flags_problem
from trainer_helpers import REPO_ROOT, TEST_ENV, dirs


def test_size_flags_a_model_can_have():
    assert size_flags_problem(512, 8) is None and size_flags_problem(768, 16) is None and size_flags_problem(64, 2) is None
    assert "multiple of 16, e.g. 496 or 512" in size_flags_problem(500, 8)  # not divisible by 8 heads
    assert "65 dimensions" in size_flags_problem(520, 8) and "512 or 528" in size_flags_problem(520, 8)  # odd head
    assert "at least 1 layer" in size_flags_problem(512, 0)
    assert size_flags_problem(0, 8) is not None and size_flags_problem(8, 8) is not None


def parse_error(capsys, parse_args, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ": error: " in err, err  # one line, argparse style
    return err


@pytest.mark.parametrize("argv, expected", [
    (["--hidden_size", "500"], "--hidden_size 500: it must split evenly into 8 attention heads"),
    (["--hidden_size", "520"], "--hidden_size 520: its 8 attention heads would have 65 dimensions"),
    (["--num_hidden_layers", "0"], "--num_hidden_layers must be at least 1"),
    (["--data_path", "no/such.jsonl"], "--data_path no/such.jsonl: no such file"),
    (["--from_weight", "sft"], "--from_weight sft: not a stage (pretrain, full_sft"),
    (["--dtype", "fp16"], "argument --dtype: invalid choice: 'fp16'"),
    (["--batch_size", "many"], "argument --batch_size: invalid int value: 'many'"),
    (["--deepspeed", "nope.json"], "--deepspeed nope.json: no such config file"),
    (["--device", "cpu", "--dtype", "float16"], "--dtype float16 needs a CUDA device"),
])
def test_trainer_flag_mistakes_are_one_line_with_exit_code_2(capsys, argv, expected):
    from trainer.train_full_sft import parse_args
    assert expected in parse_error(capsys, parse_args, argv)


def test_eval_model_flag_mistakes_are_one_line_with_exit_code_2(capsys):
    import eval_model
    assert "--hidden_size 500" in parse_error(capsys, eval_model.parse_args, ["--hidden_size", "500"])
    assert "--model_mode" in parse_error(capsys, eval_model.parse_args, ["--model_mode", "7"])


@pytest.mark.parametrize("script", ["trainer/train_pretrain.py", "eval_model.py"])
def test_no_traceback_for_a_size_no_model_has(tmp_path, script):
    """End to end, from another directory: the one line, nothing else (no chained tracebacks)."""
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, script), "--hidden_size", "520",
                             *(dirs(tmp_path) if script.startswith("trainer") else [])],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, **TEST_ENV})
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "65 dimensions" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.fixture
def pretrain_help(capsys) -> str:
    from trainer.train_pretrain import parse_args
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines; compare with spaces folded


@pytest.mark.parametrize("flag, default", [
    ("--hidden_size HIDDEN_SIZE", "512"), ("--num_hidden_layers NUM_HIDDEN_LAYERS", "8"), ("--use_moe {0,1}", "0"),
    ("--epochs EPOCHS", "1"), ("--seed SEED", "42"), ("--accumulation_steps ACCUMULATION_STEPS", "8"),
    ("--device DEVICE", "cuda if available"), ("--out_dir OUT_DIR", os.path.join(REPO_ROOT, "out")),
])
def test_help_shows_each_real_default(pretrain_help, flag, default):
    entry = pretrain_help.rsplit(flag, 1)[1].split(" --", 1)[0]  # its entry, not the usage line
    assert f"(default: {default})" in entry and entry.count("default") == 1, entry


def test_help_has_no_empty_defaults_no_test_hooks_and_stage_flags_in_a_group(pretrain_help):
    assert "(default: None)" not in pretrain_help
    assert "debug" not in pretrain_help and "local_rank" not in pretrain_help
    assert "pretraining: --packing {0,1}" in pretrain_help
