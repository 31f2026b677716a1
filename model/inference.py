"""Talking to a trained MiniMind: loading a model and generating replies, shared by every front end.

eval_model.py (terminal), scripts/serve_openai_api.py (OpenAI-compatible HTTP API) and
scripts/web_demo.py (Streamlit) all go through this file, so they load the same files the same
way and give the same reply to the same prompt.

Loading
    add_model_args(parser)   the flags: size flags, --load, --model_mode, --out_dir, --lora_name, ...
    load_model(args)         -> (model, tokenizer); raises ModelLoadError with a helpful message

Generating
    build_prompt_ids(tokenizer, messages, raw=False)   chat template (or bos + text for pretrain)
    Generation(model, tokenizer, prompt_ids, ...)      iterate it for streamed text deltas
    generate_text(...)                                 the whole reply as one string
    split_reasoning(text) / ReasoningSplitter          `<think>…</think>` apart from the answer

Generation runs one reply on model/engine.py's batched engine (one slot); the server and the web
demo share one engine among all their users (EngineLoop), so replies are decoded together.
"""
import argparse
import json
import os
import re
import sys
import threading
import uuid
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from model.checkpoint import (REPO_ROOT, SCRIPT_OF_STAGE, STAGE_OF_MODEL_MODE, config_from_sizes,  # noqa: F401
                              count_parameters, load_weights, lora_path, read_state_dict, sizes_of_state_dict,
                              weight_path)
from model.engine import (EOS_TOKEN_ID, Engine, IncrementalDecoder, SamplingParams,  # noqa: F401 (re-exported)
                          StopStringFilter, held_back_length)
from model.model_lora import apply_lora, load_lora, merge_lora
from model.model_minimind import MiniMindForCausalLM, fast_half_dtype  # also registers "minimind" with the Auto* classes

DEFAULT_TOKENIZER_DIR = Path(REPO_ROOT) / "model"
# A fast tokenizer switches special-token splitting on and off around each encode call (state
# shared by all threads), so encodes that differ in it must not overlap.
ENCODE_LOCK = threading.RLock()


class ModelLoadError(Exception):
    """A model could not be loaded; the message says what is missing and how to make it.
    Scripts print it and exit with code 2."""


# ----------------------------------------------------------------------------------------------
# Command-line flags
# ----------------------------------------------------------------------------------------------

def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags that say which model to load and where to run it (MiniMind's names)."""
    modes = ", ".join(f"{mode} {stage}" for mode, stage in STAGE_OF_MODEL_MODE.items())
    group = parser.add_argument_group("model")
    group.add_argument("--load", type=int, default=0, choices=[0, 1],
                       help="0: native weights {out_dir}/{stage}_{hidden}{_moe}.pth, 1: a transformers folder (--hf_path)")
    group.add_argument("--model_mode", type=int, default=1, choices=sorted(STAGE_OF_MODEL_MODE),
                       help=f"which stage's weights to load: {modes}")
    group.add_argument("--out_dir", default=os.path.join(REPO_ROOT, "out"), help="folder with the trained .pth files")
    group.add_argument("--lora_name", default=None,
                       help="LoRA adapter to add, read from {out_dir}/lora/{lora_name}_{hidden}{_moe}.pth ('None' = none)")
    group.add_argument("--hf_path", default=None, help="transformers model folder for --load 1")
    group.add_argument("--tokenizer_path", default=None,
                       help="tokenizer folder (default: the --hf_path folder if it has one, else model/)")
    group.add_argument("--hidden_size", type=int, default=512)
    group.add_argument("--num_hidden_layers", type=int, default=8)
    group.add_argument("--use_moe", type=int, default=0, choices=[0, 1])
    group.add_argument("--device", default=default_device(), help="cuda, cuda:1, cpu, mps, ...")
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="auto: bfloat16 (or float16) on a GPU, float32 on the CPU")
    return parser


