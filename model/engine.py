"""The generation engine: many replies decoded together over one preallocated KV cache.

Every front end (eval_model.py, the web demo, the OpenAI-compatible server) and every later
user (RL rollouts, generative evaluation) generates through this file. Read it in order:

    SlotKVCache     keys and values of every running sequence, one fixed-size slot each
    SamplingParams  what one reply asks for: temperature, top-p, penalties, seed, stops, logprobs
    Sequence        one prompt and its reply so far (tokens, log-probabilities, text, why it ended)
    Engine.step()   admit waiting prompts and PREFILL them, one DECODE step for all running rows,
                    SAMPLE one token per row, check each row's STOP conditions, free finished slots
    EngineLoop      a background thread that runs step() for callers on other threads (the server)

Why a slot cache: a cache that grows by concatenation copies every key and value on every
token, and cannot hold rows of different lengths. Here each sequence owns one row of a buffer
allocated once (slots x kv_heads x max_seq_len x head_dim per layer); a step writes each row's
new keys at that row's own position, and a mask hides what lies beyond a row's length. A slot is
freed by moving the last running row into it, so the running rows always fill slots
0..B-1 and a step reads plain slices of the buffers.

The model needs nothing special for this: its attention writes through
`past_key_values.update(k, v, layer_idx)` (as transformers' DynamicCache expects), and
CacheView implements exactly that call on top of the slots.
"""
import queue
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy
import torch

EOS_TOKEN_ID = 2  # <|im_end|>: a chat reply ends here


# ----------------------------------------------------------------------------------------------
# The KV cache: one slot per sequence
# ----------------------------------------------------------------------------------------------

