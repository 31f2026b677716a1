"""evaluation/ and scripts/eval_bench.py: bits per byte, multiple choice, generative answers.

Most checks use hand-made models whose preference is known by construction: with every
layer's output projection zeroed, each block adds nothing to the residual stream, so the logits
at a position are the tied embedding matrix times the (normalised) embedding of that position's
token, and the likeliest next token is that token itself."""
import json
import math

import pytest
import torch

from evaluation.bpb import bits_per_byte, document_windows
from evaluation.choice import Prompting, letter_prompt, letter_prompt_ids, score_continuations, score_letters, summarize
from evaluation.data import ChoiceQuestion, EvalDataError, read_choice_questions
from evaluation.generative import answers_match
from model.checkpoint import save_weights
from model.inference import load_tokenizer
from model.model_minimind import MiniMindForCausalLM
from scripts.eval_bench import main as eval_bench
from test_server import tiny_model

TOKENIZER = load_tokenizer("model")


def repeating_model() -> MiniMindForCausalLM:
    """Predicts its last input token again (see the module docstring)."""
    model = tiny_model(seed=3)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model


def ids(text: str) -> list[int]:
    return TOKENIZER(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------------
# Bits per byte
# ----------------------------------------------------------------------------------------------

def direct_nats(model, stream: list[int], window: int) -> float:
    """-log P of every token after the first, each computed in its own forward pass over the
    tokens of its window that precede it."""
    total = 0.0
    with torch.no_grad():
        for j in range(1, len(stream)):
            start = (j - 1) // window * window
            logits = model(torch.tensor([stream[start:j]])).logits[0, -1].float()
            total -= torch.log_softmax(logits, -1)[stream[j]].item()
    return total


@pytest.mark.parametrize("max_seq_len", [512, 7])
def test_bits_per_byte_equals_a_direct_computation(max_seq_len):
    model = tiny_model(seed=1)
    texts = ["MiniMind is a small language model. 中国的首都是北京。", "2 + 2 = 4", ""]
    result = bits_per_byte(model, TOKENIZER, texts, max_seq_len=max_seq_len, batch_tokens=16)
    streams = [[TOKENIZER.bos_token_id] + ids(t) for t in texts if t]
    expected_nats = sum(direct_nats(model, s, max_seq_len) for s in streams)
    expected_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert result.tokens == sum(len(s) - 1 for s in streams)  # every token predicted once, windows or not
    assert result.bytes == expected_bytes and result.documents == 2
    assert result.nats == pytest.approx(expected_nats, rel=1e-5)
    assert result.bpb == pytest.approx(expected_nats / math.log(2) / expected_bytes, rel=1e-5)


def test_windows_overlap_by_one_token_and_cover_every_prediction():
    windows = document_windows(list(range(10)), 4)
    assert windows == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9]]


# ----------------------------------------------------------------------------------------------
# Multiple choice: jsonl continuations
# ----------------------------------------------------------------------------------------------

def test_continuation_scoring_picks_the_choice_the_model_prefers(tmp_path):
    """Each question ends in a digit; the choice repeating that digit is what the repeating model
    predicts, wherever it stands among the choices."""
    rows = [{"question": "数7", "choices": ["77", "88", "95"], "answer": 0, "subject": "a"},
            {"question": "数3", "choices": ["45", "33"], "answer": "B", "subject": "a"},
            {"question": "数5", "choices": ["12", "60", "55", "89"], "answer": 2, "subject": "b"},
            {"question": "数4", "choices": ["44", "11"], "answer": 1, "subject": "b"}]  # answer: not preferred
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    choice_set = read_choice_questions(str(path))
    prompting = Prompting(TOKENIZER, delimiter="")
    for question, preferred in zip(choice_set.questions, [0, 1, 2, 0]):  # the premise: the preferred choice
        context, continuation = prompting.pair_ids(question.question, question.choices[preferred])  # repeats
        assert set(continuation) == {context[-1]}                                  # the last context token
    scores = score_continuations(repeating_model(), choice_set.questions, prompting, batch_tokens=12)
    assert [s.predicted for s in scores] == [0, 1, 2, 0]
    assert [s.predicted_norm for s in scores] == [0, 1, 2, 0]
    summary = summarize(scores)
    assert summary["accuracy"] == 0.75 and summary["n"] == 4
    assert summary["subjects"] == {"a": {"accuracy": 1.0, "acc_norm": 1.0, "n": 2},
                                   "b": {"accuracy": 0.5, "acc_norm": 0.5, "n": 2}}


