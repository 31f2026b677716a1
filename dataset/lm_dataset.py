"""
Datasets and batching for every training stage.

    PretrainDataset   {"text": ...}                          -> (X, Y, loss_mask)
    SFTDataset        {"conversations": [messages]}          -> (X, Y, loss_mask)  (tool rows too)
    DPODataset        {"chosen": [...], "rejected": [...]}   -> dict of six tensors
    pad_collate, pack_collate, dpo_collate                   -> dicts of (B, T) tensors

X is the token sequence without its last token, Y the same sequence shifted by one
(Y[t] is the token that should follow X[..t]), and loss_mask[t] says whether Y[t] is trained.
Items are *not* padded: the collate functions pad to the longest item of the batch.

Big files. MiniMind's sft_512.jsonl is 7.5 GB and torchrun starts one process per GPU, so a
dataset never holds the file as Python objects. It keeps a byte-offset index of the lines
(16 bytes a line, memory-mapped, shared by all ranks through the page cache, reused by the next
run) and reads + tokenizes one line in __getitem__. The index is cached in `cache_dir`: by default
a `.minimind_cache/` folder next to the data file when that folder is writable, else the user's
cache ($XDG_CACHE_HOME/minimind/index, ~/.cache/minimind/index); trainers take --cache_dir.

Long chats (SFT, DPO). A reply that starts inside max_length is trained on the part that fits,
as in MiniMind2 (no <|im_end|> is added at the cut: the model must not learn to stop there).
A sample with no trained token inside the window (its first reply starts beyond max_length; for
DPO, either side) is not a training sample: the first open tokenizes every line once, keeps
only the trainable lines in a second cached index and counts the skipped and the cut ones
(`window_report()`). Skipping in the index, not in __getitem__ or the collate function, keeps
len(dataset) a fixed number: the sampler's order, every rank's share and the resume position
stay exact.

Bad lines. A line that is not JSON, lacks its keys, has roles out of order or an empty
assistant turn raises DataFormatError("path:line: what is wrong").
  - Files up to `validate_max_bytes` (256 MB by default: the demo files, sft_mini_512) are
    checked completely while the index is built, so errors appear before training starts.
  - Bigger pretraining files are checked lazily, line by line in __getitem__ (a full JSON pass
    over a huge file would take minutes); the error still names file and line. Chat files
    are read whole by their first open anyway (the counting pass below), which checks them.
  - skip_bad_lines=True always does the full pass, drops the bad lines from the index and
    prints how many were dropped (and the first few line numbers).
"""
import bisect
import contextlib
import functools
import hashlib
import json
import multiprocessing
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from model.inference import build_prompt_ids  # the prompt the policy continues, as every front end builds it
from model.tools import assistant_text, function_of, json_field

PAD_ID = 0
VALIDATE_MAX_BYTES = 256 * 1024 ** 2
INDEX_FORMAT_VERSION = 2
CACHE_FOLDER_NAME = ".minimind_cache"
LFS_POINTER_START = b"version https://git-lfs.github.com/spec/"


class DataFormatError(ValueError):
    """A malformed line of a data file; the message starts with 'path:line:'."""


# ------------------------------------------------------------------ line validation

def check_conversation(messages):
    """Return what is wrong with a list of chat messages, or None if it is fine.

    Allowed shape: an optional system message first, then user/assistant turns strictly
    alternating, starting with user and ending with assistant (otherwise nothing to train).
    """
    if not isinstance(messages, list) or not messages:
        return "conversation must be a non-empty list of messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {i} must be an object with string 'role' and 'content'"
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            return f"roles out of order: turn {i} is '{m['role']}', expected '{expected}'"
        if expected == "assistant" and not m["content"].strip():
            return f"empty assistant turn (turn {i})"
    if not turns or turns[-1]["role"] != "assistant":
        return "conversation must end with an assistant turn"
    return None


