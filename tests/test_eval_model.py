"""The shared loading + generation module (model/inference.py) and eval_model.py.

The model is a tiny random MiniMind (hidden 64, 2 layers) saved the way the trainers save
weights; its text is gibberish, which is fine: at temperature 0 the same prompt must give the
same text through every path. Its weights are drawn with a wide spread (std 0.3) so that
greedy replies differ from prompt to prompt instead of repeating one token."""
import io
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.checkpoint import save_weights
from model.inference import (Generation, IncrementalDecoder, ModelLoadError, ReasoningSplitter, StopStringFilter,
                             build_prompt_ids, generate_text, generate_ids, load_model, load_tokenizer,
                             model_args, split_reasoning, trim_history)
from model.model_lora import apply_lora, save_lora
from tiny_models import tiny_model

REPO_ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = REPO_ROOT / "model"
SIZE_FLAGS = ["--hidden_size", "64", "--num_hidden_layers", "2"]


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("out")
    save_weights(tiny_model(0), str(folder / "full_sft_64.pth"))
    save_weights(tiny_model(1), str(folder / "pretrain_64.pth"))
    return folder


@pytest.fixture(scope="module")
def loaded(out_dir):
    return load_model(model_args(out_dir=str(out_dir), hidden_size=64, num_hidden_layers=2, device="cpu"))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER_DIR)


def chat_ids(tokenizer, text):
    return build_prompt_ids(tokenizer, [{"role": "user", "content": text}])


# ----------------------------------------------------------------------------------------------
# Streaming text pieces
# ----------------------------------------------------------------------------------------------

def test_incremental_decoder_never_splits_a_character(tokenizer):
    text = "MiniMind 是一个小型语言模型 🚀🤖, trained from scratch! 中文与English混合。"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.add(i) for i in ids] + [decoder.flush()]
    assert "".join(deltas) == text
    assert not any(d.endswith("\ufffd") for d in deltas)
    # the test only means something if some token held part of a character
    assert "" in deltas[:-1], "no token split a multi-byte character; pick a harder text"


def test_stop_strings_end_the_reply_even_across_deltas():
    stop_filter = StopStringFilter(["STOP", "\n\n"])
    out = "".join(stop_filter.feed(piece) for piece in ["Hello S", "T", "ay. ST", "OP and more"])
    assert out == "Hello STay. " and stop_filter.stopped
    held = StopStringFilter(["</end>"])
    assert held.feed("abc</e") == "abc"  # might be the stop string: held back
    assert held.feed("x") == "</ex" and not held.stopped


def test_reasoning_is_split_from_the_answer_however_the_text_is_streamed():
    text = "<think>\nFirst, 1+1 is 2.\n</think>\n<answer>\nThe answer is 2.\n</answer>"
    assert split_reasoning(text) == ("First, 1+1 is 2.\n", "The answer is 2.\n")
    assert split_reasoning("Just an answer.") == ("", "Just an answer.")
    rng = random.Random(0)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), 6))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        splitter = ReasoningSplitter()
        streamed = {"reasoning": "", "content": ""}
        for kind, piece in [p for chunk in pieces for p in splitter.feed(chunk)] + splitter.flush():
            streamed[kind] += piece
        assert (streamed["reasoning"], streamed["content"]) == split_reasoning(text)


def test_history_window_keeps_system_and_last_turns():
    messages = [{"role": "system", "content": "s"}]
    for i in range(3):
        messages += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
    messages.append({"role": "user", "content": "now"})
    assert [m["content"] for m in trim_history(messages, 0)] == ["s", "now"]
    assert [m["content"] for m in trim_history(messages, 2)] == ["s", "q1", "a1", "q2", "a2", "now"]
    assert trim_history(messages, 10) == messages


# ----------------------------------------------------------------------------------------------
# The generation routine
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("repetition_penalty", [1.0, 1.3])
def test_greedy_decoding_matches_transformers_generate(loaded, repetition_penalty):
    model, tokenizer = loaded
    prompt = chat_ids(tokenizer, "为什么天空是蓝色的？")
    ours = list(generate_ids(model, prompt, 24, repetition_penalty=repetition_penalty, eos_token_id=None))
    reference = model.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                               repetition_penalty=repetition_penalty, pad_token_id=0)
    assert ours == reference[0, len(prompt):].tolist()