class SlotKVCache:
    """keys[layer], values[layer]: (slots, kv_heads, max_seq_len, head_dim), zero-filled (masked
    positions must hold finite numbers: softmax weight 0 times NaN would still be NaN)."""

    def __init__(self, config, slots: int, max_seq_len: int, device, dtype):
        shape = (slots, config.num_key_value_heads, max_seq_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.slots, self.max_seq_len = slots, max_seq_len

    def write(self, layer: int, index: tuple, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (rows, kv_heads, T, head_dim) at buffer[index] (see CacheView.index)."""
        if isinstance(index[0], int):  # one slot: the row itself
            k, v = k[0], v[0]
        else:  # advanced indices on dims 0 and 2 put (rows, T) first: the (kv_heads, head_dim) part follows
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        self.keys[layer][index] = k
        self.values[layer][index] = v

    def copy_slot(self, source: int, target: int, length: int) -> None:
        for buffers in (self.keys, self.values):
            for layer_buffer in buffers:
                layer_buffer[target, :, :length] = layer_buffer[source, :, :length]


class CacheView:
    """What one forward pass sees of the cache: slots [first_slot, first_slot + rows), each row
    writing its new tokens at its own positions and reading keys 0..key_len-1 back.

    The model calls `update` once per layer (the DynamicCache interface) and `get_seq_length`
    once per forward."""

    def __init__(self, cache: SlotKVCache, first_slot: int, positions: torch.Tensor, key_len: int,
                 static: bool = False):
        self.cache, self.first_slot, self.positions, self.key_len = cache, first_slot, positions, key_len
        # Where this pass's keys go, worked out once per forward, not once per layer: one row's
        # run of positions is a plain slice (the cheapest write there is), several rows are an
        # index of (slot, position) pairs. A captured step (static) must not read a tensor's
        # value on the host, so it always takes the index.
        rows, length = positions.shape
        if rows == 1 and not static:
            start = int(positions[0, 0])
            self.index = (first_slot, slice(None), slice(start, start + length))
        else:
            slot_index = torch.arange(first_slot, first_slot + rows, device=positions.device)[:, None]
            self.index = (slot_index, slice(None), positions)

    def update(self, k, v, layer_idx, cache_kwargs=None):
        self.cache.write(layer_idx, self.index, k, v)
        rows = slice(self.first_slot, self.first_slot + self.positions.shape[0])
        return self.cache.keys[layer_idx][rows, :, :self.key_len], self.cache.values[layer_idx][rows, :, :self.key_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.key_len - self.positions.shape[1]  # keys that were there before this pass


# ----------------------------------------------------------------------------------------------
# What a reply asks for
# ----------------------------------------------------------------------------------------------

@dataclass
class SamplingParams:
    """Per-row settings. temperature 0 = greedy. Penalties as transformers (repetition: CTRL's
    rule over prompt and reply) and OpenAI (presence/frequency: over the reply so far).
    logprobs/top_logprobs: the model's own log-probabilities (before temperature and
    penalties) of each chosen token and of the top_logprobs likeliest ones.
    prompt_logprobs: the same for every prompt token (the legacy completions API's echo)."""
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = (EOS_TOKEN_ID,)
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: bool = False

    def __post_init__(self):
        checks = {
            "max_tokens must be >= 0": self.max_tokens >= 0,
            "temperature must be >= 0": self.temperature >= 0,
            "top_p must be in [0, 1]": 0 <= self.top_p <= 1,
            "repetition_penalty must be > 0": self.repetition_penalty > 0,
            "top_logprobs must be >= 0": self.top_logprobs >= 0,
        }
        failed = [message for message, ok in checks.items() if not ok]
        if failed:
            raise ValueError("; ".join(failed))
        self.stop = tuple(s for s in self.stop if s)
        self.stop_token_ids = tuple(self.stop_token_ids)


class Sequence:
    """One prompt and its reply. Filled in by the engine; read by whoever asked for it.

    output_ids          the reply's tokens (a closing eos token included)
    text                the reply's text so far (stop strings cut off, never half a character)
    token_logprobs      log-probability of each output token (when params.logprobs)
    top_logprobs        [(token_id, logprob), ...] per output token (when params.top_logprobs)
    prompt_logprobs     (logprob, top) per prompt token after the first (when params.prompt_logprobs)
    finish_reason       None while running, then "stop", "length" or "cancelled"
    """

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer=None):
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token (e.g. the bos token)")
        if params.stop and tokenizer is None:
            raise ValueError("stop strings need an engine with a tokenizer")
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.output_ids: list[int] = []
        self.token_logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.cancelled = False  # set from any thread; the engine drops the row at its next step
        self.generator: random.Random | None = None  # the sampling stream (see Engine.random_of)
        self.decoder = IncrementalDecoder(tokenizer) if tokenizer is not None else None
        self.stop_filter = StopStringFilter(params.stop)
        self.slot: int | None = None  # which cache slot it occupies while running
        self.started = time.perf_counter()
        self.on_output = None  # EngineLoop: called with each StepOutput of this sequence
        self.error: Exception | None = None  # EngineLoop: why a step failed (finish_reason "error")

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def length(self) -> int:
        """Tokens in the cache once the last output token has been fed back."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StepOutput:
    """One sequence's news from one step: the token it got (None when it only finished), the
    text that is now certain, and the finish reason once it ended."""
    sequence: Sequence
    token_id: int | None
    text: str
    logprob: float | None = None
    top_logprobs: list = field(default_factory=list)
    finish_reason: str | None = None


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------

class Engine:
    """Decodes up to max_batch_size sequences together.

        engine = Engine(model, tokenizer, max_batch_size=8, max_seq_len=512)
        a = engine.add(prompt_ids, SamplingParams(max_tokens=64, temperature=0))
        b = engine.add(other_ids, SamplingParams(max_tokens=64, temperature=0.8, seed=1))
        while engine.has_work():
            for out in engine.step():
                print(out.sequence is a, out.text)

    or `engine.generate([prompt_ids, ...], params)` to run a list of prompts to the end."""

    def __init__(self, model, tokenizer=None, max_batch_size: int = 16, max_seq_len: int | None = None,
                 prefill_tokens: int = 4096, compile_decode: bool = False, freeze_weights: bool = False):
        self.model, self.tokenizer = model, tokenizer
        config = model.config
        self.max_seq_len = min(max_seq_len or config.max_position_embeddings, config.max_position_embeddings)
        self.max_batch_size = max_batch_size
        self.prefill_tokens = prefill_tokens  # padded prompt tokens one prefill pass may take
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.vocab_size = config.vocab_size
        self.cache = SlotKVCache(config, max_batch_size, self.max_seq_len, self.device, self.dtype)
        # per-slot token statistics for the penalties: generated-token counts, and prompt ∪ reply
        self.token_counts = torch.zeros(max_batch_size, self.vocab_size, dtype=torch.int32, device=self.device)
        self.seen = torch.zeros(max_batch_size, self.vocab_size, dtype=torch.bool, device=self.device)
        self.rows: list[Sequence] = []  # rows[i] lives in slot i
        self.waiting: deque[Sequence] = deque()
        self.static_decode = StaticDecodeStep(self) if compile_decode else None
        self.frozen_decode = FrozenDecodeStep(self) if freeze_weights else None

    # -- the queue ------------------------------------------------------------------------------

    def add(self, prompt_ids, params: SamplingParams) -> Sequence:
        """Queue a prompt; it starts at the next step that has a free slot."""
        return self.queue(Sequence([int(t) for t in prompt_ids], params, self.tokenizer))

    def queue(self, sequence: Sequence) -> Sequence:
        params = sequence.params
        room = self.max_seq_len - len(sequence.prompt_ids)
        if room < 0 or (room == 0 and params.max_tokens > 0):
            raise ValueError(f"the prompt has {len(sequence.prompt_ids)} tokens; the engine's context is "
                             f"{self.max_seq_len} tokens")
        params.max_tokens = min(params.max_tokens, room)
        self.waiting.append(sequence)
        return sequence

    def has_work(self) -> bool:
        return bool(self.rows or self.waiting)

    @torch.inference_mode()
    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams]) -> list[Sequence]:
        """Run prompts to the end (rows of one batch as far as slots allow); the finished sequences."""
        params_list = params if isinstance(params, list) else [SamplingParams(**vars(params)) for _ in prompts]
        sequences = [self.add(p, sp) for p, sp in zip(prompts, params_list)]
        while self.has_work():
            self.step()
        return sequences

    # -- one step ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """One decode step for every running row, then prefill of the waiting prompts that fit
        into the slots this step freed or left free. A new row gets its first token here and
        decodes with the others from the next step on."""
        outputs = self.drop_cancelled()
        running = list(self.rows)
        if running:
            outputs += self.sample_and_check(running, self.decode(running))
            self.free_finished_slots()
        new_rows = self.admit()
        if new_rows:
            logits = self.prefill(new_rows)
            outputs += self.finish_prompt_only(new_rows)
            sampling = [row for row, s in enumerate(new_rows) if not s.finished]
            outputs += self.sample_and_check([new_rows[row] for row in sampling], logits[sampling])
            self.free_finished_slots()
        return outputs

    def drop_cancelled(self) -> list[StepOutput]:
        outputs = []
        for sequence in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(sequence)
            outputs.append(self.finish(sequence, "cancelled"))
        for sequence in [s for s in self.rows if s.cancelled]:
            outputs.append(self.finish(sequence, "cancelled"))
        self.free_finished_slots()
        return outputs

    def admit(self) -> list[Sequence]:
        """Move waiting prompts into free slots (up to prefill_tokens padded tokens at once)."""
        admitted = []
        while self.waiting and len(self.rows) < self.max_batch_size:
            longest = max([len(s.prompt_ids) for s in admitted] + [len(self.waiting[0].prompt_ids)])
            if admitted and longest * (len(admitted) + 1) > self.prefill_tokens:
                break
            sequence = self.waiting.popleft()
            sequence.slot = len(self.rows)
            self.rows.append(sequence)
            admitted.append(sequence)
        return admitted

    # -- prefill ----------------------------------------------------------------------------------

    def prefill(self, sequences: list[Sequence]) -> torch.Tensor:
        """Run new prompts through the model, filling their slots; the logits (rows, vocab) that
        predict each one's first reply token.

        The prompts are right-padded into one batch starting at position 0. Causal attention
        alone keeps every real token away from the padding after it; the padding's own keys land
        beyond the row's length, where the decode mask hides them until they are overwritten.
        Rows with the same prompt (n replies to one question) are computed once and copied."""
        first_of_prompt: dict[tuple, Sequence] = {}
        unique = [first_of_prompt.setdefault(tuple(s.prompt_ids), s) for s in sequences]
        unique = list(dict.fromkeys(unique))
        self.reorder_slots(unique, sequences)
        lengths = [len(s.prompt_ids) for s in unique]
        longest = max(lengths)
        input_ids = torch.zeros(len(unique), longest, dtype=torch.long)
        for row, sequence in enumerate(unique):
            input_ids[row, :lengths[row]] = torch.tensor(sequence.prompt_ids)
        input_ids = input_ids.to(self.device)
        positions = torch.arange(longest, device=self.device).expand(len(unique), longest)
        hidden = self.forward(input_ids, positions, CacheView(self.cache, unique[0].slot, positions, longest), None)
        last = hidden[torch.arange(len(unique)), torch.tensor(lengths) - 1]
        logits_of = dict(zip(unique, self.model.lm_head(last).float()))
        for row, sequence in enumerate(unique):
            if sequence.params.prompt_logprobs:
                self.record_prompt_logprobs(sequence, hidden[row, :lengths[row] - 1])
        for sequence in sequences:
            source = first_of_prompt[tuple(sequence.prompt_ids)]
            if source is not sequence:
                self.cache.copy_slot(source.slot, sequence.slot, len(sequence.prompt_ids))
                sequence.prompt_logprobs = source.prompt_logprobs
            self.start_token_statistics(sequence)
        return torch.stack([logits_of[first_of_prompt[tuple(s.prompt_ids)]] for s in sequences])

    def reorder_slots(self, unique: list[Sequence], sequences: list[Sequence]) -> None:
        """Give the prompts computed in this prefill the first of the new slots (they are written
        as one block), their copies the slots after them. New rows hold no cache data yet."""
        first = min(s.slot for s in sequences)
        copies = [s for s in sequences if s not in unique]
        for offset, sequence in enumerate(unique + copies):
            sequence.slot = first + offset
            self.rows[sequence.slot] = sequence

    def record_prompt_logprobs(self, sequence: Sequence, hidden: torch.Tensor) -> None:
        """log P(prompt token i | tokens before it) for i >= 1, and the top alternatives."""
        logprobs = torch.log_softmax(self.model.lm_head(hidden).float(), dim=-1)
        targets = torch.tensor(sequence.prompt_ids[1:], device=self.device)
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        top = top_alternatives(logprobs, sequence.params.top_logprobs)
        sequence.prompt_logprobs = list(zip(chosen, top))

    def start_token_statistics(self, sequence: Sequence) -> None:
        self.token_counts[sequence.slot] = 0
        self.seen[sequence.slot] = False
        self.seen[sequence.slot, torch.tensor(sequence.prompt_ids, device=self.device)] = True

    def finish_prompt_only(self, sequences: list[Sequence]) -> list[StepOutput]:
        """max_tokens 0 (scoring a prompt, e.g. echo with logprobs): done after the prefill."""
        return [self.finish(s, "length") for s in sequences if s.params.max_tokens == 0]

    # -- decode -----------------------------------------------------------------------------------

    def decode(self, sequences: list[Sequence]) -> torch.Tensor:
        """Feed every running row its newest token, all rows in one forward pass; the logits
        (rows, vocab) for the token after it. Rows sit in slots 0..B-1 (see free_finished_slots)."""
        if self.static_decode is not None:
            return self.static_decode(sequences)
        lengths = [s.length - 1 for s in sequences]  # the newest token is not in the cache yet
        input_ids = torch.tensor([[s.output_ids[-1]] for s in sequences], device=self.device)
        positions = torch.tensor(lengths, device=self.device)[:, None]
        key_len = max(lengths) + 1
        if self.frozen_decode is not None:
            return self.frozen_decode.decode(input_ids, positions, key_len)
        mask = None  # rows of equal length need none (a single row never does)
        if min(lengths) != max(lengths):
            mask = key_mask(positions, key_len)
        hidden = self.forward(input_ids, positions, CacheView(self.cache, 0, positions, key_len), mask)
        return self.model.lm_head(hidden[:, -1]).float()

    def forward(self, input_ids, positions, cache_view, mask) -> torch.Tensor:
        """The decoder's last hidden states (rows, T, hidden); the caller picks the positions
        whose logits it needs, so the vocabulary projection runs for those alone."""
        hidden, _, _ = self.model.model(input_ids=input_ids, position_ids=positions, attention_mask=mask,
                                        past_key_values=cache_view, use_cache=True)
        return hidden

    # -- sample -----------------------------------------------------------------------------------

    def sample_and_check(self, sequences: list[Sequence], logits: torch.Tensor) -> list[StepOutput]:
        """Pick each row's next token from its logits (rows, vocab) with its own settings, record
        it, and see whether the row is done. All rows are processed together, tensor by tensor;
        only the bookkeeping per row (appending, stop checks, text) runs in Python."""
        if not sequences:
            return []
        slots = torch.tensor([s.slot for s in sequences], device=self.device)
        wants_logprobs = any(s.params.logprobs or s.params.top_logprobs for s in sequences)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if wants_logprobs else None
        processed = self.apply_penalties(logits, sequences, slots)
        next_ids = self.choose_tokens(processed, sequences)
        self.token_counts[slots, next_ids] += 1
        self.seen[slots, next_ids] = True
        tokens = next_ids.tolist()
        logprobs, tops = [None] * len(tokens), [[] for _ in tokens]
        if raw_logprobs is not None:
            logprobs = raw_logprobs.gather(1, next_ids[:, None])[:, 0].tolist()
            tops = top_alternatives(raw_logprobs, [s.params.top_logprobs for s in sequences])
        return [self.append_token(sequence, token, logprob, top)
                for sequence, token, logprob, top in zip(sequences, tokens, logprobs, tops)]

    def apply_penalties(self, logits: torch.Tensor, sequences: list[Sequence], slots: torch.Tensor) -> torch.Tensor:
        def column(name):
            return torch.tensor([getattr(s.params, name) for s in sequences], device=self.device)[:, None]

        if any(s.params.repetition_penalty != 1.0 for s in sequences):
            penalty = column("repetition_penalty")
            penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits = torch.where(self.seen[slots], penalized, logits)
        if any(s.params.presence_penalty or s.params.frequency_penalty for s in sequences):
            counts = self.token_counts[slots].float()
            logits = logits - column("presence_penalty") * (counts > 0) - column("frequency_penalty") * counts
        return logits

    def choose_tokens(self, logits: torch.Tensor, sequences: list[Sequence]) -> torch.Tensor:
        """Greedy rows take the argmax; sampled rows draw from softmax(logits / temperature)
        cut to the top-p nucleus, all in one batch, each with one uniform number from its own
        random stream (so a seed reproduces a reply whatever else is in the batch)."""
        next_ids = logits.argmax(dim=-1)
        sampled = [row for row, s in enumerate(sequences) if s.params.temperature > 0]
        if sampled:
            params = [sequences[row].params for row in sampled]
            temperature = torch.tensor([p.temperature for p in params], device=self.device)
            top_p = torch.tensor([p.top_p for p in params], device=self.device)
            uniforms = torch.tensor([self.random_of(sequences[row]).random() for row in sampled],
                                    dtype=torch.float64, device=self.device)
            rows = torch.tensor(sampled, device=self.device)
            next_ids[rows] = sample_rows(logits[rows], temperature, top_p, uniforms)
        return next_ids

    def random_of(self, sequence: Sequence) -> random.Random:
        """The sequence's own random stream: one uniform number per sampled token."""
        if sequence.generator is None:
            # no seed: one from torch's global generator, so torch.manual_seed still reproduces runs
            seed = sequence.params.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, ()))
            sequence.generator = random.Random(seed)
        return sequence.generator

    # -- stop -------------------------------------------------------------------------------------

    def append_token(self, sequence: Sequence, token: int, logprob, top) -> StepOutput:
        """Record the token; end the row on a stop token, a stop string or its token budget."""
        sequence.output_ids.append(token)
        if sequence.params.logprobs:
            sequence.token_logprobs.append(logprob)
        if sequence.params.top_logprobs:
            sequence.top_logprobs.append(top)
        text = ""
        if token in sequence.params.stop_token_ids:
            sequence.finish_reason = "stop"
        else:
            text = self.new_text(sequence, token)
            if sequence.stop_filter.stopped:
                sequence.finish_reason = "stop"
            elif len(sequence.output_ids) >= sequence.params.max_tokens:
                sequence.finish_reason = "length"
        if sequence.finished:
            text += self.text_tail(sequence)
        return StepOutput(sequence, token, text, logprob, top, sequence.finish_reason)

    def new_text(self, sequence: Sequence, token: int) -> str:
        if sequence.decoder is None:
            return ""
        text = sequence.stop_filter.feed(sequence.decoder.add(token))
        sequence.text += text
        return text

    def text_tail(self, sequence: Sequence) -> str:
        """What the decoder and the stop filter still hold when a row ends."""
        if sequence.decoder is None or sequence.stop_filter.stopped:
            return ""
        tail = sequence.stop_filter.feed(sequence.decoder.flush())
        if sequence.stop_filter.stopped:
            sequence.finish_reason = "stop"
        else:
            tail += sequence.stop_filter.flush()
        sequence.text += tail
        return tail

    def finish(self, sequence: Sequence, reason: str) -> StepOutput:
        """End a row that got no new token (cancelled, or nothing to generate)."""
        sequence.finish_reason = reason
        return StepOutput(sequence, None, self.text_tail(sequence) if reason != "cancelled" else "",
                          finish_reason=sequence.finish_reason)

    def free_finished_slots(self) -> None:
        """Drop finished rows. The last row moves into each hole (its cache slot and token
        statistics are copied), so the running rows stay in slots 0..B-1."""
        row = 0
        while row < len(self.rows):
            if not self.rows[row].finished:
                row += 1
                continue
            last = self.rows.pop()
            if row < len(self.rows):  # the hole is not at the end: fill it (checked again next turn)
                self.move_row(last, row)

    def move_row(self, sequence: Sequence, slot: int) -> None:
        self.cache.copy_slot(sequence.slot, slot, sequence.length)
        self.token_counts[slot] = self.token_counts[sequence.slot]
        self.seen[slot] = self.seen[sequence.slot]
        sequence.slot = slot
        self.rows[slot] = sequence


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                uniforms: torch.Tensor) -> torch.Tensor:
    """One token id per row of logits (rows, vocab): softmax(logits / temperature), cut to the
    top-p nucleus, then the token where the row's uniform number u in [0, 1) falls in the
    cumulative distribution (inverse-CDF sampling: one random number per token, not one per
    vocabulary entry as torch.multinomial draws). Every row is computed on its own, so a row
    gets the same token in any batch. temperature, top_p: (rows,) > 0; uniforms: (rows,) float64."""
    probs = torch.softmax(logits / temperature[:, None], dim=-1)
    nucleus = top_p < 1.0
    if nucleus.any():
        threshold = torch.where(nucleus, nucleus_threshold(probs, top_p), 0.0)
        probs = probs.masked_fill(probs < threshold[:, None], 0.0)  # outside the nucleus: never drawn
    return inverse_cdf(probs, uniforms)