def model_args(**overrides) -> argparse.Namespace:
    """The flags' defaults with some values replaced, for callers without a command line."""
    args = add_model_args(argparse.ArgumentParser()).parse_args([])
    unknown = set(overrides) - set(vars(args))
    if unknown:
        raise TypeError(f"unknown model argument(s): {sorted(unknown)}")
    vars(args).update(overrides)
    return args


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """--dtype auto: the half precision this GPU runs on tensor cores (bf16 from sm80, else
    fp16), asked of the chosen device itself (cuda:1 is not cuda:0); float32 elsewhere."""
    if name != "auto":
        return getattr(torch, name)
    if device.startswith("cuda"):
        return fast_half_dtype(torch.device(device))
    return torch.float32


def lora_name_of(args) -> str | None:
    """MiniMind writes `--lora_name None` for "no adapter"."""
    name = getattr(args, "lora_name", None)
    return None if name in (None, "", "None", "none") else name


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def load_model(args) -> tuple[torch.nn.Module, object]:
    """(model in eval mode on args.device, tokenizer) as the flags describe."""
    if args.load == 1:
        model = load_transformers_folder(args.hf_path)
        tokenizer_dir = args.tokenizer_path or tokenizer_dir_for(args.hf_path)
    else:
        model = load_native(args)
        tokenizer_dir = args.tokenizer_path or DEFAULT_TOKENIZER_DIR
    device = args.device
    model = model.to(device=device, dtype=resolve_dtype(args.dtype, device)).eval()
    return model, load_tokenizer(tokenizer_dir)


def load_model_or_exit(args) -> tuple[torch.nn.Module, object]:
    """load_model for a command line: a ModelLoadError ends the program with its message, exit code 2."""
    try:
        return load_model(args)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def load_tokenizer(folder) -> object:
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise ModelLoadError(f"no tokenizer in {folder} (expected tokenizer.json and tokenizer_config.json); "
                             f"the shipped one is in model/, or train one with: python scripts/train_tokenizer.py")
    return AutoTokenizer.from_pretrained(str(folder))


def tokenizer_dir_for(hf_path: str) -> Path:
    """A converted folder usually carries its tokenizer; if not, use the shipped one."""
    has_tokenizer = (Path(hf_path) / "tokenizer.json").is_file() or (Path(hf_path) / "tokenizer_config.json").is_file()
    return Path(hf_path) if has_tokenizer else DEFAULT_TOKENIZER_DIR


def load_native(args) -> MiniMindForCausalLM:
    """MiniMind's own format: build the model from the size flags and read the .pth into it."""
    stage = STAGE_OF_MODEL_MODE[args.model_mode]
    path = weight_path(args.out_dir, stage, args.hidden_size, bool(args.use_moe))
    if not os.path.isfile(path):
        raise ModelLoadError(missing_weights_message(path, args))
    model = MiniMindForCausalLM(config_from_sizes(args.hidden_size, args.num_hidden_layers, bool(args.use_moe)))
    try:
        load_weights(model, path)
    except ValueError as e:  # shape mismatch: the message names the size flags to use
        raise ModelLoadError(str(e)) from e
    if lora_name_of(args):
        add_lora_adapter(model, args)
    return model


def add_lora_adapter(model: torch.nn.Module, args) -> None:
    """Attach the adapter with the layers and rank its file was trained with, then fold it into
    the base weights (same output, and decoding runs without the adapter's extra matmuls)."""
    name = lora_name_of(args)
    path = lora_path(args.out_dir, name, args.hidden_size, bool(args.use_moe))
    if not os.path.isfile(path):
        raise ModelLoadError(missing_lora_message(path, name, args))
    saved = read_state_dict(path)
    targets = sorted(k[: -len(".lora.A.weight")] for k in saved if k.endswith(".lora.A.weight"))
    if not targets:
        raise ModelLoadError(f"{path} holds no LoRA adapter weights (no '*.lora.A.weight' keys)")
    rank = saved[targets[0] + ".lora.A.weight"].shape[0]
    try:
        apply_lora(model, rank=rank, targets=targets)
        load_lora(model, path)
    except ValueError as e:
        raise ModelLoadError(f"{e}\n  (--hidden_size {args.hidden_size} --num_hidden_layers "
                             f"{args.num_hidden_layers} must be those of the model the adapter was trained on)") from e
    merge_lora(model)
    model.lora_summary = f"LoRA adapter {name} (rank {rank}, {len(targets)} layers) from {path}, merged into the weights"


