"""Rollouts for online RL: replies sampled through the generation engine (model/engine.py), and
the log-probabilities of those replies under a model.

    sampler = RolloutSampler(args, tokenizer, slots)                      # one engine for the whole run
    rollout = sampler(policy, batch, group_size)                          # G replies per prompt, seeded
    reward, parts = score_replies(rewards, batch, rollout, group_size)    # the reward of every reply
    log_probs = token_log_probs(logits, rollout.input_ids)                # (rows, length-1)
    accuracy = held_out_accuracy(model, tokenizer, rows, max_new_tokens)  # greedy, correctness rule

A rollout is the prompts and replies as one right-padded batch: row i*G+g is reply g to prompt
i. `response_mask` marks the positions whose next token is a reply token (the closing
<|im_end|> included), aligned with `token_log_probs`, so the losses see exactly the sampled
reply tokens and nothing of the prompt or the padding.
"""
import json
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dataset.lm_dataset import PAD_ID, prompt_messages
from model.engine import Engine, SamplingParams
from model.inference import build_prompt_ids
from trainer.rewards import Rewards, correctness_reward


@dataclass
class Rollout:
    input_ids: torch.Tensor       # (rows, length): prompt + reply, right-padded with PAD_ID
    response_mask: torch.Tensor   # (rows, length-1): 1 where the target input_ids[:, t+1] is a reply token
    texts: list                   # the replies' text (special tokens removed)
    engine_log_probs: torch.Tensor  # (rows, length-1): the engine's log-probs of the reply tokens (0 elsewhere)
    seconds: float                # time spent generating
    reply_tokens: int             # generated tokens in all


def rollout_seed(seed: int, step: int, index: int, reply: int) -> int:
    """The sampling seed of reply `reply` to dataset item `index` at optimizer step `step`.

    Derived from what the reply is, not from which process draws it: one process and several,
    a run and its resumed continuation, all sample the same replies."""
    value = seed
    for part in (step, index, reply):
        value = (value * 1_000_003 + part) % (2 ** 63)
    return value


def generate_replies(engine: Engine, prompts: list[list[int]], group_size: int, params_of) -> Rollout:
    """`group_size` replies to each prompt through the engine; `params_of(prompt_number, reply)`
    gives each reply's SamplingParams (its seed). The engine shares each prompt's prefill among
    its replies."""
    model = engine.model
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    repeated = [p for p in prompts for _ in range(group_size)]
    params = [params_of(i, g) for i in range(len(prompts)) for g in range(group_size)]
    sequences = engine.generate(repeated, params)
    seconds = time.perf_counter() - started
    model.train(was_training)
    rows = [s.prompt_ids + s.output_ids for s in sequences]
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
    response_mask = torch.zeros(len(rows), length - 1)
    engine_log_probs = torch.zeros(len(rows), length - 1)
    for row, s in enumerate(sequences):
        input_ids[row, :len(rows[row])] = torch.tensor(rows[row])
        first, last = len(s.prompt_ids) - 1, len(rows[row]) - 1  # targets first+1 .. last are the reply
        response_mask[row, first:last] = 1
        engine_log_probs[row, first:last] = torch.tensor(s.token_logprobs, dtype=torch.float32)
    return Rollout(input_ids, response_mask, [s.text for s in sequences], engine_log_probs, seconds,
                   sum(len(s.output_ids) for s in sequences))


def token_log_probs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) for every t, in fp32 (rows, length-1)."""
    targets = input_ids[:, 1:]
    return -F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                            reduction="none").view_as(targets)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution at every position but the last (rows, length-1)."""
    log_p = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


# ----------------------------------------------------------------------------------------------
# What GRPO and PPO share: the rollout flags, the sampler, the rewards of a rollout
# ----------------------------------------------------------------------------------------------

def add_rollout_args(parser, num_generations: bool = True) -> None:
    """What a rollout samples (shared with PPO)."""
    group = parser.add_argument_group("rollouts")
    group.add_argument("--max_gen_len", type=int, default=512, help="most tokens a reply may have")
    group.add_argument("--temperature", type=float, default=1.0,
                       help="rollout sampling temperature (1.0 samples from the policy the loss sees)")
    group.add_argument("--top_p", type=float, default=1.0, help="rollout nucleus sampling")
    if num_generations:
        group.add_argument("--num_generations", type=int, default=8, help="replies per prompt (G)")


def check_rollout_args(parser, args) -> None:
    if args.max_gen_len < 1 or args.temperature <= 0 or not 0 < args.top_p <= 1:
        parser.error("--max_gen_len must be >= 1, --temperature > 0 and --top_p in (0, 1]")


class RolloutSampler:
    """Samples a micro-batch's replies through one engine, kept for the whole run (its KV cache
    is allocated once: slots for every reply of a micro-batch, prompt plus reply long)."""

    def __init__(self, args, tokenizer, replies_per_micro_batch: int):
        self.args, self.tokenizer, self.slots = args, tokenizer, replies_per_micro_batch
        self.engine = None

    def __call__(self, policy, batch: dict, group_size: int):
        if self.engine is None:
            self.engine = Engine(policy, self.tokenizer, max_batch_size=self.slots,
                                 max_seq_len=self.args.max_seq_len + self.args.max_gen_len)
        step, indices = batch["optimizer_step"], batch["index"]

        def params_of(prompt: int, reply: int) -> SamplingParams:
            return SamplingParams(max_tokens=self.args.max_gen_len, temperature=self.args.temperature,
                                  top_p=self.args.top_p, logprobs=True,
                                  seed=rollout_seed(self.args.seed, step, indices[prompt], reply))
        return generate_replies(self.engine, batch["prompt_ids"], group_size, params_of)


def score_replies(rewards: Rewards, batch: dict, rollout, group_size: int):
    """The reward of every reply (sum of the parts) and the parts' means to log."""
    def repeat(values):
        return [v for v in values for _ in range(group_size)]
    parts = rewards.score(repeat(batch["messages"]), rollout.texts, repeat(batch["sample"]))
    total = torch.stack(list(parts.values())).sum(0)
    return total, {f"reward_{name}": values.mean() for name, values in parts.items()}


# ----------------------------------------------------------------------------------------------
# Before/after: greedy accuracy on held-out prompts with answers
# ----------------------------------------------------------------------------------------------

def read_rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@torch.inference_mode()
def held_out_accuracy(model, tokenizer, rows: list[dict], max_new_tokens: int = 64, batch_size: int = 32) -> dict:
    """Share of rows whose greedy reply states the row's answer (the correctness rule), with a
    few examples. Rows without an answer are not counted (and their number is returned)."""
    rows_with_answer = [r for r in rows if r.get("answer") is not None]
    prompts = [build_prompt_ids(tokenizer, prompt_messages(r["conversations"])) for r in rows_with_answer]
    engine = Engine(model.eval(), tokenizer, max_batch_size=batch_size,
                    max_seq_len=max(len(p) for p in prompts) + max_new_tokens)
    sequences = engine.generate(prompts, SamplingParams(max_tokens=max_new_tokens, temperature=0.0))
    correct = [correctness_reward(s.text, r) for s, r in zip(sequences, rows_with_answer)]
    return {"accuracy": sum(correct) / max(len(correct), 1), "rows": len(correct),
            "rows_without_answer": len(rows) - len(rows_with_answer),
            "examples": [(prompt_messages(r["conversations"])[-1]["content"], s.text, r["answer"])
                         for s, r in list(zip(sequences, rows_with_answer))[:3]]}
