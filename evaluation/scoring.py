"""The forward pass every scored task shares: log-probabilities of many token sequences.

    for index, logprobs in token_logprobs(model, sequences, batch_tokens=8192):
        ...   # logprobs[t] = log P(next token | sequence[:t + 1]), shape (len(sequence), vocab)

Sequences are sorted by length and packed into batches of at most batch_tokens padded tokens
(several questions and choices per forward pass, little padding). Rows are right-padded:
attention is causal, so the padding after a row's last token cannot change what its real
positions see, and no attention mask is needed.
"""
import torch
from tqdm import tqdm


def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped into batches, longest first, each holding at most batch_tokens padded
    tokens (a sequence longer than that is a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for index in order:
        longest = lengths[current[0]] if current else lengths[index]
        if current and longest * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def batch_logprobs(model, sequences: list[list[int]]) -> torch.Tensor:
    """(rows, longest, vocab) float32 log-softmax of one right-padded batch (pad id 0)."""
    longest = max(len(s) for s in sequences)
    input_ids = torch.zeros(len(sequences), longest, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, :len(sequence)] = torch.tensor(sequence)
    logits = model(input_ids.to(model_device(model))).logits
    return torch.log_softmax(logits.float(), dim=-1)


def token_logprobs(model, sequences: list[list[int]], batch_tokens: int = 8192, progress: str | None = None):
    """Yield (index, logprobs) for every sequence, in batch order (longest first)."""
    batches = length_batches([len(s) for s in sequences], batch_tokens)
    bar = tqdm(total=len(sequences), desc=progress, unit="seq", disable=progress is None, leave=False)
    for batch in batches:
        logprobs = batch_logprobs(model, [sequences[i] for i in batch])
        for row, index in enumerate(batch):
            yield index, logprobs[row, :len(sequences[index])]
        bar.update(len(batch))
    bar.close()


def continuation_logprob(logprobs: torch.Tensor, sequence: list[int], start: int) -> tuple[float, bool]:
    """Sum of log P(sequence[t]) for t >= start given what precedes it, and whether each of
    those tokens was the model's greedy choice (lm-evaluation-harness's is_greedy)."""
    targets = torch.tensor(sequence[start:], device=logprobs.device)
    predicted = logprobs[start - 1:len(sequence) - 1]
    total = predicted.gather(1, targets[:, None]).sum().item()
    return total, bool((predicted.argmax(dim=-1) == targets).all())
