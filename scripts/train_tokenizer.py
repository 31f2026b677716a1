"""
Train MiniMind's byte-level BPE tokenizer (6400 tokens) on a {"text": ...} jsonl file.

    python scripts/train_tokenizer.py --data_path dataset/tokenizer_train.jsonl --out_dir model/

Special tokens (fixed ids, see DESIGN.md):
    0 <|endoftext|>  padding / unknown
    1 <|im_start|>   beginning of a ChatML message (bos)
    2 <|im_end|>     end of a ChatML message (eos)
Added tokens that are text, not control (ids 3-8): <think> </think> <tool_call> </tool_call>
<tool_response> </tool_response>. Each is one token wherever it appears in a text, and
decode(..., skip_special_tokens=True) keeps it: it is part of a reasoning or tool-call answer.

The input is streamed line by line, so a 1 GB file never sits in memory. A line that is
not JSON or has no string "text" stops the run with "path:line: what is wrong", unless
--skip_bad_lines is given, in which case bad lines are counted and the count is printed.
"""
import argparse
import json
import os
import sys
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TAG_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
DEFAULT_SYSTEM = "You are a helpful assistant"

# MiniMind2's ChatML: the system turn is always written (the default one when the first
# message is not a system message); every user/assistant turn is <|im_start|>role\n...<|im_end|>\n.
# Tool conversations follow minimind-3's template (Qwen3 / "Hermes" format) without its empty
# <think></think>: with `tools` the system turn lists them (one JSON a line inside <tools>) and
# has no default text; an assistant's tool_calls follow its content as <tool_call> blocks; tool
# results are <tool_response> blocks in a user turn (consecutive tool messages share one turn).
# Whitespace control on every tag, so the text is exactly the quoted strings.
TOOLS_HEADER = ("# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
                "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>")
TOOLS_FOOTER = ("\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
                "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
                "{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call>")
CHAT_TEMPLATE = (
    # the system turn
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages[0]['role'] == 'system' -%}{{- messages[0]['content'] + '\\n\\n' -}}{%- endif -%}"
    "{{- '" + TOOLS_HEADER + "' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '" + TOOLS_FOOTER + "<|im_end|>\\n' -}}"
    "{%- elif messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    # the turns (a system message after the first is left out, as MiniMind2 does)
    "{%- for message in messages -%}"
    "{%- set content = message['content'] if message['content'] is string else '' -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '<|im_start|>user\\n' + content + '<|im_end|>\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' + content -}}"
    "{%- for call in (message['tool_calls'] or []) -%}"
    "{%- if content or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{%- set function = call['function'] if call['function'] is defined else call -%}"
    "{{- '<tool_call>\\n{\"name\": \"' + function['name'] + '\", \"arguments\": ' -}}"
    "{%- if function['arguments'] is string -%}{{- function['arguments'] -}}"
    "{%- else -%}{{- function['arguments'] | tojson -}}{%- endif -%}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- elif message['role'] == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


class BadLineCounter:
    def __init__(self):
        self.count = 0


def read_texts(path, skip_bad_lines, bad_lines):
    """Yield the "text" of every line; bad lines raise (or are counted when skipping)."""
    total_bytes = os.path.getsize(path)
    with open(path, "rb") as f, tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizer corpus") as bar:
        for line_no, raw in enumerate(f, start=1):
            bar.update(len(raw))
            if not raw.strip():
                continue
            problem = None
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                problem = f"not valid JSON ({e.msg})"
            else:
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    problem = 'no string "text" field'
            if problem is None:
                yield obj["text"]
            elif skip_bad_lines:
                bad_lines.count += 1
            else:
                raise ValueError(f"{path}:{line_no}: {problem}")


def pre_tokenizer(split_digits=False):
    """How a text is cut into pieces before BPE merges inside them.

    1. With --split_digits 1, every digit is a piece of its own (as in LLaMA and Qwen), so no
       merge ever joins digits or a space and a digit: "123" is the tokens 1 2 3 whatever stands
       around it (" 123", "(123)", "x=123", "是123个"). A number then has one spelling in ids,
       which a small model can copy digit by digit (into a tool call's arguments, say) and do
       arithmetic on; merged digits give it "12"+"3" in one place and " 1"+"23" in another.
       The shipped tokenizer merges digits (--split_digits 0): see bench/results/tokenizer.md.
    2. Byte-level (GPT-2's rule, as MiniMind2): words with their leading space, runs of
       punctuation, runs of spaces; every string is bytes, so no <unk> is ever produced and
       decoding gives back the exact text (spaces before digits included).
    """
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if not split_digits:  # the shipped tokenizer's rule (MiniMind2's): digits merge like letters
        return byte_level
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"), byte_level])