def test_context_tokens_are_split_as_lm_evaluation_harness_splits_them():
    prompting = Prompting(TOKENIZER, add_bos=False)
    context, continuation = prompting.pair_ids("The capital is ", "Paris")  # trailing space joins the choice
    assert context == ids("The capital is") and continuation == ids("The capital is Paris")[len(context):]
    spaced = Prompting(TOKENIZER, add_bos=False, delimiter=" ").pair_ids("The capital is", "Paris")  # lm-eval's " "
    assert spaced == (context, continuation)
    assert Prompting(TOKENIZER, add_bos=False).pair_ids("", "Paris") == ([TOKENIZER.bos_token_id], ids("Paris"))
    with_bos = Prompting(TOKENIZER).pair_ids("7", "7")[0]
    assert with_bos == [TOKENIZER.bos_token_id] + ids("7")


def test_bad_answer_names_file_and_line(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n'
                    '{"question": "q", "choices": ["a", "b"], "answer": "C"}\n', encoding="utf-8")
    with pytest.raises(EvalDataError, match=r"mc.jsonl:2: answer 'C' is not one of the 2 choices"):
        read_choice_questions(str(path))


# ----------------------------------------------------------------------------------------------
# Multiple choice: C-Eval / CMMLU folders
# ----------------------------------------------------------------------------------------------

def letter_model(letter: str) -> MiniMindForCausalLM:
    """A repeating model whose letter `letter` has the embedding of "：" (the prompt's last
    token), so of A-D it finds that letter likeliest after "答案："."""
    model = repeating_model()
    colon, = ids("：")
    with torch.no_grad():
        embeddings = model.model.embed_tokens.weight
        embeddings[ids(letter)[0]] = embeddings[colon]
    return model


def write_csv(path, header: str, rows: list[str]):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows), encoding="utf-8")


def make_ceval(folder):
    header = "id,question,A,B,C,D,answer,explanation"
    write_csv(folder / "val" / "art_val.csv", header,
              ["0,画家是谁,甲,乙,丙,丁,C,", "1,颜色,红,绿,蓝,黄,C,", "2,没有答案,a,b,c,d,,"])
    write_csv(folder / "val" / "law_val.csv", header, ["0,法律,一,二,三,四,A,"])
    write_csv(folder / "dev" / "art_dev.csv", header, ["0,示例一,a,b,c,d,B,解释", "1,示例二,e,f,g,h,D,解释"])
    (folder / "subject_mapping.json").write_text(json.dumps({"art": ["Art", "艺术学", "Humanities"],
                                                             "law": ["Law", "法学", "Social Science"]}))


def make_cmmlu(folder):
    header = ",Question,A,B,C,D,Answer"
    write_csv(folder / "test" / "agronomy.csv", header, ["0,问题一,a,b,c,d,C", "1,问题二,a,b,c,d,D"])
    write_csv(folder / "dev" / "agronomy.csv", header, ["0,示例,a,b,c,d,A"])


@pytest.mark.parametrize("layout", ["ceval", "cmmlu"])
def test_letter_scoring_on_ceval_and_cmmlu_folders(tmp_path, layout):
    (make_ceval if layout == "ceval" else make_cmmlu)(tmp_path)
    choice_set = read_choice_questions(str(tmp_path))
    assert choice_set.benchmark == layout
    prompting = Prompting(TOKENIZER)
    for question in choice_set.questions:  # the premise: every prompt ends in "："
        assert letter_prompt_ids(choice_set, question, 0, prompting)[0][-1] == ids("：")[0]
    scores, _ = score_letters(letter_model("C"), choice_set, prompting)
    assert all(s.predicted == 2 for s in scores)
    summary = summarize(scores)
    if layout == "ceval":  # art: C, C (the answerless row skipped and counted); law: A
        assert choice_set.skipped == {"no answer letter A-D (e.g. a test split without answers)": 1}
        assert summary["subjects"]["art"]["accuracy"] == 1.0 and summary["subjects"]["law"]["accuracy"] == 0.0
        assert "以下是中国关于艺术学考试的单项选择题" in letter_prompt(choice_set, choice_set.questions[0], 0)
    else:
        assert summary["accuracy"] == 0.5 and summary["n"] == 2
        assert letter_prompt(choice_set, choice_set.questions[0], 0).startswith("以下是关于agronomy的单项选择题")
    assert scores_with(letter_model("D"), choice_set) == [3] * len(choice_set.questions)


def scores_with(model, choice_set) -> list[int]:
    return [s.predicted for s in score_letters(model, choice_set, Prompting(TOKENIZER))[0]]


def test_few_shot_prompts_come_from_the_dev_split_in_order(tmp_path):
    make_ceval(tmp_path)
    choice_set = read_choice_questions(str(tmp_path))
    question = choice_set.questions[0]
    prompt = letter_prompt(choice_set, question, 2)
    expected = ("以下是中国关于艺术学考试的单项选择题，请选出其中的正确答案。\n\n"
                "示例一\nA. a\nB. b\nC. c\nD. d\n答案：B\n\n"
                "示例二\nA. e\nB. f\nC. g\nD. h\n答案：D\n\n"
                "画家是谁\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案：")
    assert prompt == expected
    assert letter_prompt(choice_set, choice_set.questions[-1], 5).count("答案：") == 1  # law has no dev rows
    # a prompt too long for --max_seq_len loses shots, and the question says so
    full = len(Prompting(TOKENIZER).context_ids(prompt))
    _, shots, truncated = letter_prompt_ids(choice_set, question, 2, Prompting(TOKENIZER, max_seq_len=full - 1))
    assert shots == 1 and not truncated
    _, stats = score_letters(letter_model("C"), choice_set, Prompting(TOKENIZER, max_seq_len=full - 1), num_fewshot=2)
    assert stats["fewer_shots_than_asked"] == 1