def nucleus_threshold(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row, the smallest probability in the top-p nucleus: a token is in it if the tokens
    ranked above it cover at most top_p (so the likeliest always is). Only the values are
    sorted, not their token ids: the nucleus is then every token at least this likely, drawn
    from in vocabulary order, which is the same distribution as drawing in ranked order."""
    ranked = sort_descending(probs)
    in_nucleus = (ranked.cumsum(dim=-1) - ranked <= top_p[:, None]).sum(dim=-1)  # >= 1
    return ranked.gather(1, (in_nucleus - 1)[:, None])[:, 0]


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative probability exceeds u * total (float64 sums;
    the total need not be 1: a cut nucleus is not renormalised). An index with probability 0
    is never chosen: the cumulative sum does not rise there."""
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1]
    # u < 1, but u * total can round up to total: stay strictly below it
    targets = torch.minimum(uniforms * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, targets[:, None], right=True)[:, 0]


def sort_descending(probs: torch.Tensor) -> torch.Tensor:
    """The values of probs sorted per row, likeliest first. On the CPU numpy's sort is several
    times faster than torch's for rows of a few thousand (measured on 16 x 6400: 1.3 vs 5.9 ms;
    numpy's argsort, which also returns the ids, 3.0 ms)."""
    if probs.device.type == "cpu":
        return torch.from_numpy(-numpy.sort(-probs.numpy(), axis=-1))
    return probs.sort(dim=-1, descending=True).values


