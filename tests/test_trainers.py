"""Every stage through its real command line, on the bundled demo data with a tiny model:
files under the right names, loadable with strict=True, the stage chain with default
--from_weight, the non-finite guard, LoRA leaving the base untouched, and (slow) a tiny model
that learns the demo identity answer."""
import json
import math
import os

import pytest
import torch

from model.checkpoint import config_from_sizes, load_weights, lora_path, read_state_dict, save_weights
from model.model_lora import apply_lora, load_lora
from model.model_minimind import MiniMindForCausalLM
from trainer_helpers import REPO_ROOT, TINY, dirs, max_difference, metrics, resume_model, train, write_chat_data

FEW_STEPS = ["--batch_size", "2", "--max_steps", "2", "--log_interval", "1"]
EVAL_EVERY_STEP = ["--eval_interval", "1", "--eval_documents", "4"]


def load_strict(path, hidden=64, layers=2, use_moe=False) -> MiniMindForCausalLM:
    model = MiniMindForCausalLM(config_from_sizes(hidden, layers, use_moe))
    load_weights(model, str(path))  # strict: every key, every shape
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return model


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """pretrain -> full_sft -> dpo -> reason, each stage starting from the previous one by default."""
    tmp = tmp_path_factory.mktemp("chain")
    logs = {
        "pretrain": train("train_pretrain.py", tmp, *FEW_STEPS, "--use_wandb", "1", *EVAL_EVERY_STEP,
                          env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"}),
        "full_sft": train("train_full_sft.py", tmp, *FEW_STEPS, "--learning_rate", "1e-4"),
        "rlhf": train("train_dpo.py", tmp, *FEW_STEPS, "--learning_rate", "1e-5", "--eval_interval", "2",
                      "--eval_data", os.path.join(REPO_ROOT, "dataset", "demo", "sft.jsonl"), "--eval_documents", "3"),
        "reason": train("train_distill_reason.py", tmp, *FEW_STEPS, "--learning_rate", "1e-5"),
    }
    return tmp, logs


@pytest.mark.parametrize("stage, previous", [("pretrain", None), ("full_sft", "pretrain"), ("rlhf", "full_sft"),
                                             ("reason", "rlhf")])
def test_stage_chain_writes_loadable_weights(chain, stage, previous):
    tmp, logs = chain
    model = load_strict(tmp / "out" / f"{stage}_64.pth")
    assert (tmp / "checkpoints" / f"{stage}_64_resume.pth").is_file()
    records = metrics(tmp, f"{stage}_64")
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["lr"] > 0 and r["tokens_per_s"] > 0 for r in records)
    if previous:  # started from the previous stage's file, and changed it
        assert f"loaded {previous} weights" in logs[stage].stdout
        before = read_state_dict(str(tmp / "out" / f"{previous}_64.pth"))
        after = model.state_dict()
        assert any(not torch.equal(before[k], after[k].half()) for k in before)


def test_demo_fallback_is_announced_in_one_line(chain):
    _, logs = chain
    lines = [l for l in logs["pretrain"].stdout.splitlines() if "not found" in l]
    assert len(lines) == 1 and "dataset/demo/pretrain.jsonl" in lines[0] and "minimind_dataset" in lines[0]


