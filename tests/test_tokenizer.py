"""The shipped tokenizer (model/) and scripts/train_tokenizer.py."""
import json
import os

import pytest
from transformers import AutoTokenizer

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DEFAULT_SYSTEM = "You are a helpful assistant"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(os.path.join(REPO_ROOT, "model"))


def test_special_token_ids(tok):
    assert len(tok) == 6400
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    # each special token is one token, never split into pieces
    assert tok("<|im_start|>user<|im_end|>", add_special_tokens=False)["input_ids"][0] == 1
    assert tok("<|im_start|>user<|im_end|>", add_special_tokens=False)["input_ids"][-1] == 2


@pytest.mark.parametrize("text", [
    "MiniMind 是一个小型语言模型 (small LM) 🚀🤖, trained from scratch!",
    "  leading spaces, tabs\tand\nnew lines\n\n中文，标点。「引号」……",
    "数学：3.14159 × 2 = 6.28318; emoji 👩‍👩‍👧 & ñ é ü ß",
])
def test_encode_decode_identity(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert 0 not in ids  # byte-level: nothing is unknown
    assert tok.decode(ids) == text


TAG_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]


def test_tag_tokens_are_single_added_tokens_that_decode_keeps(tok):
    assert tok.convert_tokens_to_ids(TAG_TOKENS) == [3, 4, 5, 6, 7, 8]
    answer = ('<think>\n先查天气。\n</think>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n'
              '</tool_call>\n<tool_response>\n{"temp": 21}\n</tool_response>\n北京21度。')
    chat = f"<|im_start|>assistant\n{answer}<|im_end|>\n"
    ids = tok(chat, add_special_tokens=False)["input_ids"]
    # each tag is one token, found inside running text (not only when it stands alone)
    assert [ids.count(i) for i in range(3, 9)] == [1] * 6
    for tag in TAG_TOKENS:
        assert tok(f"x{tag}y", add_special_tokens=False)["input_ids"].count(tok.convert_tokens_to_ids(tag)) == 1
    # the tags are text, not control: skipping special tokens drops <|im_start|>/<|im_end|> only
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n" + answer + "\n"
    assert tok.decode(ids) == chat


def test_no_bos_added_automatically(tok):
    # datasets add bos/eos themselves, as MiniMind does
    assert tok("你好", add_special_tokens=True)["input_ids"] == tok("你好", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("word", [
    "的", "是", "中国", "我们", "介绍", "一下", "自己", "问题", " the", " and",
    # common English words after a space (the previous tokenizer split these in 2-4 pieces)
    " government", " question", " computer", " because", " people", " important",
])
def test_common_words_are_single_tokens(tok, word):
    assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, tok.tokenize(word)


def test_issue_12_common_words_cost_fewer_tokens_than_before(tok):
    # Issue 12's ten words: 26 tokens with the previous tokenizer, 10 with MiniMind2's. This one
    # still splits " science", " learning", "你好" and "人工智能" (bench/results/tokenizer.md).
    words = [" government", " question", " computer", " science", " learning", " because", " people",
             " important", "人工智能", "你好"]
    tokens = {w: len(tok(w, add_special_tokens=False)["input_ids"]) for w in words}
    assert sum(tokens.values()) <= 17, tokens


def test_everyday_chinese_compresses_beyond_one_char_per_token(tok):
    # The first shipped tokenizer, trained without natural Chinese prose, reached 1.00 here
    # (MiniMind2's: 1.40); bench/results/tokenizer.md has the figures on larger held-out text.
    from eval_model import CHAT_PROMPTS
    chinese = [p for p in CHAT_PROMPTS if any("\u4e00" <= c <= "\u9fff" for c in p)]
    chars = sum(len(p) for p in chinese)
    tokens = sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in chinese)
    assert chars / tokens >= 1.25, (chars, tokens)


def test_python_code_compresses_like_minimind2(tok):
    # The project's own model code is in no training corpus. MiniMind2's tokenizer gives 2.31
    # characters per token on these two files, the tokenizer trained without code gave 1.88.
    sources = [open(os.path.join(REPO_ROOT, "model", name), encoding="utf-8").read()
               for name in ("model_minimind.py", "model_lora.py")]
    chars = sum(len(s) for s in sources)
    tokens = sum(len(tok(s, add_special_tokens=False)["input_ids"]) for s in sources)
    assert chars / tokens >= 0.95 * 2.31, (chars, tokens)


# ChatML as MiniMind2 writes it (DESIGN.md), built by hand
def turn(role, content):
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