def test_sampling_seed_and_top_p(loaded):
    model, tokenizer = loaded
    prompt = chat_ids(tokenizer, "hello")
    options = dict(max_new_tokens=16, temperature=1.0, top_p=0.9)
    first = generate_text(model, tokenizer, prompt, seed=7, **options)
    assert first == generate_text(model, tokenizer, prompt, seed=7, **options)
    assert len({generate_text(model, tokenizer, prompt, seed=s, **options) for s in range(4)}) > 1
    # top_p = 0 keeps only the likeliest token: sampling becomes greedy
    greedy = generate_text(model, tokenizer, prompt, max_new_tokens=16, temperature=0)
    assert generate_text(model, tokenizer, prompt, max_new_tokens=16, temperature=1.0, top_p=0.0, seed=3) == greedy


def test_generation_reports_length_and_token_counts(loaded):
    model, tokenizer = loaded
    prompt = chat_ids(tokenizer, "hello")
    reply = Generation(model, tokenizer, prompt, max_new_tokens=5)
    text = "".join(reply)
    assert text == reply.text and text
    assert (reply.finish_reason, reply.completion_tokens, reply.prompt_tokens) == ("length", 5, len(prompt))


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def test_lora_adapter_is_loaded_from_its_file(out_dir, tokenizer):
    torch.manual_seed(0)
    with_adapter = tiny_model(0)
    apply_lora(with_adapter, rank=4)
    with torch.no_grad():
        for name, p in with_adapter.named_parameters():
            if name.endswith("lora.B.weight"):
                p.normal_(0.0, 0.3)  # a trained adapter: B is no longer zero
    save_lora(with_adapter, str(out_dir / "lora" / "lora_identity_64.pth"))
    args = model_args(out_dir=str(out_dir), hidden_size=64, num_hidden_layers=2, lora_name="lora_identity")
    model, _ = load_model(args)
    base, _ = load_model(model_args(out_dir=str(out_dir), hidden_size=64, num_hidden_layers=2))
    ids = torch.tensor([chat_ids(tokenizer, "你是谁？")])
    with torch.no_grad():
        expected = with_adapter.half().float()(ids).logits  # the adapter as saved (fp16)
        assert torch.allclose(model(ids).logits, expected, atol=2e-2)
        assert not torch.allclose(base(ids).logits, expected, atol=2e-2)
    with pytest.raises(ModelLoadError, match="train_lora.py --lora_name lora_medical"):
        load_model(model_args(out_dir=str(out_dir), hidden_size=64, num_hidden_layers=2, lora_name="lora_medical"))


def test_transformers_folder_gives_the_same_reply(out_dir, loaded, tmp_path):
    model, tokenizer = loaded
    model.save_pretrained(tmp_path / "hf")
    hf_model, _ = load_model(model_args(load=1, hf_path=str(tmp_path / "hf")))
    prompt = chat_ids(tokenizer, "hello")
    assert generate_text(hf_model, tokenizer, prompt, max_new_tokens=12) == \
        generate_text(model, tokenizer, prompt, max_new_tokens=12)
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(model_args(load=1, hf_path=str(tmp_path)))


def test_wrong_size_flags_name_the_right_ones(out_dir):
    with pytest.raises(ModelLoadError, match="--hidden_size 64 --num_hidden_layers 2"):
        load_model(model_args(out_dir=str(out_dir), hidden_size=64, num_hidden_layers=3))


# ----------------------------------------------------------------------------------------------
# eval_model.py
# ----------------------------------------------------------------------------------------------