def is_tool_conversation(sample):
    """A row in one of the two tool shapes: minimind-3's (a message carrying `tools`, assistant
    messages carrying `tool_calls`, `tool` messages) or OpenAI's (`tools` beside the messages)."""
    messages = sample.get("conversations", sample.get("messages"))
    return "tools" in sample or (isinstance(messages, list) and any(
        isinstance(m, dict) and (m.get("role") == "tool" or m.get("tools") or m.get("tool_calls")) for m in messages))


def conversation_of(sample):
    """(messages, tools) of an SFT row: `conversations` or `messages`; `tools` beside them or on
    a message; `tools` and `tool_calls` as JSON strings or objects. Raises ValueError."""
    messages = sample["conversations"] if "conversations" in sample else sample["messages"]
    if not is_tool_conversation(sample):
        return messages, None
    tools = sample.get("tools")
    cleaned = []
    for i, message in enumerate(messages):
        message = dict(message)
        if message.get("tools"):
            tools = message["tools"]
        message.pop("tools", None)
        if message.get("tool_calls"):
            message["tool_calls"] = json_field(message["tool_calls"], f"message {i} tool_calls")
        else:
            message.pop("tool_calls", None)
        cleaned.append(message)
    return cleaned, json_field(tools, "tools") or None


def check_tool_calls(calls, i):
    if not isinstance(calls, list) or not calls:
        return f"message {i}: tool_calls must be a non-empty list"
    for call in calls:
        function = function_of(call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                or not isinstance(function.get("arguments", {}), (dict, str)):
            return f'message {i}: each tool call needs a string "name" and "arguments" (an object or a JSON string)'
    return None


# which role may follow which in a tool conversation ("assistant+calls": an assistant that calls tools)
NEXT_ROLES = {"start": {"user"}, "user": {"assistant", "assistant+calls"},
              "assistant": {"user"}, "assistant+calls": {"tool"}, "tool": {"tool", "assistant", "assistant+calls"}}


def check_tool_conversation(messages, tools):
    """Like check_conversation, for tool rows: after an assistant message with tool_calls come one
    or more tool messages, then the assistant again; the conversation ends with an answer."""
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        return "tools must be a list of objects"
    if not isinstance(messages, list) or not messages:
        return "conversation must be a non-empty list of messages"
    state = "start"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content") if m.get("content") is not None else "", str):
            return f"message {i} must be an object with string 'role' and string (or null) 'content'"
        if i == 0 and m["role"] == "system":
            continue
        role = m["role"]
        if role == "assistant" and m.get("tool_calls"):
            problem = check_tool_calls(m["tool_calls"], i)
            if problem:
                return problem
            role = "assistant+calls"
        elif role == "assistant" and not (m.get("content") or "").strip():
            return f"empty assistant turn (message {i})"
        if role not in NEXT_ROLES[state]:
            return f"roles out of order: message {i} is '{role}' after '{state}'"
        state = role
    if state != "assistant":
        return "conversation must end with an assistant answer"
    return None


def check_pretrain(obj):
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        return 'missing string key "text"'
    return None


def check_sft(obj):
    if not isinstance(obj, dict) or not ("conversations" in obj or "messages" in obj):
        return 'missing key "conversations" (or "messages")'
    if not is_tool_conversation(obj):
        return check_conversation(obj["conversations"] if "conversations" in obj else obj["messages"])
    try:
        return check_tool_conversation(*conversation_of(obj))
    except (ValueError, TypeError, AttributeError) as e:
        return str(e)


def check_dpo(obj):
    if not isinstance(obj, dict) or "chosen" not in obj or "rejected" not in obj:
        return 'missing key "chosen" or "rejected"'
    for key in ("chosen", "rejected"):
        problem = check_conversation(obj[key])
        if problem:
            return f"{key}: {problem}"
    return None


def prompt_messages(conversations):
    """An RL prompt from minimind-3's rlaif rows: the conversation without its final assistant
    turn (which rlaif.jsonl rows carry, often empty); it must then end with a user turn."""
    if isinstance(conversations, list) and conversations and isinstance(conversations[-1], dict) \
            and conversations[-1].get("role") == "assistant":
        return conversations[:-1]
    return conversations


def check_rlaif(obj):
    if not isinstance(obj, dict) or "conversations" not in obj:
        return 'missing key "conversations"'
    messages = prompt_messages(obj["conversations"])
    if not isinstance(messages, list) or not messages:
        return "conversation must hold a user turn (a final assistant turn is dropped to make the prompt)"
    problem = check_conversation(messages + [{"role": "assistant", "content": "(reply)"}])
    if problem:
        return f"{problem} (after dropping a final assistant turn the prompt must end with a user turn)"
    return None


def parse_line(raw, check):
    """(object, None) for a good line, (None, problem) for a bad one."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, f"not valid JSON ({e})"
    return obj, check(obj)


# ------------------------------------------------------------------ on-disk line index

# One row per usable line. Stored as a raw array (np.memmap), written chunk by chunk, so
# neither building nor using the index ever holds it all in memory.
INDEX_ROW = np.dtype([("offset", "<u8"), ("length", "<u4"), ("line", "<u4")])


def chunked_line_rows(f, chunk_bytes):
    """Yield (rows, data, base) per chunk of the file: the chunk's complete lines as INDEX_ROW
    (line = 1-based line number), the bytes they come from and the file offset of data[0]."""
    carry, pos, line_no = b"", 0, 0
    while True:
        chunk = f.read(chunk_bytes)
        data = carry + chunk
        base = pos - len(carry)
        pos += len(chunk)
        ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == ord("\n")) + 1
        if not chunk and data:  # the last line has no final newline
            ends = np.append(ends, len(data))
        if len(ends):
            starts = np.concatenate([[0], ends[:-1]])
            rows = np.empty(len(ends), dtype=INDEX_ROW)
            rows["offset"], rows["length"] = base + starts, ends - starts
            rows["line"] = np.arange(line_no + 1, line_no + 1 + len(ends))
            line_no += len(ends)
            yield rows, data, base
            carry = data[ends[-1]:]
        else:
            carry = data  # a line longer than the chunk: keep reading
        if not chunk:
            return


def user_cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "minimind" / "index"


def is_writable_folder(folder):
    """Create `folder` if needed and write a probe file in it (os.access is wrong for root and
    for read-only mounts, so try it for real)."""
    try:
        folder.mkdir(exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def default_cache_dir(data_path):
    """Next to the data (`<data folder>/.minimind_cache`) when writable, else the user's cache."""
    beside = Path(data_path).resolve().parent / CACHE_FOLDER_NAME
    return beside if is_writable_folder(beside) else user_cache_dir()


def reject_lfs_pointer(path):
    """A clone without `git lfs` holds ~130-byte pointer files instead of the data."""
    with open(path, "rb") as f:
        head = f.read(1024)
    if head.startswith(LFS_POINTER_START):
        size = next((line.split()[1].decode() for line in head.splitlines() if line.startswith(b"size ")), "?")
        raise DataFormatError(f"{path}: this is a Git LFS pointer, not the data: run `git lfs pull` in the "
                              f"repository that holds it (the real file has {size} bytes)")


def index_cache_path(path, tag, cache_dir):
    """The index file of `path`: keyed by absolute path, size and mtime, so an edit rebuilds it."""
    st = os.stat(path)
    key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{tag}|v{INDEX_FORMAT_VERSION}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{Path(path).name}.{digest}.idx"


@contextlib.contextmanager
def build_lock(target):
    """Held while `target` is built: the ranks of one machine (or of a shared disk) that open the
    same data wait for the first one and reuse its file instead of all building it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no flock (Windows): every process builds its own copy; the rename is atomic
        yield
        return
    with open(target.with_name(target.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_output(target):
    """A binary file object that becomes `target` only when the block ends without error."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def build_index(path, check, validate, skip_bad_lines, target, chunk_bytes=16 * 1024 ** 2):
    """Write the index of `path` to `target`: one INDEX_ROW per usable line.

    Written to a temp file, then renamed: concurrent ranks never see a half-written index.
    """
    bad = []
    with open(path, "rb") as f, atomic_output(target) as out:
        for rows, data, base in chunked_line_rows(f, chunk_bytes):
            keep = np.ones(len(rows), dtype=bool)
            # without validation only the short lines need a look (are they blank?)
            to_check = range(len(rows)) if validate or skip_bad_lines else np.flatnonzero(rows["length"] <= 2)
            for i in to_check:
                row = rows[i]
                start = int(row["offset"]) - base
                raw = data[start:start + int(row["length"])]
                if row["length"] <= 2 and not raw.strip():
                    keep[i] = False  # blank lines are not data (a trailing one is common)
                    continue
                if not (validate or skip_bad_lines):
                    continue
                _, problem = parse_line(raw, check)
                if problem is None:
                    continue
                if not skip_bad_lines:
                    raise DataFormatError(f"{path}:{int(row['line'])}: {problem}")
                keep[i] = False
                bad.append(int(row["line"]))
            out.write(rows[keep].tobytes())
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
        print(f"{path}: skipped {len(bad)} malformed line(s) (line {shown})")


def load_index(index_path):
    if os.path.getsize(index_path) == 0:  # np.memmap refuses empty files
        return np.zeros(0, dtype=INDEX_ROW)
    return np.memmap(index_path, dtype=INDEX_ROW, mode="r")  # shared, read-only pages


class JsonlLines:
    """Random access to the JSON lines of a file through a cached byte-offset index."""

    def __init__(self, path, check, skip_bad_lines=False, validate_max_bytes=VALIDATE_MAX_BYTES, cache_dir=None):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file not found: {path}")
        reject_lfs_pointer(path)
        self.path = str(path)
        self.check = check
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(path)
        validate = os.path.getsize(path) <= validate_max_bytes
        self.tag = f"{check.__name__}|validate={validate}|skip={skip_bad_lines}"
        cache = index_cache_path(path, self.tag, self.cache_dir)
        with build_lock(cache):
            self.reused_index = cache.exists()
            if not self.reused_index:
                build_index(path, check, validate, skip_bad_lines, cache)
        self.index_path = cache
        self.index = load_index(cache)
        self.file, self.file_pid = None, None  # opened lazily, once per (worker) process

    def keep_trainable(self, fit_tag, sample_fits, unit="samples"):
        """Keep only the lines whose sample has something to train; returns their WindowCounts.

        sample_fits(list of objects) -> list of (cut, trainable). The kept rows and the counts
        are cached like the line index (fit_tag names the tokenizer and max_length), so only the
        first open pays for tokenizing every line."""
        target = index_cache_path(self.path, f"{self.tag}|{fit_tag}", self.cache_dir)
        counts_file = target.with_suffix(".json")
        with build_lock(target):
            if not (target.exists() and counts_file.exists()):
                build_trainable_index(self, sample_fits, target, counts_file)
        with open(counts_file, encoding="utf-8") as f:
            counts = WindowCounts(unit=unit, **json.load(f))
        self.index_path = target
        self.index = load_index(target)
        return counts

    def __len__(self):
        return len(self.index)

    def line_lengths(self):
        """Byte length of every line: a free proxy for token length (length-grouped batching)."""
        return np.asarray(self.index["length"])

    def __getitem__(self, i):
        row = self.index[i]
        offset, length, line_no = int(row["offset"]), int(row["length"]), int(row["line"])
        if self.file is None or self.file_pid != os.getpid():  # a forked process opens its own handle
            self.file, self.file_pid = open(self.path, "rb"), os.getpid()
        self.file.seek(offset)
        obj, problem = parse_line(self.file.read(length), self.check)
        if problem:
            raise DataFormatError(f"{self.path}:{line_no}: {problem}")
        return obj

    def __getstate__(self):
        # Sent to DataLoader workers (spawn) without the file handle and without the index
        # data: each worker maps the same index file again instead of receiving a copy.
        state = self.__dict__.copy()
        state["file"] = None
        state["index"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.index = load_index(self.index_path)


# ------------------------------------------------------------------ samples inside the window

@dataclass
class WindowCounts:
    """How the samples of a file fit in max_length tokens."""
    total: int    # samples in the file
    cut: int      # longer than max_length, trained on the part that fits
    skipped: int  # nothing to train inside max_length: left out
    unit: str = "samples"

    def describe(self, max_length, flag="--max_seq_len"):
        what = {"pairs": "have a side with no reply", "prompts": "do not fit"}.get(self.unit, "have no reply")
        return (f"{self.skipped:,} of {self.total:,} {self.unit} ({percent(self.skipped, self.total)}) {what} "
                f"inside {flag} {max_length} and are skipped; {self.cut:,} ({percent(self.cut, self.total)}) "
                f"are cut (trained on the part that fits)")


def percent(part, whole):
    share = 100 * part / max(whole, 1)
    return "<0.1%" if 0 < share < 0.05 else f"{share:.1f}%"


FIT_BATCH = 256  # lines tokenized in one call while the trainable index is built


def fits_of_rows(lines, sample_fits, start, stop):
    """(cut, trainable) flags of lines[start:stop] as two bool arrays."""
    cut = np.zeros(stop - start, dtype=bool)
    trainable = np.zeros(stop - start, dtype=bool)
    for first in range(start, stop, FIT_BATCH):
        last = min(first + FIT_BATCH, stop)
        fits = sample_fits([lines[i] for i in range(first, last)])
        cut[first - start:last - start] = [c for c, _ in fits]
        trainable[first - start:last - start] = [t for _, t in fits]
    return cut, trainable


_FORKED_JOB = None  # (lines, sample_fits) inherited by forked workers; never pickled


def _fits_in_worker(bounds):
    lines, sample_fits = _FORKED_JOB
    return fits_of_rows(lines, sample_fits, *bounds)


def fit_workers(num_lines):
    """Processes for the tokenizing pass: all the cores this process may use, for big files."""
    if num_lines < 50_000 or not hasattr(os, "fork"):
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, 32))


