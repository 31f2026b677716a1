"""
Datasets and batching for every training stage.

    PretrainDataset   {"text": ...}                          -> (X, Y, loss_mask)
    SFTDataset        {"conversations": [messages]}          -> (X, Y, loss_mask)
    DPODataset        {"chosen": [...], "rejected": [...]}   -> dict of six tensors
    pad_collate, pack_collate, dpo_collate                   -> dicts of (B, T) tensors

X is the token sequence without its last token, Y the same sequence shifted by one
(Y[t] is the token that should follow X[..t]), and loss_mask[t] says whether Y[t] is trained.
Items are *not* padded: the collate functions pad to the longest item of the batch.

Big files. MiniMind's sft_512.jsonl is 7.5 GB and torchrun starts one process per GPU, so a
dataset never holds the file as Python objects. It keeps a byte-offset index of the lines
(16 bytes a line, cached under dataset/.cache/index/, memory-mapped, shared by all ranks through
the page cache, reused by the next run) and reads + tokenizes one line in __getitem__.

Bad lines. A line that is not JSON, lacks its keys, has roles out of order or an empty
assistant turn raises DataFormatError("path:line: what is wrong").
  - Files up to `validate_max_bytes` (256 MB by default: the demo files, sft_mini_512) are
    checked completely while the index is built, so errors appear before training starts.
  - Bigger files are checked lazily, line by line in __getitem__ (a full JSON pass over
    7.5 GB would take minutes on every new file); the error still names file and line.
  - skip_bad_lines=True always does the full pass, drops the bad lines from the index and
    prints how many were dropped (and the first few line numbers).
"""
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE_DIR = ROOT / "dataset" / ".cache" / "index"
PAD_ID = 0
VALIDATE_MAX_BYTES = 256 * 1024 ** 2
INDEX_FORMAT_VERSION = 2


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


def check_pretrain(obj):
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        return 'missing string key "text"'
    return None


def check_sft(obj):
    if not isinstance(obj, dict) or "conversations" not in obj:
        return 'missing key "conversations"'
    return check_conversation(obj["conversations"])


def check_dpo(obj):
    if not isinstance(obj, dict) or "chosen" not in obj or "rejected" not in obj:
        return 'missing key "chosen" or "rejected"'
    for key in ("chosen", "rejected"):
        problem = check_conversation(obj[key])
        if problem:
            return f"{key}: {problem}"
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


def index_cache_path(path, tag, cache_dir):
    """The index file of `path`: keyed by absolute path, size and mtime, so an edit rebuilds it."""
    st = os.stat(path)
    key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{tag}|v{INDEX_FORMAT_VERSION}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{Path(path).name}.{digest}.idx"