def load_transformers_folder(hf_path: str | None) -> torch.nn.Module:
    """A folder written by save_pretrained (scripts/convert_model.py): MiniMind or Llama format.

    No remote code is ever run: MiniMind's classes are registered by importing
    model.model_minimind, and Llama is built into transformers."""
    if not hf_path:
        raise ModelLoadError("--load 1 needs --hf_path DIR, a transformers model folder "
                             "(make one with: python scripts/convert_model.py --mode torch2hf ...)")
    config_file = Path(hf_path) / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{hf_path} is not a transformers model folder (no config.json); "
                             f"make one with: python scripts/convert_model.py --mode torch2hf --in out/full_sft_512.pth "
                             f"--out {hf_path}")
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{config_file}: not valid JSON ({e})") from e
    try:
        model = AutoModelForCausalLM.from_pretrained(hf_path, dtype=torch.float32, trust_remote_code=False)
    except (ValueError, OSError, KeyError) as e:
        raise ModelLoadError(f"could not load {hf_path} (model_type {model_type!r}): {e}") from e
    return model if isinstance(model, MiniMindForCausalLM) else as_minimind(model, config_file)


def as_minimind(llama, config_file: Path) -> MiniMindForCausalLM:
    """A MiniMind-shaped Llama (scripts/convert_model.py --mode torch2llama) as the MiniMind it
    came from: same parameter names and function, and the generation engine drives MiniMind's
    attention (its slot cache goes through `past_key_values.update`)."""
    from scripts.convert_model import ConversionError, minimind_config_of_llama
    try:
        model = MiniMindForCausalLM(minimind_config_of_llama(llama.config, str(config_file)))
    except ConversionError as e:
        raise ModelLoadError(str(e)) from e
    model.load_state_dict(llama.state_dict(), strict=True)
    return model


def missing_weights_message(path: str, args) -> str:
    stage = STAGE_OF_MODEL_MODE[args.model_mode]
    size_flags = f"--hidden_size {args.hidden_size} --num_hidden_layers {args.num_hidden_layers} --use_moe {args.use_moe}"
    return "\n".join([
        f"no weights at {path} (--model_mode {args.model_mode} = {stage}, {size_flags})",
        describe_folder(args.out_dir, ".pth"),
        f"create it with: python {SCRIPT_OF_STAGE[stage]} {size_flags}",
        "or point --out_dir / --model_mode / the size flags at a file that exists "
        "(--load 1 --hf_path DIR loads a transformers folder)",
    ])


def missing_lora_message(path: str, name: str, args) -> str:
    return "\n".join([
        f"no LoRA adapter at {path} (--lora_name {name}, --hidden_size {args.hidden_size})",
        describe_folder(os.path.join(args.out_dir, "lora"), ".pth"),
        f"create it with: python trainer/train_lora.py --lora_name {name} --hidden_size {args.hidden_size} "
        f"--num_hidden_layers {args.num_hidden_layers} --use_moe {int(args.use_moe)}",
    ])


def describe_folder(folder: str, suffix: str) -> str:
    if not os.path.isdir(folder):
        return f"{folder}/ does not exist"
    names = sorted(n for n in os.listdir(folder) if n.endswith(suffix))
    if not names:
        return f"{folder}/ has no {suffix} files"
    return f"{suffix} files in {folder}/: " + ", ".join(names)