# ----------------------------------------------------------------------------------------------
# Generative answers
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction, reference, expected", [
    ("小明现在有11个苹果。", "11", True),
    ("5加6等于10。", "11", False),
    ("The total is 1,100 dollars.", "#### 1100", True),
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "She sold 48+24 = 72 clips.\n#### 72", True),
    ("3.0", "3", True),
    ("<think>\n5+6=12? no\n</think>\n<answer>\n11\n</answer>", "11", True),
    ("<think>\n5+6=11\n</think>\n<answer>\n12\n</answer>", "11", False),  # the thinking does not count
    ("no number here", "7", False),
    ("Paris.", "paris", True),
    ("Berlin", "Paris", False),
])
def test_generated_answers_compare_numbers_as_numbers(prediction, reference, expected):
    assert answers_match(prediction, reference) is expected


def test_gen_task_decodes_through_the_engine(tmp_path):
    """A pretrain-mode model (plain-text prompts) that repeats its last token answers each
    question with its last digit: right where the reference is that digit."""
    save_weights(repeating_model(), str(tmp_path / "pretrain_64.pth"))
    data = tmp_path / "gen.jsonl"
    data.write_text('{"question": "1加1等于2", "answer": "2"}\n{"question": "2加2等于5", "answer": "4"}\n'
                    '{"question": "100减1等于9", "answer": "#### 9"}\n', encoding="utf-8")
    out = tmp_path / "results.json"
    assert eval_bench(["--task", "gen", "--data_path", str(data), "--model_mode", "0", "--out_dir", str(tmp_path),
                       "--hidden_size", "64", "--num_hidden_layers", "2", "--device", "cpu", "--max_new_tokens", "1",
                       "--out", str(out), "--progress", "0"]) == 0
    result = json.loads(out.read_text())["tasks"][0]
    assert result["task"] == "gen"
    assert result["models"]["pretrain"]["accuracy"] == pytest.approx(2 / 3)


def test_several_models_and_tasks_in_one_run(tmp_path, capsys):
    save_weights(repeating_model(), str(tmp_path / "pretrain_64.pth"))
    save_weights(tiny_model(seed=1), str(tmp_path / "full_sft_64.pth"))
    mc = tmp_path / "mc.jsonl"
    mc.write_text('{"question": "数7", "choices": ["88", "77"], "answer": 1}\n', encoding="utf-8")
    text = tmp_path / "text.txt"
    text.write_text("北京是中国的首都。", encoding="utf-8")
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    assert eval_bench(["--task", "bpb,mc", "--data_path", str(text), str(mc), "--model_modes", "0,1",
                       "--out_dir", str(tmp_path), "--hidden_size", "64", "--num_hidden_layers", "2", "--device", "cpu",
                       "--target_delimiter", "", "--out", str(out), "--plot", str(png), "--progress", "0"]) == 0
    tasks = {t["task"]: t for t in json.loads(out.read_text())["tasks"]}
    assert tasks["mc"]["models"]["pretrain"]["accuracy"] == 1.0
    direct = bits_per_byte(tiny_model(seed=1), TOKENIZER, ["北京是中国的首都。"]).bpb
    assert tasks["bpb"]["models"]["full_sft"]["bpb"] == pytest.approx(direct, rel=1e-2)  # saved in half precision
    assert png.stat().st_size > 10_000
    table = capsys.readouterr().out
    assert "| model | bpb | mc accuracy |" in table and "| pretrain |" in table and "| full_sft |" in table


@pytest.mark.parametrize("flags, message", [
    (["--task", "mcq"], "unknown task(s) ['mcq']"),
    (["--task", "bpb,mc", "--data_path", "a.jsonl"], "1 path(s) for 2 task(s)"),
    (["--task", "judge"], "--task judge needs --judge_base_url and --judge_model"),
    (["--task", "mc", "--data_path", "missing.jsonl"], "--data_path missing.jsonl: no such file or folder"),
    (["--model_modes", "0,x"], "expected numbers like 0,1,2,3"),
])
def test_flag_mistakes_end_in_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_bench(flags)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def test_a_missing_model_is_a_one_line_error_not_a_traceback(tmp_path, capsys):
    assert eval_bench(["--task", "mc", "--out_dir", str(tmp_path), "--hidden_size", "64", "--num_hidden_layers", "2",
                       "--progress", "0"]) == 2
    assert "no weights at" in capsys.readouterr().err