def chunked_fits(lines, sample_fits, chunk=65_536, workers=None):
    """Yield (start, cut, trainable) for consecutive chunks of lines, in order; big files are
    tokenized by forked worker processes (the tokenizer is pure CPU work)."""
    bounds = [(start, min(start + chunk, len(lines))) for start in range(0, len(lines), chunk)]
    workers = workers or fit_workers(len(lines))
    if workers == 1:
        for start, stop in bounds:
            yield (start, *fits_of_rows(lines, sample_fits, start, stop))
        return
    global _FORKED_JOB
    _FORKED_JOB = (lines, sample_fits)
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for (start, _), (cut, trainable) in zip(bounds, pool.imap(_fits_in_worker, bounds)):
                yield start, cut, trainable
    finally:
        _FORKED_JOB = None


def build_trainable_index(lines, sample_fits, target, counts_file):
    """Write the rows of `lines` that have a trained token inside the window, and the counts."""
    if len(lines) >= 50_000:
        print(f"{lines.path}: tokenizing its {len(lines):,} samples once to find those that do not fit "
              f"(cached in {target.parent})", flush=True)
    total = cut_count = skipped = 0
    with atomic_output(target) as out:
        for start, cut, trainable in chunked_fits(lines, sample_fits):
            rows = lines.index[start:start + len(cut)]
            out.write(np.asarray(rows[trainable]).tobytes())
            total += len(cut)
            cut_count += int((cut & trainable).sum())
            skipped += int((~trainable).sum())
    with atomic_output(counts_file) as out:
        out.write(json.dumps({"total": total, "cut": cut_count, "skipped": skipped}).encode())


