"""
Compression of the shipped tokenizer on held-out real text (characters per token).

The held-out text is the man pages whose command names scripts/make_tokenizer_corpus.py
kept out of the training corpus (Chinese: manpages-zh, English: /usr/share/man).

    python scripts/make_tokenizer_corpus.py      # writes dataset/.cache/tokenizer/heldout_*.jsonl
    python bench/bench_tokenizer.py              # writes bench/results/tokenizer.json

Figures:
  zh_chars_per_token      all characters of the Chinese pages / their tokens (the pages mix
                          Chinese prose with option names, as technical text does)
  zh_cjk_chars_per_token  only the runs of Chinese characters and Chinese punctuation, tokenized
                          on their own: the strict "Chinese characters per token"
  en_chars_per_token      all characters of the English pages / their tokens
  en_prose_chars_per_token  English prose never used in training: the license texts in
                          /usr/share/common-licenses (GPL-3, Apache-2.0, MPL-2.0)
"""
import argparse
import json
import re
from pathlib import Path

from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
PROSE_FILES = ["/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0",
               "/usr/share/common-licenses/MPL-2.0"]
CJK_RUN = re.compile(r"[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]+")
# MiniMind2's tokenizer on mixed zh/en technical text, and the 95% goal of issue 3
REFERENCE = {"zh": 1.24, "en": 3.9}
GOAL = {"zh": 1.17, "en": 3.67}  # as stated in issue 3 (~95%)


def read_texts(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def chars_per_token(tokenizer, texts):
    chars = sum(len(t) for t in texts)
    tokens = sum(len(ids) for ids in tokenizer(texts)["input_ids"])
    return chars / tokens, chars, tokens


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer_dir", default=str(ROOT / "model"))
    parser.add_argument("--heldout_dir", default=str(ROOT / "dataset/.cache/tokenizer"))
    parser.add_argument("--out", default=str(ROOT / "bench/results/tokenizer.json"))
    args = parser.parse_args()

    heldout = Path(args.heldout_dir)
    if not (heldout / "heldout_zh.jsonl").exists():
        raise SystemExit(f"{heldout}/heldout_zh.jsonl missing: run python scripts/make_tokenizer_corpus.py first")
    tok = AutoTokenizer.from_pretrained(args.tokenizer_dir)
    zh_texts = read_texts(heldout / "heldout_zh.jsonl")
    en_texts = read_texts(heldout / "heldout_en.jsonl")
    cjk_runs = [run for t in zh_texts for run in CJK_RUN.findall(t)]

    zh, zh_chars, zh_tokens = chars_per_token(tok, zh_texts)
    cjk, cjk_chars, cjk_tokens = chars_per_token(tok, cjk_runs)
    en, en_chars, en_tokens = chars_per_token(tok, en_texts)
    prose = [re.sub(r"\s+", " ", Path(p).read_text()) for p in PROSE_FILES if Path(p).exists()]
    en_prose = chars_per_token(tok, prose)[0] if prose else None
    result = {
        "tokenizer_dir": args.tokenizer_dir if args.tokenizer_dir != str(ROOT / "model") else "model/",
        "vocab_size": len(tok),
        "heldout": {"zh_pages": len(zh_texts), "zh_chars": zh_chars, "zh_cjk_chars": cjk_chars,
                    "en_pages": len(en_texts), "en_chars": en_chars},
        "zh_chars_per_token": round(zh, 3),
        "zh_cjk_chars_per_token": round(cjk, 3),
        "en_chars_per_token": round(en, 3),
        "en_prose_chars_per_token": round(en_prose, 3) if en_prose else None,
        "minimind2_reference": REFERENCE,
        "goal_95_percent": GOAL,
        "goal_met": {"zh_strict_cjk": cjk >= GOAL["zh"], "zh_pages": zh >= GOAL["zh"], "en_man_pages": en >= GOAL["en"],
                     "en_prose": bool(en_prose and en_prose >= GOAL["en"])},
    }
    print(json.dumps(result, indent=2, ensure_ascii=False))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