CHAT_CASES = [
    # (messages, add_generation_prompt, expected)
    ([{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是MiniMind。"}], False,
     turn("system", DEFAULT_SYSTEM) + turn("user", "你是谁？") + turn("assistant", "我是MiniMind。")),
    ([{"role": "system", "content": "你是一个助手。"}, {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hello!"}], False,
     turn("system", "你是一个助手。") + turn("user", "Hi") + turn("assistant", "Hello!")),
    ([{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
      {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], False,
     turn("system", DEFAULT_SYSTEM) + turn("user", "1+1?") + turn("assistant", "2")
     + turn("user", "2+2?") + turn("assistant", "4")),
    ([{"role": "user", "content": "你好"}], True,
     turn("system", DEFAULT_SYSTEM) + turn("user", "你好") + "<|im_start|>assistant\n"),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
      {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}], True,
     turn("system", "Be brief.") + turn("user", "a") + turn("assistant", "b") + turn("user", "c")
     + "<|im_start|>assistant\n"),
    ([{"role": "user", "content": "q"}, {"role": "assistant",
      "content": "<think>\n想一想\n</think>\n<answer>\n好\n</answer>"}], False,
     turn("system", DEFAULT_SYSTEM) + turn("user", "q") + turn("assistant", "<think>\n想一想\n</think>\n<answer>\n好\n</answer>")),
]


@pytest.mark.parametrize("messages,generation_prompt,expected", CHAT_CASES)
def test_chat_template_is_minimind2_chatml(tok, messages, generation_prompt, expected):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert text == expected
    # and it survives a token round trip with the special tokens as single ids
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == expected
    assert ids.count(1) == expected.count("<|im_start|>") and ids.count(2) == expected.count("<|im_end|>")


# ---------------------------------------------------------------- scripts/train_tokenizer.py

def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def test_train_tokenizer_script_small_vocab(tmp_path):
    from scripts.train_tokenizer import SPECIAL_TOKENS, save, train

    corpus = tmp_path / "corpus.jsonl"
    texts = ["你好，世界！Hello world.", "MiniMind 是一个小模型。", "The quick brown fox 🦊."] * 50
    write_lines(corpus, [json.dumps({"text": t}, ensure_ascii=False) for t in texts])
    tokenizer = train(str(corpus), vocab_size=300)
    save(tokenizer, tmp_path / "tok")

    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert loaded.convert_tokens_to_ids(SPECIAL_TOKENS) == [0, 1, 2]
    assert len(loaded) <= 300
    assert loaded.decode(loaded("新的句子 unseen 🚀")["input_ids"]) == "新的句子 unseen 🚀"
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好"}]
    assert loaded.apply_chat_template(messages, tokenize=False) == (
        turn("system", DEFAULT_SYSTEM) + turn("user", "你好") + turn("assistant", "好"))


def test_train_tokenizer_split_digits_gives_a_number_one_spelling(tmp_path):
    """--split_digits 1: the digits of 123 have the same ids wherever the number stands; with the
    shipped rule (0) the same corpus merges them differently by context."""
    from scripts.train_tokenizer import train

    corpus = tmp_path / "corpus.jsonl"
    texts = [f"x={n} ({n}) 是{n}个 {n}+{n * 3} price {n}" for n in range(100, 400)] * 3
    write_lines(corpus, [json.dumps({"text": t}, ensure_ascii=False) for t in texts])
    contexts = [" 123", "(123)", "x=123", "123+456", "是123个", '"123"']

    def ids_of_123(tokenizer, text):  # the ids of the pieces that hold the digits of 123
        start = text.index("123")
        encoding = tokenizer.encode(text)
        return tuple(i for i, (a, b) in zip(encoding.ids, encoding.offsets) if a < start + 3 and b > start)

    split = train(str(corpus), vocab_size=400, split_digits=True)
    assert {ids_of_123(split, c) for c in contexts} == {tuple(split.token_to_id(d) for d in "123")}
    assert split.decode(split.encode("x = 123+45 是6个").ids) == "x = 123+45 是6个"

    merged = train(str(corpus), vocab_size=400, split_digits=False)
    assert len({ids_of_123(merged, c) for c in contexts}) > 1


@pytest.mark.parametrize("bad_line,problem", [("not json {", "not valid JSON"), ('{"txt": "x"}', '"text"')])
def test_train_tokenizer_reports_bad_line_number(tmp_path, bad_line, problem):
    from scripts.train_tokenizer import BadLineCounter, read_texts

    corpus = tmp_path / "corpus.jsonl"
    write_lines(corpus, ['{"text": "a"}', '{"text": "b"}', bad_line, '{"text": "c"}'])
    with pytest.raises(ValueError, match=rf"corpus.jsonl:3: .*{problem}"):
        list(read_texts(str(corpus), skip_bad_lines=False, bad_lines=BadLineCounter()))

    counter = BadLineCounter()
    assert list(read_texts(str(corpus), skip_bad_lines=True, bad_lines=counter)) == ["a", "b", "c"]
    assert counter.count == 1