def tokenizer_fingerprint(tokenizer):
    """Changes whenever the tokens or the chat template change (the cached fits depend on both)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = (backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items())))
    text += str(getattr(tokenizer, "chat_template", ""))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------ tokenization helpers

def shifted(ids, token_mask):
    """(X, Y, loss_mask) from a token sequence and a per-token 'is trained' mask."""
    ids = torch.tensor(ids, dtype=torch.long)
    token_mask = torch.tensor(token_mask, dtype=torch.long)
    return ids[:-1], ids[1:], token_mask[1:]


def assistant_char_spans(text, messages):
    """Character spans of each assistant reply (its content and tool calls) + its <|im_end|> in
    the rendered chat text.

    The spans are located in order, so a reply that also appears earlier in the text (for
    example quoted by the user) is still found at its own place.
    """
    spans, cursor = [], 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        opener, body = "<|im_start|>assistant\n", assistant_text(m)
        start = text.find(opener + body + "<|im_end|>", cursor)
        if start < 0:
            raise ValueError("chat template output does not contain an assistant turn as ChatML")
        start += len(opener)
        end = start + len(body) + len("<|im_end|>")
        spans.append((start, end))
        cursor = end
    return spans


def tokens_inside(offsets, spans):
    """Mask that is 1 on every token lying wholly inside one of the character spans."""
    mask = [0] * len(offsets)
    starts = [s for s, _ in offsets]
    for start, end in spans:
        i = bisect.bisect_left(starts, start)
        while i < len(offsets) and offsets[i][1] <= end:
            mask[i] = 1
            i += 1
    return mask


def chat_encodings(tokenizer, conversations, tools_list=None):
    """(ids, mask) of whole conversations, uncut: mask is 1 on assistant content, tool calls and
    <|im_end|>; the tools block and the tool results (user turns) are not trained.

    The newline after <|im_end|> is not trained (it is template glue, not model output).
    All conversations go through one tokenizer call (faster when building the index)."""
    tools_list = tools_list or [None] * len(conversations)
    texts = [tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
             for messages, tools in zip(conversations, tools_list)]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [(ids, tokens_inside(offsets, assistant_char_spans(text, messages)))
            for ids, offsets, text, messages in zip(encoded["input_ids"], encoded["offset_mapping"], texts,
                                                   conversations)]


def chat_ids_and_mask(tokenizer, messages, max_length, tools=None):
    """Token ids of a conversation cut to max_length, and its mask of trained tokens.

    Truncation as in MiniMind2: a reply that starts inside max_length is trained on the part
    that fits, and no <|im_end|> is put at the cut (the model must not learn to stop where the
    window ends). Replies past the window are simply not there."""
    ids, mask = chat_encodings(tokenizer, [messages], [tools])[0]
    return ids[:max_length], mask[:max_length]


def window_fit(ids, mask, max_length):
    """(cut, trainable) of one encoded conversation: longer than the window, and has a trained
    target inside it (position 0 is never a target: Y starts at the second token)."""
    return len(ids) > max_length, any(mask[1:max_length])


def chat_fits(tokenizer, max_length, conversations, tools_list=None):
    return [window_fit(ids, mask, max_length) for ids, mask in chat_encodings(tokenizer, conversations, tools_list)]


# ------------------------------------------------------------------ datasets

class PretrainDataset(Dataset):
    """Text, cut to max_length tokens; every real token is trained.

    Document markers: bos (<|im_start|>) in front and eos (<|im_end|>) at the end, each added
    only where the text does not already carry it. MiniMind2's pretrain_hq.jsonl lines are
    written as "<|im_start|>...<|im_end|>" and get nothing added (as MiniMind2 trains them);
    plain text gets both (README, "Pretraining data": measured on the demo data).

    A document longer than max_length loses its tail *and* its eos: eos means "the document
    ends here", which is not true at the cut.
    """

    def __init__(self, data_path, tokenizer, max_length=512, skip_bad_lines=False, **index_kwargs):
        self.lines = JsonlLines(data_path, check_pretrain, skip_bad_lines, **index_kwargs)
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __len__(self):
        return len(self.lines)

    def __getitem__(self, i):
        text = self.lines[i]["text"]
        ids = self.with_document_markers(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        ids = ids[: self.max_length]
        return shifted(ids, [1] * len(ids))

    def with_document_markers(self, ids):
        """bos + ids + eos, leaving out a marker the text already has at that end."""
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        starts_marked = bool(ids) and ids[0] == bos
        ends_marked = bool(ids) and ids[-1] == eos
        return ([] if starts_marked else [bos]) + ids + ([] if ends_marked else [eos])


def sft_fits(tokenizer, max_length, samples):
    conversations, tools_list = zip(*[conversation_of(sample) for sample in samples]) if samples else ((), ())
    return chat_fits(tokenizer, max_length, list(conversations), list(tools_list))


class SFTDataset(Dataset):
    """Chat data rendered with the tokenizer's ChatML template; loss only on the replies.

    Trained: each assistant turn's content, its tool calls and its closing <|im_end|> (all turns
    of a multi-turn conversation; a reply cut by max_length on the part that fits). Masked: the
    system and user turns (the tools block, tool results), the role headers, the newline after
    <|im_end|>. Rows: {"conversations": [...]} or {"messages": [...]}; tool rows in minimind-3's
    shape (a message with `tools`, assistant `tool_calls`, JSON strings or objects) or OpenAI's
    (`tools` beside the messages). Reasoning data
    (<think>/<answer>) is used as is. Samples with nothing to train inside max_length are
    skipped and counted (window_report()).
    """

    def __init__(self, jsonl_path, tokenizer, max_length=1024, skip_bad_lines=False, **index_kwargs):
        self.lines = JsonlLines(jsonl_path, check_sft, skip_bad_lines, **index_kwargs)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.window = self.lines.keep_trainable(f"sft|{tokenizer_fingerprint(tokenizer)}|{max_length}",
                                                 functools.partial(sft_fits, tokenizer, max_length))

    def window_report(self, flag="--max_seq_len"):
        """One line: how many samples are skipped (nothing to train inside max_length) and cut."""
        return self.window.describe(self.max_length, flag)

    def __len__(self):
        return len(self.lines)

    def __getitem__(self, i):
        messages, tools = conversation_of(self.lines[i])
        ids, mask = chat_ids_and_mask(self.tokenizer, messages, self.max_length, tools)
        return shifted(ids, mask)


def dpo_fits(tokenizer, max_length, pairs):
    """A pair is cut if either side is, and trainable only if both sides are."""
    chosen = chat_fits(tokenizer, max_length, [pair["chosen"] for pair in pairs])
    rejected = chat_fits(tokenizer, max_length, [pair["rejected"] for pair in pairs])
    return [(c_cut or r_cut, c_ok and r_ok) for (c_cut, c_ok), (r_cut, r_ok) in zip(chosen, rejected)]


class DPODataset(Dataset):
    """Preference pairs: both conversations are built like SFT items (same masks); a pair with a
    side that has nothing to train inside max_length is skipped."""

    def __init__(self, file_path, tokenizer, max_length=1024, skip_bad_lines=False, **index_kwargs):
        self.lines = JsonlLines(file_path, check_dpo, skip_bad_lines, **index_kwargs)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.window = self.lines.keep_trainable(f"dpo|{tokenizer_fingerprint(tokenizer)}|{max_length}",
                                                 functools.partial(dpo_fits, tokenizer, max_length), unit="pairs")

    def window_report(self, flag="--max_seq_len"):
        """One line: how many pairs are skipped (a side with nothing to train) and cut."""
        return self.window.describe(self.max_length, flag)

    def __len__(self):
        return len(self.lines)

    def __getitem__(self, i):
        pair = self.lines[i]
        item = {}
        for side in ("chosen", "rejected"):
            x, y, mask = shifted(*chat_ids_and_mask(self.tokenizer, pair[side], self.max_length))
            item[f"x_{side}"], item[f"y_{side}"], item[f"mask_{side}"] = x, y, mask
        return item


def prompt_fits(tokenizer, max_length, samples):
    return [(False, len(build_prompt_ids(tokenizer, prompt_messages(s["conversations"])))
             <= max_length) for s in samples]


class RLAIFDataset(Dataset):
    """Prompts for online RL (GRPO, PPO): minimind-3's rlaif.jsonl rows, with an optional
    "answer" the correctness reward checks. A prompt longer than max_length is skipped and
    counted (window_report()); cutting it would drop the question or the system turn.

    An item is {"prompt_ids": [...], "messages": the prompt's messages, "sample": the row,
    "index": its position in the dataset} (the index seeds the item's rollouts)."""

    def __init__(self, jsonl_path, tokenizer, max_length=512, skip_bad_lines=False, **index_kwargs):
        self.lines = JsonlLines(jsonl_path, check_rlaif, skip_bad_lines, **index_kwargs)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.window = self.lines.keep_trainable(f"rlaif|{tokenizer_fingerprint(tokenizer)}|{max_length}",
                                                 functools.partial(prompt_fits, tokenizer, max_length),
                                                 unit="prompts")

    def window_report(self, flag="--max_seq_len"):
        return self.window.describe(self.max_length, flag)

    def __len__(self):
        return len(self.lines)

    def __getitem__(self, i):
        sample = self.lines[i]
        messages = prompt_messages(sample["conversations"])
        return {"prompt_ids": build_prompt_ids(self.tokenizer, messages), "messages": messages, "sample": sample,
                "index": i}


def prompt_collate(items):
    """RL prompts stay lists (they are generated from, not stacked): {key: [value per item]}."""
    return {key: [item[key] for item in items] for key in items[0]}


# ------------------------------------------------------------------ batching

def pad_right(sequences, value, length=None):
    """Stack 1D tensors into (B, length), padding on the right."""
    length = length or max(len(s) for s in sequences)
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    for row, s in enumerate(sequences):
        out[row, : len(s)] = s
    return out


def pad_collate(batch):
    """Pad (X, Y, loss_mask) items to the longest one in the batch.

    Right padding needs no attention mask: with causal attention a real token never sees
    the padding after it, and the padded positions have loss_mask 0.
    """
    xs, ys, masks = zip(*batch)
    return {"input_ids": pad_right(xs, PAD_ID), "labels": pad_right(ys, PAD_ID), "loss_mask": pad_right(masks, 0)}


def dpo_collate(batch):
    """Pad chosen and rejected sequences to one common length (they are run as one batch)."""
    length = max(max(len(item["x_chosen"]), len(item["x_rejected"])) for item in batch)
    out = {}
    for side in ("chosen", "rejected"):
        out[f"x_{side}"] = pad_right([item[f"x_{side}"] for item in batch], PAD_ID, length)
        out[f"y_{side}"] = pad_right([item[f"y_{side}"] for item in batch], PAD_ID, length)
        out[f"mask_{side}"] = pad_right([item[f"mask_{side}"] for item in batch], 0, length)
    return out


def pack_into_rows(lengths, capacity):
    """First-fit decreasing: groups of item indices whose lengths sum to <= capacity."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r in range(len(rows)):
            if lengths[i] <= room[r]:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def pack_collate(batch):
    """Pack several documents into each row (pretraining), attention kept inside each document.

    Row capacity is the longest item of the batch, so the batch usually has fewer, fuller
    rows than items. Returns, besides input_ids/labels/loss_mask:
      position_ids  (B, T)  restart at 0 at every document, as if it were alone
      document_ids  (B, T)  0, 1, 2, ... per document of the row, -1 on padding
    The model turns document_ids into its causal, block-diagonal attention mask on its own
    device (model_minimind.document_attention_mask), so no B x T x T mask is built here or
    copied to the GPU. Padding has loss_mask 0. Each document's loss equals its unpacked loss.
    """
    capacity = max(len(x) for x, _, _ in batch)
    rows = pack_into_rows([len(x) for x, _, _ in batch], capacity)
    input_ids = torch.full((len(rows), capacity), PAD_ID, dtype=torch.long)
    labels = torch.full_like(input_ids, PAD_ID)
    loss_mask = torch.zeros_like(input_ids)
    position_ids = torch.zeros_like(input_ids)
    document_ids = torch.full_like(input_ids, -1)  # -1 = padding
    for r, members in enumerate(rows):
        pos = 0
        for doc, i in enumerate(members):
            x, y, m = batch[i]
            n = len(x)
            input_ids[r, pos:pos + n], labels[r, pos:pos + n], loss_mask[r, pos:pos + n] = x, y, m
            position_ids[r, pos:pos + n] = torch.arange(n)
            document_ids[r, pos:pos + n] = doc
            pos += n
    return {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask,
            "position_ids": position_ids, "document_ids": document_ids}