def top_alternatives(logprobs: torch.Tensor, k) -> list[list[tuple[int, float]]]:
    """[(token_id, logprob), ...] of the k likeliest tokens, per row of logprobs (rows, vocab);
    k is one number for all rows or one per row."""
    ks = [k] * logprobs.shape[0] if isinstance(k, int) else list(k)
    largest = max(ks, default=0)
    if largest <= 0:
        return [[] for _ in ks]
    values, ids = logprobs.topk(largest, dim=-1)
    return [list(zip(row_ids[:row_k], row_values[:row_k]))
            for row_ids, row_values, row_k in zip(ids.tolist(), values.tolist(), ks)]


# ----------------------------------------------------------------------------------------------
# A captured decode step (static shapes, for CUDA graphs)
# ----------------------------------------------------------------------------------------------

def key_mask(positions: torch.Tensor, key_len: int) -> torch.Tensor:
    """(rows, 1, 1, key_len): True where a row's query at `positions` may attend a cached key
    (its own earlier tokens); longer rows' extra keys are hidden from shorter rows."""
    return (torch.arange(key_len, device=positions.device) <= positions)[:, None, None, :]


class StaticDecodeStep:
    """decode() with the same shapes every step, so torch.compile can capture it once.

    Every slot takes part (idle ones decode a dummy token at position 0, their result unused)
    and attention reads all max_seq_len keys under a mask; the inputs are copied into fixed
    buffers. On CUDA, mode "reduce-overhead" replays the step as one CUDA graph, which removes
    the per-kernel launch cost that dominates a small model's step on a GPU. On the CPU the
    compiled step fuses the small elementwise operations; tests check that it equals eager."""

    def __init__(self, engine: Engine):
        self.engine = engine
        slots, device = engine.max_batch_size, engine.device
        self.input_ids = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(slots, 1, dtype=torch.long, device=device)
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        self.step = torch.compile(self.eager_step, mode=mode, fullgraph=False, dynamic=False)

    def eager_step(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        engine = self.engine
        key_len = engine.max_seq_len
        view = CacheView(engine.cache, 0, positions, key_len, static=True)
        hidden = engine.forward(input_ids, positions, view, key_mask(positions, key_len))
        return engine.model.lm_head(hidden[:, -1]).float()

    def __call__(self, sequences: list[Sequence]) -> torch.Tensor:
        rows = len(sequences)
        self.input_ids.zero_()
        self.positions.zero_()
        self.input_ids[:rows, 0] = torch.tensor([s.output_ids[-1] for s in sequences])
        self.positions[:rows, 0] = torch.tensor([s.length - 1 for s in sequences])
        return self.step(self.input_ids, self.positions)[:rows].clone()


class FrozenDecodeStep(torch.nn.Module):
    """decode() compiled with the weights frozen into it: an inference-only CPU option
    (`Engine(freeze_weights=True)`, the server's --freeze_weights 1). Nothing that trains the
    model may use it (RL rollouts do not).

    With inductor's "freezing", torch.compile treats the parameters as constants, so each weight
    matrix can be stored once in the CPU GEMM library's own blocked layout (pre-packed: MKL's for
    one row, oneDNN's for several) instead of being re-read in the plain layout at every product,
    and the small operations of a step are fused. Measured here (decode only, one thread): one
    row 1.2x, 16 rows 1.5x faster than eager; greedy tokens identical.

    The compiled step holds its own packed copies of the weights, made when it is compiled. A
    write to any parameter afterwards (an optimizer step, load_state_dict, merging LoRA: each
    bumps the tensor's version counter) would leave them stale, so every call compares the
    versions first and refuses to run. The first call with one row and the first with several
    each compile (tens of seconds); rows and cache length are dynamic after that."""

    def __init__(self, engine: Engine):
        super().__init__()
        if engine.device.type != "cpu":
            raise ValueError("freeze_weights is a CPU option (on CUDA, compile_decode captures the step)")
        self.model = engine.model  # a submodule, so that freezing sees its parameters as constants
        self.cache = engine.cache
        self.weights = list(engine.model.parameters())
        self.versions = self.weight_versions()
        self.compiled = torch.compile(self, dynamic=True)

    def weight_versions(self) -> list[tuple[int, int]]:
        return [(w.data_ptr(), w._version) for w in self.weights]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, key_len: int) -> torch.Tensor:
        view = CacheView(self.cache, 0, positions, key_len, static=True)
        hidden, _, _ = self.model.model(input_ids=input_ids, position_ids=positions,
                                        attention_mask=key_mask(positions, key_len),
                                        past_key_values=view, use_cache=True)
        return self.model.lm_head(hidden[:, -1]).float()

    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor, key_len: int) -> torch.Tensor:
        """Engine.decode's step, compiled; its inputs as Engine.decode builds them."""
        if self.weight_versions() != self.versions:
            raise RuntimeError("the model's weights were changed after the engine froze them (freeze_weights): "
                               "its compiled step would still use the old ones; build a new Engine")
        # freezing is a global inductor setting: on for this step's compilations only
        with torch._inductor.config.patch(freezing=True):
            return self.compiled(input_ids, positions, key_len)