def train(data_path, vocab_size, skip_bad_lines=False, split_digits=False):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer(split_digits)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + TAG_TOKENS,  # listed first, so they get ids 0-8
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # our own byte progress bar covers the reading
    )
    bad_lines = BadLineCounter()
    tokenizer.train_from_iterator(read_texts(data_path, skip_bad_lines, bad_lines), trainer=trainer)
    if bad_lines.count:
        print(f"skipped {bad_lines.count} malformed line(s) in {data_path}")
    return tags_not_special(tokenizer)


def tags_not_special(tokenizer):
    """The trainer registers all its reserved tokens as special; the tags are text, so that
    decode(..., skip_special_tokens=True) keeps them."""
    data = json.loads(tokenizer.to_str())
    for added in data["added_tokens"]:
        if added["content"] in TAG_TOKENS:
            added["special"] = False
    return Tokenizer.from_str(json.dumps(data, ensure_ascii=False))


def tokenizer_config():
    """What transformers' AutoTokenizer reads next to tokenizer.json."""
    added_tokens = {
        str(i): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": tok in SPECIAL_TOKENS}
        for i, tok in enumerate(SPECIAL_TOKENS + TAG_TOKENS)
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added_tokens,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "add_bos_token": False,  # datasets add bos themselves, as MiniMind does
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
        "chat_template": CHAT_TEMPLATE,
    }


def save(tokenizer, out_dir):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    with open(out_dir / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(), f, ensure_ascii=False, indent=2)
        f.write("\n")


def self_check(out_dir, vocab_size):
    """Load the saved files the way every other script will, and check the basics."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out_dir))
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    print(f"vocab size: {len(tok)} (asked for {vocab_size}); special ids: {dict(zip(SPECIAL_TOKENS, ids))}")
    assert ids == [0, 1, 2], ids

    messages = [{"role": "user", "content": "你好，你是谁？"}, {"role": "assistant", "content": "我是MiniMind。"}]
    prompt = tok.apply_chat_template(messages, tokenize=False)
    print("chat template:\n" + prompt)
    round_trip = tok.decode(tok(prompt)["input_ids"])
    assert round_trip == prompt, "chat round-trip changed the text"

    tag_ids = tok.convert_tokens_to_ids(TAG_TOKENS)
    answer = "<think>\n想一想\n</think>\n<tool_call>\n{}\n</tool_call>\n<tool_response>\n{}\n</tool_response>"
    ids = tok(answer)["input_ids"]
    assert all(ids.count(i) == 1 for i in tag_ids), "a tag token is split"
    assert tok.decode(ids, skip_special_tokens=True) == answer, "decode drops a tag token"
    print(f"tag tokens (added, not special): {dict(zip(TAG_TOKENS, tag_ids))}")

    sample = "MiniMind 是一个小型语言模型 (small LM) 🚀, trained from scratch!"
    ids = tok(sample)["input_ids"]
    assert tok.decode(ids) == sample, "encode/decode is not the identity"
    print(f"encode/decode identity ok: {len(sample)} chars -> {len(ids)} tokens")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", default=str(ROOT / "dataset/tokenizer_train.jsonl"))
    parser.add_argument("--out_dir", default=str(ROOT / "model"))
    parser.add_argument("--vocab_size", type=int, default=6400)
    parser.add_argument("--skip_bad_lines", action="store_true", help="skip (and count) malformed lines")
    parser.add_argument("--split_digits", type=int, default=0,
                        help="0: digits merge as in MiniMind2 (the shipped tokenizer); 1: every digit is a token of "
                             "its own (see pre_tokenizer; costs 0-2%% more tokens, bench/results/tokenizer.md)")
    args = parser.parse_args()

    data_path = args.data_path
    if not os.path.exists(data_path):
        demo = ROOT / "dataset/demo/tokenizer_train.jsonl"
        print(f"{data_path} not found; using the bundled demo corpus {demo}")
        data_path = str(demo)
    try:
        tokenizer = train(data_path, args.vocab_size, args.skip_bad_lines, bool(args.split_digits))
    except ValueError as e:
        sys.exit(f"error: {e}\n(use --skip_bad_lines to skip malformed lines)")
    save(tokenizer, args.out_dir)
    print(f"saved tokenizer.json and tokenizer_config.json to {args.out_dir}")
    self_check(args.out_dir, args.vocab_size)


if __name__ == "__main__":
    main()