def build_index(path, check, validate, skip_bad_lines, target, chunk_bytes=16 * 1024 ** 2):
    """Write the index of `path` to `target`: one INDEX_ROW per usable line.

    Written to a temp file, then renamed: concurrent ranks never see a half-written index
    (if several build it at once, each writes its own and the last rename wins).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    bad = []
    try:
        with open(path, "rb") as f, os.fdopen(fd, "wb") as out:
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
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
        print(f"{path}: skipped {len(bad)} malformed line(s) (line {shown})")


def load_index(index_path):
    if os.path.getsize(index_path) == 0:  # np.memmap refuses empty files
        return np.zeros(0, dtype=INDEX_ROW)
    return np.memmap(index_path, dtype=INDEX_ROW, mode="r")  # shared, read-only pages


class JsonlLines:
    """Random access to the JSON lines of a file through a cached byte-offset index."""

    def __init__(self, path, check, skip_bad_lines=False, validate_max_bytes=VALIDATE_MAX_BYTES,
                 cache_dir=DEFAULT_CACHE_DIR):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file not found: {path}")
        self.path = str(path)
        self.check = check
        validate = os.path.getsize(path) <= validate_max_bytes
        tag = f"{check.__name__}|validate={validate}|skip={skip_bad_lines}"
        cache = index_cache_path(path, tag, cache_dir)
        self.reused_index = cache.exists()
        if not self.reused_index:
            build_index(path, check, validate, skip_bad_lines, cache)
        self.index_path = cache
        self.index = load_index(cache)
        self.file = None  # opened lazily, once per (worker) process

    def __len__(self):
        return len(self.index)

    def line_lengths(self):
        """Byte length of every line: a free proxy for token length (length-grouped batching)."""
        return np.asarray(self.index["length"])

    def __getitem__(self, i):
        row = self.index[i]
        offset, length, line_no = int(row["offset"]), int(row["length"]), int(row["line"])
        if self.file is None:
            self.file = open(self.path, "rb")
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


# ------------------------------------------------------------------ tokenization helpers

def shifted(ids, token_mask):
    """(X, Y, loss_mask) from a token sequence and a per-token 'is trained' mask."""
    ids = torch.tensor(ids, dtype=torch.long)
    token_mask = torch.tensor(token_mask, dtype=torch.long)
    return ids[:-1], ids[1:], token_mask[1:]


def assistant_char_spans(text, messages):
    """Character spans of each assistant reply + its <|im_end|> in the rendered chat text.

    The spans are located in order, so a reply that also appears earlier in the text (for
    example quoted by the user) is still found at its own place.
    """
    spans, cursor = [], 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        opener = "<|im_start|>assistant\n"
        start = text.find(opener + m["content"] + "<|im_end|>", cursor)
        if start < 0:
            raise ValueError("chat template output does not contain an assistant turn as ChatML")
        start += len(opener)
        end = start + len(m["content"]) + len("<|im_end|>")
        spans.append((start, end))
        cursor = end
    return spans


def chat_ids_and_mask(tokenizer, messages, max_length):
    """Token ids of a conversation and a mask that is 1 on assistant content + <|im_end|>.

    Truncation rule (no half-open mask): the ids are cut to max_length, and an assistant
    turn is trained only if its closing <|im_end|> survived the cut. A reply cut in the
    middle stays in the input but gets mask 0, so every trained span ends with the
    <|im_end|> that teaches the model to stop. (A conversation whose first reply does not
    fit has no trained token at all; the loss must divide by max(mask.sum(), 1).)
    The newline after <|im_end|> is not trained (it is template glue, not model output).
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"][:max_length], encoded["offset_mapping"][:max_length]
    mask = [0] * len(ids)
    for start, end in assistant_char_spans(text, messages):
        inside = [i for i, (s, e) in enumerate(offsets) if s >= start and e <= end]
        closed = inside and offsets[inside[-1]][1] == end  # the <|im_end|> is still there
        for i in inside if closed else []:
            mask[i] = 1
    return ids, mask


# ------------------------------------------------------------------ datasets