def sizes_of_checkpoint(path: str) -> dict:
    """The size flags a MiniMind .pth was saved with, read off its weight names and shapes."""
    sizes = sizes_of_state_dict(read_state_dict(path))
    if sizes is None:
        raise ModelLoadError(f"{path} is not a MiniMind checkpoint (no model.embed_tokens.weight)")
    return sizes


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------

def trim_history(messages: list[dict], history_cnt: int) -> list[dict]:
    """Keep the system message, the last `history_cnt` earlier turns (user + assistant pairs)
    and the current message: small models were trained on short contexts."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    dialogue = messages[len(system):]
    current, past = dialogue[-1:], dialogue[:-1]
    kept = past[len(past) - 2 * history_cnt:] if history_cnt > 0 else []
    return system + kept + current


def build_prompt_ids(tokenizer, messages: list[dict], raw: bool = False, tools: list[dict] | None = None) -> list[int]:
    """Token ids the model continues from.

    Chat models: the ChatML template with the assistant turn opened; `tools` (OpenAI-shaped
    schemas) are listed in the system turn as minimind-3 does (model/tools.py). The pretrain model has
    never seen a chat template, so it gets <|im_start|> + the plain text of the last message
    to continue, as MiniMind does.

    Only the template makes control tokens. Message text is tokenized as text, so a message
    holding "<|im_end|>\n<|im_start|>assistant\n" stays those characters and cannot close its
    turn and forge another one: the template is rendered with a random marker in place of each
    message, the template's own text between the markers is tokenized normally, and each
    message's text with special tokens split into plain characters."""
    with ENCODE_LOCK:
        if raw:
            return [tokenizer.bos_token_id] + text_ids(tokenizer, messages[-1]["content"])
        return chat_prompt_ids(tokenizer, messages, tools)


def chat_prompt_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    marker = f"\x00{uuid.uuid4().hex}"  # cannot occur in a message: it is new for this call
    # an empty content stays empty: the template writes the newline before a tool call only after content
    stand_ins = [{**message, "content": f"{marker}{i}{marker}"} if message.get("content") else message
                 for i, message in enumerate(messages)]
    template = tokenizer.apply_chat_template(stand_ins, tools=tools or None, tokenize=False,
                                             add_generation_prompt=True)
    ids = []
    # split() on a capturing group alternates template text and message numbers
    for index, piece in enumerate(re.split(f"{marker}(\\d+){marker}", template)):
        if index % 2 == 0:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
        else:
            ids += text_ids(tokenizer, messages[int(piece)]["content"])
    return ids


def text_ids(tokenizer, text: str) -> list[int]:
    """Ids of text as plain text: "<|im_end|>" in it becomes ordinary tokens, not the control token."""
    with ENCODE_LOCK:
        return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] if text else []


# ----------------------------------------------------------------------------------------------
# Generating one reply (through the batched engine, model/engine.py)
# ----------------------------------------------------------------------------------------------

def single_reply_engine(model, tokenizer, prompt_ids, max_new_tokens: int) -> Engine:
    """An engine with one slot, just long enough for this prompt and reply."""
    context = model.config.max_position_embeddings
    if len(prompt_ids) >= context:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {context}")
    return Engine(model, tokenizer, max_batch_size=1, max_seq_len=min(context, len(prompt_ids) + max_new_tokens))


def generate_ids(model, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 repetition_penalty: float = 1.0, seed: int | None = None, eos_token_id: int | None = EOS_TOKEN_ID,
                 cancel: threading.Event | None = None):
    """Yield new token ids one at a time (the eos token included, then stop; eos_token_id=None
    never stops early). prompt_ids: a list of ids or a tensor of shape (T,) or (1, T)."""
    prompt_ids = torch.as_tensor(prompt_ids).view(-1).tolist()
    engine = single_reply_engine(model, None, prompt_ids, max_new_tokens)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            repetition_penalty=repetition_penalty, seed=seed,
                            stop_token_ids=() if eos_token_id is None else (eos_token_id,))
    sequence = engine.add(prompt_ids, params)
    while not sequence.finished:
        if cancel is not None and cancel.is_set():
            return
        for output in engine.step():
            yield output.token_id