def run_eval(args, cwd, stdin=""):
    return subprocess.run([sys.executable, str(REPO_ROOT / "eval_model.py"), *args], cwd=cwd, input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_eval_prompt_gives_the_shared_routine_text(out_dir, loaded, tmp_path):
    model, tokenizer = loaded
    question = "请用三句话解释什么是机器学习。"
    result = run_eval(["--out_dir", str(out_dir), *SIZE_FLAGS, "--device", "cpu", "--prompt", question,
                       "--temperature", "0", "--max_new_tokens", "40"], cwd=tmp_path)  # another cwd on purpose
    assert result.returncode == 0, result.stderr
    expected = generate_text(model, tokenizer, chat_ids(tokenizer, question), max_new_tokens=40, temperature=0)
    assert expected.strip()
    assert result.stdout == expected + "\n"
    assert "MiniMind parameters: 0.50 M" in result.stderr


def test_eval_missing_checkpoint_says_what_exists_and_how_to_make_it(out_dir, tmp_path):
    result = run_eval(["--out_dir", str(out_dir), *SIZE_FLAGS, "--model_mode", "2", "--prompt", "hi"], cwd=tmp_path)
    assert result.returncode == 2
    assert f"no weights at {out_dir / 'rlhf_64.pth'}" in result.stderr
    assert "full_sft_64.pth, pretrain_64.pth" in result.stderr  # what is there
    assert "python trainer/train_dpo.py --hidden_size 64 --num_hidden_layers 2" in result.stderr  # how to make it
    assert result.stdout == ""


def test_eval_pretrain_mode_continues_plain_text(out_dir, capsys):
    import eval_model

    model, tokenizer = load_model(model_args(out_dir=str(out_dir), model_mode=0, hidden_size=64, num_hidden_layers=2))
    text = "长城是中国古代"
    prompt = tokenizer(tokenizer.bos_token + text, add_special_tokens=False)["input_ids"]
    assert prompt[0] == 1 and "<|im_start|>user" not in tokenizer.decode(prompt)
    expected = generate_text(model, tokenizer, prompt, max_new_tokens=20)
    assert eval_model.main(["--out_dir", str(out_dir), *SIZE_FLAGS, "--model_mode", "0", "--prompt", text,
                            "--temperature", "0", "--max_new_tokens", "20"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_eval_menu_auto_test_streams_every_builtin_prompt(out_dir, monkeypatch, capsys):
    import eval_model

    monkeypatch.setattr(sys, "stdin", io.StringIO("0\n"))
    assert eval_model.main(["--out_dir", str(out_dir), *SIZE_FLAGS, "--max_new_tokens", "4", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "MiniMind parameters: 0.50 M (504,128)" in out
    for prompt in eval_model.CHAT_PROMPTS:
        assert f"👶: {prompt}\n🤖️: " in out
    assert eval_model.auto_test_prompts(model_args(lora_name="lora_medical", model_mode=1)) == \
        eval_model.LORA_PROMPTS["lora_medical"]


def demo_user_turns(file_name: str) -> set[str]:
    import json
    with open(REPO_ROOT / "dataset" / "demo" / file_name, encoding="utf-8") as f:
        return {turn["content"] for line in f for turn in json.loads(line)["conversations"] if turn["role"] == "user"}


def test_demo_questions_are_in_the_demo_data():
    """A demo model can only answer what it was taught: every demo prompt is in the demo data."""
    import eval_model
    assert set(eval_model.DEMO_CHAT_PROMPTS) <= demo_user_turns("sft.jsonl")
    assert set(eval_model.DEMO_REASONING_PROMPTS) <= demo_user_turns("r1_mix.jsonl")
    for name, prompts in eval_model.DEMO_LORA_PROMPTS.items():
        assert set(prompts) <= demo_user_turns(f"{name}.jsonl")
    pretrain_text = (REPO_ROOT / "dataset" / "demo" / "pretrain.jsonl").read_text(encoding="utf-8")
    assert all(prompt in pretrain_text for prompt in eval_model.DEMO_CONTINUATION_PROMPTS)


def test_auto_test_asks_a_demo_model_the_demo_questions(tmp_path):
    """The trainer's {name}_run.json says whether the weights were trained on dataset/demo/."""
    import json
    import eval_model
    args = model_args(out_dir=str(tmp_path), hidden_size=64, num_hidden_layers=2, model_mode=1)
    assert eval_model.auto_test_prompts(args) == eval_model.CHAT_PROMPTS  # no record: MiniMind2's questions
    (tmp_path / "full_sft_64_run.json").write_text(json.dumps({"trained_on_demo_data": True}))
    assert eval_model.auto_test_prompts(args) == eval_model.DEMO_CHAT_PROMPTS
    (tmp_path / "reason_64_run.json").write_text(json.dumps({"trained_on_demo_data": True}))
    args.model_mode = 3
    assert eval_model.auto_test_prompts(args) == eval_model.DEMO_REASONING_PROMPTS
    (tmp_path / "lora_medical_64_run.json").write_text(json.dumps({"trained_on_demo_data": False}))
    args.model_mode, args.lora_name = 1, "lora_medical"
    assert eval_model.auto_test_prompts(args) == eval_model.LORA_PROMPTS["lora_medical"]


def test_manual_input_says_how_to_quit_and_lora_loading_is_confirmed(out_dir, tmp_path):
    with_adapter = tiny_model(0)
    apply_lora(with_adapter, rank=4)
    save_lora(with_adapter, str(out_dir / "lora" / "lora_identity_64.pth"))
    result = run_eval(["--out_dir", str(out_dir), *SIZE_FLAGS, "--device", "cpu", "--lora_name", "lora_identity",
                       "--max_new_tokens", "3"], cwd=tmp_path, stdin="1\nhello\nquit\n")
    assert result.returncode == 0, result.stderr
    assert "choose 0 or 1: " in result.stdout
    assert "exit or quit (or Ctrl-D) quits" in result.stdout
    assert result.stdout.count("👶: ") == 2  # asked for "hello", then for what ended the chat
    assert f"LoRA adapter lora_identity (rank 4, " in result.stdout
    assert str(out_dir / "lora" / "lora_identity_64.pth") in result.stdout
