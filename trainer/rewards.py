"""Rewards for online RL (GRPO, PPO): built-in rules, a user's own function, a reward model.

    rewards = Rewards.from_args(args)                       # what the flags ask for
    parts = rewards.score(prompts, responses, samples)      # {"correctness": tensor, "format": ..., ...}
    total = sum(parts.values())                             # the reward of each reply

Each part is a tensor with one value per reply and is logged on its own (reward_correctness,
reward_format, ...), so a run shows which part moves. The parts:

  correctness  1 if the reply gives the row's `answer`, else 0 (rows without one: 0). Numbers
               are compared as numbers: the last number of the reply (inside <answer> when
               there is one) must equal the answer's ("11", "11.0" and "等于11。" all match 11).
               Text answers must appear in the reply (case and spaces ignored).
  format       when the reply thinks (has <think> or </think>): +0.5 for exactly one
               <think>…</think> followed by one <answer>…</answer>, −0.5 otherwise; 0 for a
               reply that does not think
  length       −0.5 when the reply's length in characters is outside --reward_length MIN:MAX
  repetition   −(share of repeated word 3-grams) (capped at 0.5): penalises loops
  function     --reward_fn FILE.py:NAME, called as NAME(prompt, response, sample) -> float, where
               prompt is the last user message and sample the whole data row
  model        --reward_model_path: the score of a transformers AutoModelForSequenceClassification
               folder (its first logit) for the conversation with the reply appended
"""
import importlib.util
import math
import os
import re

import torch

from model.command_line import UserError

RULES = ("correctness", "format", "length", "repetition")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
THINK_ANSWER = re.compile(r"^\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*$", re.DOTALL)
WORD = re.compile(r"\w+|[^\w\s]")
REPETITION_CAP = 0.5


# ----------------------------------------------------------------------------------------------
# The rules
# ----------------------------------------------------------------------------------------------

def final_answer(response: str) -> str:
    """The part of a reply that holds its answer: inside <answer>…</answer> when present."""
    match = re.search(r"<answer>(.*?)(?:</answer>|$)", response, re.DOTALL)
    return match.group(1) if match else response.split("</think>")[-1]


def as_number(text: str) -> float | None:
    text = text.strip().replace(",", "")
    try:
        return float(text)
    except ValueError:
        return None


def normalised(text: str) -> str:
    return re.sub(r"\s+", "", text).casefold()


def correctness_reward(response: str, sample: dict) -> float:
    """1.0 when the reply states the row's answer (see the module's docstring), else 0.0."""
    expected = sample.get("answer")
    if expected is None:
        return 0.0
    reply = final_answer(response)
    number = as_number(str(expected))
    if number is not None:
        numbers = NUMBER.findall(reply.replace(",", ""))
        return float(bool(numbers) and math.isclose(float(numbers[-1]), number, abs_tol=1e-6))
    return float(normalised(str(expected)) in normalised(reply))


def format_reward(response: str) -> float:
    if "<think>" not in response and "</think>" not in response:
        return 0.0
    well_formed = THINK_ANSWER.match(response) and response.count("<think>") == 1 and response.count("</think>") == 1
    return 0.5 if well_formed else -0.5


def length_reward(response: str, min_chars: int, max_chars: int) -> float:
    return 0.0 if min_chars <= len(response.strip()) <= max_chars else -0.5