# ----------------------------------------------------------------------------------------------
# From token ids to streamed text
# ----------------------------------------------------------------------------------------------

class IncrementalDecoder:
    """Turns a stream of token ids into text deltas that never end inside a character.

    A Chinese character or an emoji is 3-4 UTF-8 bytes and a byte-level token may hold only
    part of it; decoding such a part gives U+FFFD. So ids are kept until their text no longer
    ends in U+FFFD, then the text is emitted and decoding starts afresh after it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pending_ids: list[int] = []

    def add(self, token_id: int) -> str:
        self.pending_ids.append(token_id)
        text = self.decode_pending()
        if text.endswith("\ufffd"):
            return ""  # the last character's remaining bytes are still to come
        self.pending_ids = []
        return text

    def flush(self) -> str:
        """Whatever is left at the end, even an incomplete character."""
        text = self.decode_pending()
        self.pending_ids = []
        return text

    def decode_pending(self) -> str:
        return self.tokenizer.decode(self.pending_ids, skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)


def held_back_length(text: str, words) -> int:
    """Length of the longest end of `text` that could be the start of one of `words`:
    that much must wait for the next delta before we know what it is."""
    longest = max((len(w) for w in words), default=0)
    for size in range(min(len(text), longest - 1), 0, -1):
        if any(w.startswith(text[-size:]) for w in words):
            return size
    return 0


class StopStringFilter:
    """OpenAI's `stop`: the reply ends before the first occurrence of any stop string, which is
    not returned. Text that might be the start of a stop string is held back until it is not."""

    def __init__(self, stop_strings):
        self.stop_strings = [s for s in (stop_strings or []) if s]
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if not self.stop_strings:
            return text
        self.held += text
        hits = [i for i in (self.held.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            out, self.held, self.stopped = self.held[:min(hits)], "", True
            return out
        keep = held_back_length(self.held, self.stop_strings)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


# ----------------------------------------------------------------------------------------------
# A background thread for concurrent callers
# ----------------------------------------------------------------------------------------------

class QueueFull(Exception):
    """EngineLoop.submit: more sequences wait than max_queue allows."""


class EngineLoop:
    """Runs Engine.step() on its own thread for as long as there is work (continuous batching:
    a submitted sequence joins the running batch at the next step and leaves when it ends).

    submit() may be called from any thread; each sequence's on_output(StepOutput) callback is
    called on the engine thread and must return quickly (hand the output to another thread).

    The engine should step on the thread that loaded the model. PyTorch's CPU worker threads (an
    OpenMP team) belong to the thread that first ran a parallel operation, and a second thread
    doing tensor work gets a second team. With more OpenMP threads than cores, libgomp stops
    spinning between parallel regions and puts its workers to sleep instead, and a decode step is
    hundreds of short parallel regions: on 2 cores the step ran 20-40% slower that way (measured
    with bench/bench_server.py). Two ways to get it right:
      - start_thread=False: no thread is started; the caller runs run() on a thread it chooses
        and calls close() once run() has returned or was interrupted (the API server: its main
        thread, which loaded the model);
      - EngineLoop.building(build_engine): the loop's own thread loads the model (the web demo,
        where Streamlit's short-lived threads would otherwise do it)."""

    def __init__(self, engine: Engine, max_queue: int = 64, start_thread: bool = True):
        self.engine, self.max_queue = engine, max_queue
        self.inbox: list[tuple[list, SamplingParams, object]] = []
        self.inbox_size = 0
        self.wakeup = threading.Condition()
        self.closed = False
        self.running = False
        self.thread = None
        if start_thread:
            self.thread = threading.Thread(target=self.run, name="minimind-engine", daemon=True)
            self.thread.start()

    @classmethod
    def building(cls, build_engine, max_queue: int = 64) -> "EngineLoop":
        """A loop whose thread first calls build_engine() (load the model and make its Engine
        there), then runs; returns once the engine is built, raising what build_engine raised."""
        loop = cls(None, max_queue, start_thread=False)
        built, failure = threading.Event(), []

        def build_then_run():
            try:
                loop.engine = build_engine()
            except BaseException as error:  # handed to the caller, who re-raises it
                failure.append(error)
                return
            finally:
                built.set()
            loop.run()

        loop.thread = threading.Thread(target=build_then_run, name="minimind-engine", daemon=True)
        loop.thread.start()
        built.wait()
        if failure:
            raise failure[0]
        return loop

    def submit(self, prompt_ids: list[int], params: list[SamplingParams], on_output) -> list[Sequence]:
        """Queue len(params) sequences of one prompt (n replies: their prefill is shared) and
        return them at once; on_output gets every StepOutput of each. Raises QueueFull."""
        sequences = [Sequence(prompt_ids, p, self.engine.tokenizer) for p in params]
        for sequence in sequences:
            sequence.on_output = on_output
        with self.wakeup:
            if self.closed:
                raise RuntimeError("the engine loop is closed")
            if self.inbox_size + len(self.engine.waiting) + len(sequences) > self.max_queue:
                raise QueueFull(f"{self.inbox_size + len(self.engine.waiting)} requests are waiting "
                                f"(--max_queue {self.max_queue})")
            self.inbox.append(sequences)
            self.inbox_size += len(sequences)
            self.wakeup.notify()
        return sequences

    def stream(self, prompt_ids: list[int], params: SamplingParams):
        """Submit one sequence and return an iterator over its StepOutputs, for a caller on
        another thread that wants to read them in a loop (the web demo). Closing the iterator
        early (the reader went away) cancels the sequence. Raises QueueFull."""
        outputs = queue.SimpleQueue()
        sequence, = self.submit(prompt_ids, [params], outputs.put)

        def read():
            try:
                while True:
                    output = outputs.get()
                    yield output
                    if output.finish_reason is not None:
                        return
            finally:
                sequence.cancel()
        return read()

    def stop_soon(self) -> None:
        """Ask run() to return after the current step, the sequences still running or waiting
        ending as "cancelled". Safe in a signal handler on the thread that runs run()."""
        self.closed = True
        with self.wakeup:  # (reentrant: the handler may interrupt this thread inside the lock)
            self.wakeup.notify()

    def close(self) -> None:
        """Stop the loop; sequences still running or waiting end as "cancelled"."""
        self.stop_soon()
        if self.thread is not None:
            self.thread.join()
        elif not self.running:  # run() was interrupted (Ctrl-C on the thread running it)
            with self.wakeup:
                submitted = self.take_inbox()
            self.cancel_all(submitted)

    def run(self) -> None:
        """Step the engine while there is work, wait for work otherwise, until close()."""
        self.running = True
        try:
            self.loop()
        finally:
            self.running = False

    def loop(self) -> None:
        while True:
            with self.wakeup:
                while not self.inbox and not self.engine.has_work() and not self.closed:
                    self.wakeup.wait(timeout=1.0)  # (a stop_soon() from a signal handler can come
                    # between the check and the wait, its notify then lost: look again each second)
                submitted = self.take_inbox()
            if self.closed:
                self.cancel_all(submitted)
                return
            outputs = []
            for sequence in submitted:
                try:
                    self.engine.queue(sequence)
                except ValueError as error:  # too long for the engine: this sequence alone fails
                    outputs.append(self.fail(sequence, error))
            try:
                outputs += self.engine.step()
            except Exception as error:  # every running sequence gets the error; the loop goes on
                outputs += self.fail_all(error)
            for output in outputs:
                output.sequence.on_output(output)

    def take_inbox(self) -> list[Sequence]:
        """The sequences submitted since the last step (the caller holds self.wakeup)."""
        submitted = [sequence for sequences in self.inbox for sequence in sequences]
        self.inbox, self.inbox_size = [], 0
        return submitted

    def cancel_all(self, submitted: list[Sequence]) -> None:
        engine = self.engine
        for sequence in submitted + list(engine.rows) + list(engine.waiting):
            sequence.finish_reason = "cancelled"
            sequence.on_output(StepOutput(sequence, None, "", finish_reason="cancelled"))
        engine.rows, engine.waiting = [], deque()

    def fail_all(self, error: Exception) -> list[StepOutput]:
        engine = self.engine
        failed = list(engine.rows) + list(engine.waiting)
        engine.rows, engine.waiting = [], deque()
        return [self.fail(sequence, error) for sequence in failed]

    @staticmethod
    def fail(sequence: Sequence, error: Exception) -> StepOutput:
        sequence.finish_reason, sequence.error = "error", error
        return StepOutput(sequence, None, "", finish_reason="error")