def test_wandb_logs_offline(chain):
    tmp, _ = chain
    runs = list((tmp / "out" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_held_out_bits_per_byte_rows_are_written(chain):
    """--eval_interval 1: every step's record holds eval_bpb and eval_loss, and the last one is what
    evaluation.bpb measures on the run's final weights (the exact fp32 copy in the resume state)."""
    from evaluation.bpb import bits_per_byte
    from evaluation.data import read_documents
    from trainer.stage import load_tokenizer
    tmp, logs = chain
    records = metrics(tmp, "pretrain_64")
    assert [("eval_bpb" in r, "eval_loss" in r) for r in records] == [(True, True)] * 2
    model = MiniMindForCausalLM(config_from_sizes(64, 2, False))
    model.load_state_dict(resume_model(tmp))
    texts = read_documents(os.path.join(REPO_ROOT, "dataset", "demo", "eval_text.jsonl"))[:4]
    direct = bits_per_byte(model.eval(), load_tokenizer(), texts, max_seq_len=128)
    assert records[-1]["eval_bpb"] == pytest.approx(direct.bpb, rel=1e-5)
    assert records[-1]["eval_loss"] == pytest.approx(direct.loss, rel=1e-5)
    assert "eval_bpb:" in logs["pretrain"].stdout  # in the log line too
    # a chat stage evaluates chat lines (rendered with the chat template) every 2nd step only
    assert ["eval_bpb" in r for r in metrics(tmp, "rlhf_64")] == [False, True]


def test_dpo_logs_reward_margin_and_accuracy(chain):
    tmp, logs = chain
    assert "as the policy (trained)" in logs["rlhf"].stdout and "as the frozen reference" in logs["rlhf"].stdout
    for record in metrics(tmp, "rlhf_64"):
        assert 0.0 <= record["reward_accuracy"] <= 1.0 and math.isfinite(record["reward_margin"])


def test_lora_stage_saves_only_the_adapter(chain):
    tmp, _ = chain
    result = train("train_lora.py", tmp, *FEW_STEPS, "--lora_rank", "4", "--learning_rate", "1e-3")
    assert "trainable parameters" in result.stdout and "every base weight is frozen" in result.stdout
    adapter = read_state_dict(lora_path(str(tmp / "out"), "lora_identity", 64))
    assert adapter and all(".lora." in k for k in adapter)
    model = load_strict(tmp / "out" / "full_sft_64.pth")
    apply_lora(model, rank=4)
    load_lora(model, lora_path(str(tmp / "out"), "lora_identity", 64))  # strict: same layers and rank
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if k.endswith("lora.B.weight"))


def test_lora_stage_changes_no_base_weight(chain):
    """In-process, to look at the trained model itself: every base weight equals the file it came from."""
    from trainer.train_lora import main as lora_main
    tmp, _ = chain
    model = lora_main([*TINY, *dirs(tmp), *FEW_STEPS, "--lora_name", "lora_medical", "--lora_rank", "4",
                       "--learning_rate", "1e-2"])
    base = read_state_dict(str(tmp / "out" / "full_sft_64.pth"))
    trained = model.state_dict()
    assert all(torch.equal(trained[k].half(), base[k]) for k in base)
    assert any(trained[k].abs().sum() > 0 for k in trained if k.endswith("lora.B.weight"))


def test_distillation_from_a_larger_teacher(chain):
    tmp, _ = chain
    teacher = MiniMindForCausalLM(config_from_sizes(128, 2))  # a real (untrained) larger teacher file
    save_weights(teacher, str(tmp / "out" / "full_sft_128.pth"))
    train("train_distillation.py", tmp, *FEW_STEPS, "--teacher_hidden_size", "128",
          "--teacher_num_hidden_layers", "2", "--alpha", "0.3", "--temperature", "2")
    load_strict(tmp / "out" / "full_dist_64.pth")
    for record in metrics(tmp, "full_dist_64"):
        assert record["loss"] == pytest.approx(0.3 * record["ce"] + 0.7 * record["kl"], rel=1e-4)


def test_missing_from_weight_names_the_script_that_makes_it(tmp_path):
    from model.command_line import UserError
    from trainer.train_full_sft import main as sft_main
    with pytest.raises(UserError, match=r"pretrain_64.pth not found.*python trainer/train_pretrain.py"):
        sft_main([*TINY, *dirs(tmp_path), *FEW_STEPS])


def test_save_weight_names_every_file_of_a_run_and_from_weight_loads_it(tmp_path, capsys):
    """A second pretraining run from the first (quickstart --tools 1 does this) writes its own
    weights, metrics and resume state instead of overwriting the first run's."""
    from trainer.train_full_sft import main as sft_main
    from trainer.train_pretrain import main as pretrain_main
    pretrain_main([*TINY, *dirs(tmp_path), *FEW_STEPS])
    first = (tmp_path / "out" / "pretrain_64.pth").read_bytes()
    pretrain_main([*TINY, *dirs(tmp_path), *FEW_STEPS, "--from_weight", "pretrain", "--save_weight", "pretrain_long"])
    assert (tmp_path / "out" / "pretrain_64.pth").read_bytes() == first
    load_strict(tmp_path / "out" / "pretrain_long_64.pth")
    assert len(metrics(tmp_path, "pretrain_long_64")) == len(metrics(tmp_path, "pretrain_64"))
    assert (tmp_path / "checkpoints" / "pretrain_long_64_resume.pth").is_file()
    sft_main([*TINY, *dirs(tmp_path), *FEW_STEPS, "--from_weight", "pretrain_long"])
    captured = capsys.readouterr()
    assert "loaded pretrain_long weights from" in captured.err + captured.out


def test_from_weight_neither_a_stage_nor_a_saved_name_is_a_flag_error(tmp_path, capsys):
    from trainer.train_full_sft import parse_args
    with pytest.raises(SystemExit):
        parse_args([*TINY, *dirs(tmp_path), "--from_weight", "pretrain_lng"])
    err = capsys.readouterr().err
    assert "--from_weight pretrain_lng: not a stage" in err and "pretrain_lng_64.pth" in err


def test_bad_data_line_is_reported_with_file_and_line(tmp_path):
    data = tmp_path / "broken.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "fine too"}\n{not json}\n')
    result = train("train_pretrain.py", tmp_path, *FEW_STEPS, "--data_path", str(data), check=False)
    assert result.returncode == 2 and f"{data}:3:" in result.stderr and "Traceback" not in result.stderr


def test_dense_and_moe_adapters_of_one_width_do_not_overwrite_each_other(tmp_path):
    train("train_lora.py", tmp_path, *FEW_STEPS, "--use_moe", "1", "--from_weight", "none", "--lora_rank", "2")
    assert (tmp_path / "out" / "lora" / "lora_identity_64_moe.pth").is_file()
    assert not (tmp_path / "out" / "lora" / "lora_identity_64.pth").exists()
    assert lora_path("out", "lora_identity", 64, use_moe=True) != lora_path("out", "lora_identity", 64)


def test_moe_pretrain_adds_the_balancing_loss(tmp_path):
    train("train_pretrain.py", tmp_path, *FEW_STEPS, "--use_moe", "1")
    load_strict(tmp_path / "out" / "pretrain_64_moe.pth", use_moe=True)
    assert all(r["aux_loss"] > 0 for r in metrics(tmp_path, "pretrain_64_moe"))


def test_one_nan_step_is_skipped(tmp_path):
    result = train("train_pretrain.py", tmp_path, "--batch_size", "2", "--max_steps", "4", "--debug_nan_steps", "2")
    assert "step 2: non-finite loss" in result.stdout
    records = metrics(tmp_path, "pretrain_64")
    assert [r["skipped"] for r in records] == [False, True, False, False]
    assert math.isfinite(records[-1]["loss"])
    load_strict(tmp_path / "out" / "pretrain_64.pth")


def test_repeated_nan_steps_stop_the_run_without_writing_bad_weights(tmp_path):
    result = train("train_pretrain.py", tmp_path, "--batch_size", "2", "--max_steps", "20", "--save_interval", "2",
                   "--debug_nan_steps", "3-20", check=False)
    assert result.returncode == 2
    assert "stopping at step 7" in result.stderr and "steps 3-7" in result.stderr
    assert "learning rate" in result.stderr and "pretrain_64.pth (step 2)" in result.stderr
    state = torch.load(tmp_path / "checkpoints" / "pretrain_64_resume.pth", weights_only=True)
    assert state["step"] == 2  # nothing was saved after the failures began
    load_strict(tmp_path / "out" / "pretrain_64.pth")


@pytest.mark.parametrize("script, stage, name", [("train_full_sft.py", "sft", "full_sft_64"),
                                                ("train_distill_reason.py", "reason", "reason_64"),
                                                ("train_dpo.py", "dpo", "rlhf_64")])
def test_untrainable_samples_are_skipped_said_and_never_give_a_zero_loss(tmp_path, script, stage, name):
    data, total, dead = write_chat_data(tmp_path / f"{stage}.jsonl", stage)
    result = train(script, tmp_path, "--from_weight", "none", "--data_path", data, "--max_seq_len", "64",
                   "--batch_size", "2", "--max_steps", "4", "--log_interval", "1", "--learning_rate", "1e-4")
    unit, what = ("pairs", "have a side with no reply") if stage == "dpo" else ("samples", "have no reply")
    share = f"{100 * dead / total:.1f}%"
    assert f"{dead} of {total} {unit} ({share}) {what} inside --max_seq_len 64 and are skipped; " in result.stdout
    assert f"{total - dead} samples" in result.stdout  # what the run trains on
    records = metrics(tmp_path, name)
    assert len(records) == 4 and all(r["loss"] != 0.0 and math.isfinite(r["loss"]) for r in records)
    if stage == "dpo":  # after the first update, a batch of dead pairs would still log log(2) with margin 0
        assert all(r["reward_margin"] != 0 for r in records[1:])


def test_resume_is_exact_with_skipped_samples(tmp_path):
    data, _, _ = write_chat_data(tmp_path / "sft.jsonl", "sft", copies=6)
    flags = ["--from_weight", "none", "--data_path", data, "--max_seq_len", "64", "--batch_size", "2",
             "--learning_rate", "1e-3", "--save_interval", "3", "--cache_dir", str(tmp_path / "index")]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir(), resumed.mkdir()
    train("train_full_sft.py", straight, *flags, "--max_steps", "6")
    train("train_full_sft.py", resumed, *flags, "--max_steps", "3")
    result = train("train_full_sft.py", resumed, *flags, "--max_steps", "6", "--resume", "1")
    assert "resumed full_sft_64" in result.stdout
    assert max_difference(resume_model(resumed, "full_sft_64"), resume_model(straight, "full_sft_64")) < 1e-6
    assert [r["loss"] for r in metrics(resumed, "full_sft_64")] == [r["loss"] for r in metrics(straight, "full_sft_64")]
    assert list((tmp_path / "index").glob("sft.jsonl.*.idx"))  # --cache_dir: the index went there
    assert not (tmp_path / ".minimind_cache").exists()


def identity_question_and_answer():
    """A single-turn demo SFT conversation in which the assistant says who it is."""
    with open(os.path.join(REPO_ROOT, "dataset", "demo", "sft.jsonl"), encoding="utf-8") as f:
        for line in f:
            turns = json.loads(line)["conversations"]
            if len(turns) == 2 and turns[1]["content"].startswith("我是MiniMind"):
                return turns[0]["content"], turns[1]["content"]
    raise AssertionError("no identity conversation in dataset/demo/sft.jsonl")


@pytest.mark.slow
def test_a_tiny_model_learns_the_demo_identity_answer(tmp_path):
    """Full SFT from random init on the demo set (about a minute on 2 CPU cores): greedy decoding
    must give the demo answer word for word, so the loop really learns."""
    from transformers import AutoTokenizer
    question, answer = identity_question_and_answer()
    # 120 steps: the answer is 40 tokens with the shipped tokenizer ("MiniMind" is 4 of them);
    # 80 steps were enough for the 29 tokens of the previous one, not for these
    train("train_full_sft.py", tmp_path, "--from_weight", "none", "--max_seq_len", "96", "--batch_size", "16",
          "--learning_rate", "5e-3", "--warmup_iters", "5", "--epochs", "1", "--max_steps", "120",
          "--log_interval", "20", "--save_interval", "1000", timeout=600)
    model = load_strict(tmp_path / "out" / "full_sft_64.pth").eval()
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(REPO_ROOT, "model"))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    input_ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    output = model.generate(input_ids, max_new_tokens=80, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    reply = tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
    assert reply.strip() == answer