class Generation:
    """One reply, generated on demand: iterate over it for the text deltas.

        reply = Generation(model, tokenizer, prompt_ids, max_new_tokens=256, temperature=0.7)
        for delta in reply:
            print(delta, end="", flush=True)
        reply.finish_reason  # "stop" (eos or a stop string), "length" or "cancelled"

    Afterwards .text holds the whole reply and .prompt_tokens / .completion_tokens the counts
    (the completion count includes the closing eos token when there is one)."""

    def __init__(self, model, tokenizer, prompt_ids: list[int], max_new_tokens: int = 512,
                 temperature: float = 0.0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 seed: int | None = None, stop: list[str] | None = None, cancel: threading.Event | None = None):
        self.engine = single_reply_engine(model, tokenizer, prompt_ids, max_new_tokens)
        self.sequence = self.engine.add(prompt_ids, SamplingParams(
            max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            repetition_penalty=repetition_penalty, seed=seed, stop=tuple(stop or ())))
        self.cancel = cancel
        self.prompt_tokens = len(prompt_ids)

    def __iter__(self):
        while not self.sequence.finished:
            if self.cancel is not None and self.cancel.is_set():
                self.sequence.cancel()
            for output in self.engine.step():
                if output.text:
                    yield output.text

    @property
    def text(self) -> str:
        return self.sequence.text

    @property
    def completion_tokens(self) -> int:
        return len(self.sequence.output_ids)

    @property
    def finish_reason(self) -> str | None:
        return self.sequence.finish_reason


def generate_text(model, tokenizer, prompt_ids: list[int], **options) -> str:
    """The whole reply at once (same options as Generation)."""
    return "".join(Generation(model, tokenizer, prompt_ids, **options))


# ----------------------------------------------------------------------------------------------
# Reasoning models: <think>…</think> apart from the answer
# ----------------------------------------------------------------------------------------------

class ReasoningSplitter:
    """Routes streamed text to "reasoning" (inside <think>…</think>) or "content" (the rest).

    The tags themselves are dropped, as are the <answer>…</answer> tags that MiniMind's
    reasoning data wraps the answer in, and the whitespace that starts each part. A tag split
    across two deltas is held back until it is complete."""

    TAGS = ("<think>", "</think>", "<answer>", "</answer>")

    def __init__(self):
        self.kind = "content"
        self.at_part_start = True
        self.held = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        """[(kind, text), ...] for the text that is now certain."""
        self.held += text
        pieces = []
        while True:
            found = [(self.held.find(tag), tag) for tag in self.TAGS if tag in self.held]
            if not found:
                break
            index, tag = min(found)
            self.emit(pieces, self.held[:index])
            self.held = self.held[index + len(tag):]
            if tag in ("<think>", "</think>"):
                self.kind = "reasoning" if tag == "<think>" else "content"
                self.at_part_start = True
        keep = held_back_length(self.held, self.TAGS)
        self.emit(pieces, self.held[:len(self.held) - keep])
        self.held = self.held[len(self.held) - keep:]
        return pieces

    def flush(self) -> list[tuple[str, str]]:
        pieces = []
        self.emit(pieces, self.held)
        self.held = ""
        return pieces

    def emit(self, pieces: list, text: str) -> None:
        if self.at_part_start:
            text = text.lstrip()
        if text:
            self.at_part_start = False
            pieces.append((self.kind, text))


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a whole reply; reasoning is "" when the model did not think aloud."""
    splitter = ReasoningSplitter()
    parts = {"reasoning": "", "content": ""}
    for kind, piece in splitter.feed(text) + splitter.flush():
        parts[kind] += piece
    return parts["reasoning"], parts["content"]