class PretrainDataset(Dataset):
    """Plain text: bos + text + eos, cut to max_length tokens; every real token is trained.

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
        body = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = ([self.tokenizer.bos_token_id] + body + [self.tokenizer.eos_token_id])[: self.max_length]
        return shifted(ids, [1] * len(ids))


class SFTDataset(Dataset):
    """Chat data rendered with the tokenizer's ChatML template; loss only on the replies.

    Trained: each assistant turn's content and its closing <|im_end|> (all turns of a
    multi-turn conversation). Masked: the system and user turns, the role headers, the
    newline after <|im_end|>. Reasoning data (<think>/<answer>) is used as is.
    """

    def __init__(self, jsonl_path, tokenizer, max_length=1024, skip_bad_lines=False, **index_kwargs):
        self.lines = JsonlLines(jsonl_path, check_sft, skip_bad_lines, **index_kwargs)
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __len__(self):
        return len(self.lines)

    def __getitem__(self, i):
        ids, mask = chat_ids_and_mask(self.tokenizer, self.lines[i]["conversations"], self.max_length)
        return shifted(ids, mask)


class DPODataset(Dataset):
    """Preference pairs: both conversations are built like SFT items (same masks)."""

    def __init__(self, file_path, tokenizer, max_length=1024, skip_bad_lines=False, **index_kwargs):
        self.lines = JsonlLines(file_path, check_dpo, skip_bad_lines, **index_kwargs)
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __len__(self):
        return len(self.lines)

    def __getitem__(self, i):
        pair = self.lines[i]
        item = {}
        for side in ("chosen", "rejected"):
            x, y, mask = shifted(*chat_ids_and_mask(self.tokenizer, pair[side], self.max_length))
            item[f"x_{side}"], item[f"y_{side}"], item[f"mask_{side}"] = x, y, mask
        return item


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
      position_ids    (B, T)        restart at 0 at every document, as if it were alone
      attention_mask  (B, 1, T, T)  bool, True = may attend: causal and block-diagonal
    Padding positions attend only to themselves (a row with no True would give NaN) and
    have loss_mask 0. With these, each document's loss equals its unpacked loss.
    """
    capacity = max(len(x) for x, _, _ in batch)
    rows = pack_into_rows([len(x) for x, _, _ in batch], capacity)
    input_ids = torch.full((len(rows), capacity), PAD_ID, dtype=torch.long)
    labels = torch.full_like(input_ids, PAD_ID)
    loss_mask = torch.zeros_like(input_ids)
    position_ids = torch.zeros_like(input_ids)
    doc_ids = torch.full_like(input_ids, -1)  # -1 = padding
    for r, members in enumerate(rows):
        pos = 0
        for doc, i in enumerate(members):
            x, y, m = batch[i]
            n = len(x)
            input_ids[r, pos:pos + n], labels[r, pos:pos + n], loss_mask[r, pos:pos + n] = x, y, m
            position_ids[r, pos:pos + n] = torch.arange(n)
            doc_ids[r, pos:pos + n] = doc
            pos += n
    same_doc = (doc_ids[:, :, None] == doc_ids[:, None, :]) & (doc_ids[:, :, None] >= 0)
    causal = torch.ones(capacity, capacity, dtype=torch.bool).tril()
    diagonal = torch.eye(capacity, dtype=torch.bool)
    attention_mask = ((same_doc & causal) | diagonal)[:, None, :, :]
    return {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask,
            "position_ids": position_ids, "attention_mask": attention_mask}


packed_collate = pack_collate  # alias


class LengthGroupedSampler(Sampler):
    """Shuffled indices in which each batch holds items of similar length (less padding).

    Works like DistributedSampler (num_replicas, rank, set_epoch, padded to equal shares):
    every `batch_size * num_replicas` consecutive indices of the global order form one
    global step, sorted by length inside "mega-batches" of `mega_batches` steps; rank r
    takes its slice of each step. Use with DataLoader(batch_size=batch_size, sampler=...).
    Lengths can be the byte lengths of the lines (dataset.lines.line_lengths()).
    """

    def __init__(self, lengths, batch_size, num_replicas=1, rank=0, seed=0, mega_batches=50):
        self.lengths = np.asarray(lengths)
        self.batch_size, self.num_replicas, self.rank = batch_size, num_replicas, rank
        self.seed, self.mega_batches, self.epoch = seed, mega_batches, 0
        step = batch_size * num_replicas
        self.num_steps = -(-len(self.lengths) // step)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.num_steps * self.batch_size

    def __iter__(self):
        rng = np.random.default_rng(self.seed + self.epoch)
        step = self.batch_size * self.num_replicas
        order = rng.permutation(len(self.lengths))
        order = np.resize(order, self.num_steps * step)  # repeat a few to fill the last step
        mega = step * self.mega_batches
        for start in range(0, len(order), mega):  # sort by length (longest first) per mega-batch
            chunk = order[start:start + mega]
            order[start:start + mega] = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
        steps = order.reshape(self.num_steps, step)[rng.permutation(self.num_steps)]
        mine = steps[:, self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return iter(mine.reshape(-1).tolist())