def repetition_reward(response: str, n: int = 3) -> float:
    """−(repeated n-grams / all n-grams), at most REPETITION_CAP in size."""
    words = WORD.findall(response.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return -min(REPETITION_CAP, (len(grams) - len(set(grams))) / len(grams))


def parse_length_bounds(text: str) -> tuple[int, int]:
    low, sep, high = text.partition(":")
    if not sep or not low.strip().isdigit() or not high.strip().isdigit() or int(low) > int(high):
        raise UserError(f"--reward_length {text!r}: expected MIN:MAX in characters, e.g. 2:800")
    return int(low), int(high)


# ----------------------------------------------------------------------------------------------
# A user's function and a reward model
# ----------------------------------------------------------------------------------------------

def load_reward_function(spec: str):
    """`path/to/file.py:name` -> the function `name` defined in that file."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path.endswith(".py") or not name.isidentifier():
        raise UserError(f"--reward_fn {spec!r}: expected FILE.py:NAME, e.g. my_rewards.py:reward")
    if not os.path.isfile(path):
        raise UserError(f"--reward_fn {spec!r}: no such file {path}")
    module_spec = importlib.util.spec_from_file_location(f"user_reward_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    function = getattr(module, name, None)
    if not callable(function):
        raise UserError(f"--reward_fn {spec!r}: {path} defines no function {name}")
    return function


class RewardModel:
    """A sequence-classification reward model from a local folder, scoring whole conversations.

    Loaded offline (local_files_only) and without remote code: the folder must be one
    transformers can build by itself (AutoModelForSequenceClassification). It runs in inference
    mode, in `dtype`, on `device`."""

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype, batch_size: int = 16):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        if not os.path.isdir(path):
            raise UserError(f"--reward_model_path {path}: no such folder")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True, dtype=dtype)
        except (OSError, ValueError, KeyError) as error:
            raise UserError(f"--reward_model_path {path}: not a transformers sequence-classification folder "
                            f"that loads offline without remote code ({str(error).splitlines()[0]})") from None
        self.model.to(device).eval().requires_grad_(False)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device, self.batch_size = device, batch_size

    def text(self, messages: list[dict], response: str) -> str:
        conversation = messages + [{"role": "assistant", "content": response}]
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(conversation, tokenize=False)
        return "\n".join(f"{m['role']}: {m['content']}" for m in conversation)

    @torch.inference_mode()
    def score(self, conversations: list[list[dict]], responses: list[str]) -> torch.Tensor:
        texts = [self.text(m, r) for m, r in zip(conversations, responses)]
        scores = []
        for start in range(0, len(texts), self.batch_size):
            encoded = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                     truncation=True).to(self.device)
            scores.append(self.model(**encoded).logits[:, 0].float().cpu())
        return torch.cat(scores)


# ----------------------------------------------------------------------------------------------
# All of them together
# ----------------------------------------------------------------------------------------------

def add_reward_args(parser) -> None:
    group = parser.add_argument_group("rewards")
    group.add_argument("--reward_rules", default=",".join(RULES),
                       help=f"comma-separated built-in rules to use, of {', '.join(RULES)} ('none' = none)")
    group.add_argument("--reward_length", default="2:800", help="MIN:MAX characters a reply may have (length rule)")
    group.add_argument("--reward_fn", default=None, metavar="FILE.py:NAME",
                       help="your own reward: NAME(prompt: str, response: str, sample: dict) -> float")
    group.add_argument("--reward_model_path", default=None,
                       help="a local transformers AutoModelForSequenceClassification folder whose score is added")


class Rewards:
    """The reward parts the flags ask for; score() gives one tensor per part."""

    def __init__(self, rules=RULES, length_bounds=(2, 800), function=None, model: RewardModel | None = None):
        unknown = set(rules) - set(RULES)
        if unknown:
            raise UserError(f"--reward_rules: unknown rule(s) {', '.join(sorted(unknown))}; use some of {', '.join(RULES)}")
        self.rules, self.length_bounds, self.function, self.model = tuple(rules), length_bounds, function, model
        if not self.rules and function is None and model is None:
            raise UserError("no reward: give --reward_rules, --reward_fn or --reward_model_path")

    @classmethod
    def from_args(cls, args, device: torch.device, dtype: torch.dtype) -> "Rewards":
        rules = [] if args.reward_rules.strip() == "none" else [r.strip() for r in args.reward_rules.split(",") if r.strip()]
        function = load_reward_function(args.reward_fn) if args.reward_fn else None
        model = RewardModel(args.reward_model_path, device, dtype) if args.reward_model_path else None
        return cls(rules, parse_length_bounds(args.reward_length), function, model)

    def score(self, conversations: list[list[dict]], responses: list[str], samples: list[dict]) -> dict:
        """{part: tensor (replies,)} for the replies to the prompts `conversations` of `samples`."""
        parts = {}
        rules = {"correctness": lambda r, s: correctness_reward(r, s),
                 "format": lambda r, s: format_reward(r),
                 "length": lambda r, s: length_reward(r, *self.length_bounds),
                 "repetition": lambda r, s: repetition_reward(r)}
        for rule in self.rules:
            parts[rule] = torch.tensor([rules[rule](r, s) for r, s in zip(responses, samples)])
        if self.function is not None:
            parts["function"] = torch.tensor([self.call_function(m[-1]["content"], r, s)
                                              for m, r, s in zip(conversations, responses, samples)])
        if self.model is not None:
            parts["model"] = self.model.score(conversations, responses)
        return parts

    def call_function(self, prompt: str, response: str, sample: dict) -> float:
        value = self.function(prompt, response, sample)
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise UserError(f"--reward_fn returned {value!r} for the prompt {prompt[:60]!r}: it must return a finite number")
        return number
