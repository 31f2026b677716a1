"""The newcomer's first command, reduced (--tiny): every stage runs through its command line,
the trained models answer, and every file the README promises is there."""
import json
import os
import sys
from dataclasses import replace

import pytest

from model.checkpoint import config_from_sizes, load_weights, lora_path, read_state_dict
from model.model_minimind import MiniMindForCausalLM
from trainer_helpers import REPO_ROOT, run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quickstart")
    result = run([sys.executable, os.path.join(REPO_ROOT, "scripts", "quickstart.py"), "--tiny", "--device", "cpu",
                  "--out_dir", str(tmp / "out"), "--checkpoint_dir", str(tmp / "checkpoints")], cwd=tmp, timeout=600)
    return tmp / "out", result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "full_sft", "rlhf", "reason", "grpo"])
def test_every_stage_leaves_loadable_weights_and_metrics(quickstart, stage):
    out, _ = quickstart
    model = MiniMindForCausalLM(config_from_sizes(64, 2))
    load_weights(model, str(out / f"{stage}_64.pth"))  # strict
    with open(out / f"{stage}_64_metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [1, 2]


@pytest.mark.slow
def test_lora_adapter_is_saved_alone(quickstart):
    out, _ = quickstart
    adapter = read_state_dict(lora_path(str(out), "lora_identity", 64))
    assert adapter and all(".lora." in key for key in adapter)
    assert (out / "lora_identity_64_metrics.jsonl").is_file()


@pytest.mark.slow
def test_the_plot_is_a_real_png_of_every_stage(quickstart):
    import matplotlib.image
    out, stdout = quickstart
    png = out / "quickstart_metrics.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    height, width, _ = matplotlib.image.imread(str(png)).shape
    assert height > 200 and width > 200
    assert "6 run(s)" in stdout


@pytest.mark.slow
def test_commands_answers_and_next_steps_are_printed(quickstart):
    _, stdout = quickstart
    for script in ("train_pretrain.py", "train_full_sft.py", "train_dpo.py", "train_distill_reason.py",
                   "train_lora.py", "train_grpo.py"):
        assert f"$ python trainer/{script} --hidden_size 64" in stdout
    from scripts.quickstart import QUESTIONS, TOOL_QUESTION
    for _, _, question in QUESTIONS:
        assert f"👶: {question}\n🤖️: " in stdout
    assert "What next:" in stdout and "python eval_model.py --hidden_size 64 --num_hidden_layers 2" in stdout
    assert f"[full_sft + tools: calculator] 👶: {TOOL_QUESTION}\n" in stdout  # the tool round trip is shown
    assert "--max_seq_len 96 --batch_size 16 --learning_rate 2e-3 --warmup_iters 10 --group_by_length 1 --data_path" \
        in stdout and "sft_mix.jsonl" in stdout  # SFT on the chats and the tool conversations


@pytest.mark.slow
def test_the_sft_model_is_scored_on_the_held_out_tool_prompts(quickstart):
    out, stdout = quickstart
    assert "$ python bench/bench_tools.py --model_mode 1 --hidden_size 64 --num_hidden_layers 2" in stdout
    scores = json.loads((out / "quickstart_tools.json").read_text(encoding="utf-8"))
    assert scores["tool_prompts"] == 50 and len(scores["rows"]) == 60
    assert 0 <= scores["valid_call"] <= 1 and 0 <= scores["answer_with_tools"] <= 1


@pytest.mark.slow
def test_every_stage_is_evaluated_on_the_held_out_demo_sets(quickstart):
    out, stdout = quickstart
    assert "$ python scripts/eval_bench.py --task bpb,mc,gen --hidden_size 64" in stdout
    assert "| model | bpb | mc accuracy | gen accuracy |" in stdout
    results = {t["task"]: t for t in json.loads((out / "quickstart_eval.json").read_text())["tasks"]}
    labels = ["pretrain", "full_sft", "rlhf", "reason", "full_sft+lora_identity"]
    for task in ("bpb", "mc", "gen"):
        assert set(labels) <= set(results[task]["models"])  # (and GRPO's, once the quickstart trains it)
    assert all(0 < r["bpb"] < 20 for r in results["bpb"]["models"].values())
    assert all(r["n"] == 8 for r in results["mc"]["models"].values())  # --tiny: the first 8 questions
    assert (out / "quickstart_eval.png").read_bytes()[:8] == PNG_SIGNATURE


def test_joined_rows_keep_every_document_in_order_within_the_token_limit():
    """quickstart --tools 1's long rows: nothing dropped or cut, no row over the limit; a second
    pass brings new transcripts, not the first pass's again."""
    from scripts.quickstart import SIZES, joined_rows, tool_pretraining_documents
    from trainer.stage import load_tokenizer
    tokenizer = load_tokenizer()
    size = replace(SIZES["tiny"], epochs={**SIZES["tiny"].epochs, "pretrain_long": 2})
    documents = tool_pretraining_documents(size, "pretrain_long")
    rows = joined_rows(documents, max_tokens=256)
    assert "".join(rows) == "".join(f"<|im_start|>{document}<|im_end|>" for document in documents)
    lengths = [len(tokenizer(row, add_special_tokens=False)["input_ids"]) for row in rows]
    assert max(lengths) <= 256 and sum(lengths) / len(lengths) > 200  # full rows, not one document a row
    transcripts = [document for document in documents if "<tool_call>" in document]
    assert len(documents) == 2 * (3000 + size.tool_transcripts) and len(transcripts) == 2 * size.tool_transcripts
    assert len(set(transcripts)) > 0.9 * len(transcripts)  # each pass draws transcripts of its own


def test_tools_quickstart_trains_long_rows_between_pretraining_and_sft(tmp_path):
    from scripts.quickstart import SIZES, parse_args, stage_command, stages
    args = parse_args(["--tools", "1", "--out_dir", str(tmp_path / "out")])
    chain = stages(tools=True)
    assert [stage.name for stage in chain][:3] == ["pretrain", "pretrain_long", "full_sft"]
    assert [stage.name for stage in chain][3:] == [stage.name for stage in stages(tools=False)][2:]
    pretrain, long_rows, sft = (" ".join(stage_command(stage, SIZES["tiny"], args)) for stage in chain[:3])
    assert "--packing 1" in pretrain and "pretrain_tools.jsonl" in pretrain
    assert "--epochs 1 " in pretrain and "--epochs 1 " in long_rows  # the files hold every pass
    assert "--from_weight pretrain --save_weight pretrain_long" in long_rows
    assert "--max_seq_len 192" in long_rows and "pretrain_tools_long.jsonl" in long_rows
    assert "--from_weight pretrain_long" in sft and "--learning_rate 5e-4" in sft


def test_a_failing_stage_stops_the_quickstart_and_names_it(tmp_path):
    """A corrupt resume state in the way of the first stage: the quickstart stops there, says
    which stage failed and how to continue, and runs nothing after it."""
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "pretrain_64_resume.pth").write_bytes(b"not a checkpoint")
    result = run([sys.executable, os.path.join(REPO_ROOT, "scripts", "quickstart.py"), "--tiny", "--device", "cpu",
                  "--out_dir", str(tmp_path / "out"), "--checkpoint_dir", str(checkpoints), "--resume", "1"],
                 cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "the pretrain stage failed" in result.stderr and "--resume 1" in result.stderr
    assert "train_full_sft.py" not in result.stdout


@pytest.mark.slow
def test_grpo_accuracy_before_and_after_is_reported(quickstart):
    out, stdout = quickstart
    assert "=== Held-out demo sums (200 prompts GRPO never saw, greedy): correct answers" in stdout
    results = json.loads((out / "quickstart_rl_accuracy.json").read_text())
    assert set(results) == {"full_sft", "grpo"}
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["rows"] == 200 for r in results.values())
