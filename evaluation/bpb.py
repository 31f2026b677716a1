"""Bits per byte: how many bits the model needs, on average, to encode each byte of a text.

    bpb = (sum over the text's tokens of -ln P(token | what precedes it)) / (ln 2 · UTF-8 bytes)

Loss per token depends on the tokenizer (a tokenizer with longer tokens has fewer, harder
predictions); per byte it does not, so models with different tokenizers compare. A document is
<bos> + its tokens; every token after <bos> is predicted exactly once, in windows of at most
max_seq_len inputs (a window's first input is the last token of the window before, so a long
document is cut into independent windows without skipping a prediction).

    result = bits_per_byte(model, tokenizer, texts, max_seq_len=512)
    result.bpb, result.loss (mean nats per token), result.tokens, result.bytes
"""
import math
from dataclasses import asdict, dataclass

from tqdm import tqdm

from evaluation.scoring import batch_logprobs, continuation_logprob, length_batches


@dataclass
class BpbResult:
    nats: float = 0.0       # summed negative log-likelihood
    tokens: int = 0         # predicted tokens
    bytes: int = 0          # UTF-8 bytes of the texts
    documents: int = 0

    @property
    def bpb(self) -> float:
        return self.nats / (math.log(2) * self.bytes) if self.bytes else float("nan")

    @property
    def loss(self) -> float:
        return self.nats / self.tokens if self.tokens else float("nan")

    def add(self, other: "BpbResult") -> "BpbResult":
        return BpbResult(self.nats + other.nats, self.tokens + other.tokens, self.bytes + other.bytes,
                         self.documents + other.documents)

    def as_dict(self) -> dict:
        return {"bpb": self.bpb, "loss": self.loss, **asdict(self)}


def document_windows(ids: list[int], max_seq_len: int) -> list[list[int]]:
    """Windows of at most max_seq_len + 1 tokens, each overlapping the next by one token: the
    model reads window[:-1] and predicts window[1:], so every token after the first is
    predicted once."""
    return [ids[start:start + max_seq_len + 1] for start in range(0, len(ids) - 1, max_seq_len)]


def text_windows(tokenizer, texts: list[str], max_seq_len: int) -> tuple[list[list[int]], int, int]:
    """(windows of all texts, UTF-8 bytes, documents); empty texts are left out (nothing to predict)."""
    windows, total_bytes, documents = [], 0, 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        windows += document_windows([tokenizer.bos_token_id] + ids, max_seq_len)
        total_bytes += len(text.encode("utf-8"))
        documents += 1
    return windows, total_bytes, documents


def batch_nats(model, windows: list[list[int]]) -> float:
    """Summed -log-likelihood of every window's tokens after its first, in one forward pass."""
    logprobs = batch_logprobs(model, [window[:-1] for window in windows])
    # row r of logprobs (computed on window[:-1]) predicts window[1:]
    return -sum(continuation_logprob(logprobs[row, :len(w) - 1], w, 1)[0] for row, w in enumerate(windows))


def windows_nats(model, windows: list[list[int]], batch_tokens: int = 8192, progress: str | None = None) -> float:
    batches = length_batches([len(w) - 1 for w in windows], batch_tokens)
    return sum(batch_nats(model, [windows[i] for i in batch])
               for batch in tqdm(batches, desc=progress, unit="batch", disable=progress is None, leave=False))


def bits_per_byte(model, tokenizer, texts: list[str], max_seq_len: int = 512, batch_tokens: int = 8192,
                  progress: str | None = None) -> BpbResult:
    windows, total_bytes, documents = text_windows(tokenizer, texts, max_seq_len)
    nats = windows_nats(model, windows, batch_tokens, progress)
    return BpbResult(nats, sum(len(w) - 1 for w in windows), total_bytes, documents)
