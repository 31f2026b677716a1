"""An OpenAI-compatible HTTP API for a trained MiniMind (FastAPI + uvicorn).

    python scripts/serve_openai_api.py --model_mode 1            # http://127.0.0.1:8998/v1
    python scripts/serve_openai_api.py --api_key sk-local-secret  # require "Authorization: Bearer ..."

Any OpenAI client works against it (the `openai` SDK, Open-WebUI, FastGPT, Dify, curl,
lm-evaluation-harness's local-completions):
    POST /v1/chat/completions   messages, n, temperature, top_p, max_tokens, stream, stop, seed,
                                presence/frequency_penalty, logprobs, top_logprobs, tools, tool_choice
    POST /v1/completions        the legacy API: prompt (text, token ids, or a list), echo, logprobs
    GET  /v1/models, GET /health

How it serves many clients at once (continuous batching): every request is checked and
tokenized as it arrives on the HTTP thread, then handed to the engine (model/engine.py's
EngineLoop, on the main thread) that decodes all running replies together, one token each per
step. A new request joins at the next step and leaves when its reply ends or its client
disconnects. At most --max_batch_size replies run together; up to --max_queue more wait, and
beyond that a request is answered 429.

Tools (as OpenAI): `tools` are listed in the prompt in minimind-3's format (model/tools.py); a
reply with <tool_call> blocks comes back as message.tool_calls with finish_reason "tool_calls"
(streamed as tool_calls deltas); the client runs the tools and sends the results back as
`role: "tool"` messages. tool_choice: "auto" (default), "none" (the tools are left out of the
prompt), "required" or {"type": "function", "function": {"name": ...}}: the reply is started
with the call's opening text, so the model must call (that) tool. The server runs no tool.
"""
import argparse
import asyncio
import hmac
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers.convert_slow_tokenizer import bytes_to_unicode

from model.engine import Engine, EngineLoop, IncrementalDecoder, QueueFull, SamplingParams, StepOutput
from model.inference import (ENCODE_LOCK, ReasoningSplitter, add_model_args, build_prompt_ids,
                             load_model_or_exit)
from model.tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ToolCall, ToolCallStream

log = logging.getLogger("uvicorn.error")  # uvicorn prints this logger's lines next to its own
ROLES = ("system", "user", "assistant", "tool")
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_TOP_LOGPROBS = 20  # as OpenAI's chat API (its legacy API allows 5; we allow 20 there too)
DEFAULT_CONTEXT_LENGTH = 512  # the trainers' --max_seq_len: what the models have seen


# ----------------------------------------------------------------------------------------------
# Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}
# ----------------------------------------------------------------------------------------------

class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


# ----------------------------------------------------------------------------------------------
# Reading and checking a request
# ----------------------------------------------------------------------------------------------

# Fields that are part of OpenAI's API but not implemented here: a request that uses them gets
# 400 rather than a reply that silently ignores what it asked for. (null / empty values pass.)
UNSUPPORTED = {
    "logit_bias": "logit_bias is not supported",
    "functions": "function calling is not supported by this server",
    "function_call": "function calling is not supported by this server",
    "audio": "audio output is not supported (this model reads and writes text)",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "suffix": "suffix (insertion) is not supported",
}
# Fields that only describe the caller or how OpenAI stores requests: accepted, no effect on the reply.
NO_EFFECT = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
CHAT_FIELDS = {"model", "messages", "n", "stream", "stream_options", "max_tokens", "max_completion_tokens",
               "temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "stop",
               "seed", "logprobs", "top_logprobs", "response_format", "modalities", "tools", "tool_choice"}
COMPLETION_FIELDS = {"model", "prompt", "n", "best_of", "stream", "stream_options", "max_tokens", "temperature",
                     "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "stop", "seed",
                     "logprobs", "echo"}


@dataclass
class GenerationRequest:
    """What a chat or completions request asks for, checked; prompts filled in after tokenization."""
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    max_tokens_given: bool
    messages: list[dict] = field(default_factory=list)  # chat
    tools: list[dict] | None = None  # chat: the function schemas listed in the prompt (None: no tools)
    reply_prefix: str = ""  # chat: text the reply is started with (tool_choice "required" or a named function)
    prompts: list = field(default_factory=list)  # completions: strings or token-id lists
    echo: bool = False


def parse_json_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from e
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(body).__name__}", code="invalid_json")
    return body


def check_fields(body: dict, known: set[str]) -> None:
    for name, value in body.items():
        if name in NO_EFFECT or value in (None, [], {}):
            continue
        if name in UNSUPPORTED:
            raise APIError(400, f"'{name}': {UNSUPPORTED[name]}", param=name, code="unsupported_parameter")
        if name not in known:
            raise APIError(400, f"unrecognized request argument: '{name}'", param=name, code="unknown_parameter")


def number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    """body[name] (or the default when absent/null), checked to lie in [low, high]."""
    value = body.get(name)
    if value is None:
        return default
    wanted = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, wanted):
        raise APIError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {json.dumps(value)}",
                       param=name, code="invalid_type")
    if not low <= value <= high:
        raise APIError(400, f"'{name}' must be between {low} and {high}, got {value}", param=name,
                       code="invalid_value")
    return value


def flag(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"'{name}' must be true or false", param=name, code="invalid_type")
    return value


def message_text(content, index: int) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise APIError(400, f"messages[{index}].content must be a string or a list of text parts "
                        f"(this model reads text only)", param=f"messages[{index}].content", code="invalid_type")


def parse_tool_calls(calls, index: int) -> list[dict]:
    """An assistant message's tool_calls, with the arguments re-written as json.dumps writes them
    (the form the model was trained on)."""
    where = f"messages[{index}].tool_calls"
    if not isinstance(calls, list) or not calls:
        raise APIError(400, f"{where} must be a non-empty list", param=where, code="invalid_value")
    parsed = []
    for n, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(call.get("id") if isinstance(call, dict) else None, str) or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str) or not isinstance(function.get("arguments"), str):
            raise APIError(400, f"{where}[{n}] must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                                f"\"arguments\": a JSON string}}}}", param=f"{where}[{n}]", code="invalid_value")
        try:
            arguments = json.loads(function["arguments"])
        except json.JSONDecodeError as e:
            raise APIError(400, f"{where}[{n}].function.arguments is not valid JSON ({e})",
                           param=f"{where}[{n}].function.arguments", code="invalid_value") from e
        parsed.append({"id": call["id"], "type": "function",
                       "function": {"name": function["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}})
    return parsed


# which message may follow which ("assistant+calls": an assistant message with tool_calls)
NEXT_ROLES = {"start": ("user",), "user": ("assistant",), "assistant": ("user",),
              "assistant+calls": ("tool",), "tool": ("tool", "assistant")}


def parse_message(message, index: int, state: str) -> tuple[dict, str]:
    """One checked message in the template's shape, and the state after it."""
    if not isinstance(message, dict):
        raise APIError(400, f"messages[{index}] must be an object with 'role' and 'content'",
                       param=f"messages[{index}]")
    role = message.get("role")
    if role not in ROLES:
        raise APIError(400, f"messages[{index}].role is {json.dumps(role)}; it must be one of {', '.join(ROLES)}",
                       param=f"messages[{index}].role", code="invalid_value")
    expected = ("system", "user") if index == 0 else NEXT_ROLES[state]
    if role not in expected:
        raise APIError(400, f"messages[{index}] is from {role!r} but {' or '.join(map(repr, expected))} was expected: "
                            f"after an optional first system message, user and assistant messages must alternate, "
                            f"starting with user; tool messages answer an assistant message's tool_calls",
                       param=f"messages[{index}].role", code="invalid_message_order")
    if role == "assistant" and message.get("tool_calls"):
        content = "" if message.get("content") is None else message_text(message.get("content"), index)
        return {"role": role, "content": content,
                "tool_calls": parse_tool_calls(message["tool_calls"], index)}, "assistant+calls"
    if role == "tool" and not isinstance(message.get("tool_call_id"), str):
        raise APIError(400, f"messages[{index}].tool_call_id is required: the id of the call this result answers",
                       param=f"messages[{index}].tool_call_id", code="missing_required_parameter")
    checked = {"role": role, "content": message_text(message.get("content"), index)}
    if role == "tool":
        checked["tool_call_id"] = message["tool_call_id"]
    return checked, ("start" if role == "system" else role)


def parse_messages(messages) -> list[dict]:
    """Checked messages: an optional system message first, then user and assistant taking turns,
    starting with the user; an assistant message with tool_calls is followed by the tool results
    (role "tool", one per call id). The last message is the user's or a tool result."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects",
                       param="messages", code="invalid_value")
    checked, state, call_ids = [], "start", set()
    for i, message in enumerate(messages):
        parsed, state = parse_message(message, i, state)
        if state == "assistant+calls":
            call_ids = {call["id"] for call in parsed["tool_calls"]}
        elif state == "tool" and parsed["tool_call_id"] not in call_ids:
            raise APIError(400, f"messages[{i}].tool_call_id {parsed['tool_call_id']!r} is not the id of a call in "
                                f"the assistant message before it", param=f"messages[{i}].tool_call_id",
                           code="invalid_value")
        checked.append(parsed)
    if checked[-1]["role"] not in ("user", "tool"):
        raise APIError(400, "the last message must be from the user or a tool result (there is nothing to answer)",
                       param="messages", code="invalid_message_order")
    return checked


def parse_tools(tools) -> list[dict] | None:
    """The request's function tools as the template lists them ({"type", "function"})."""
    if tools in (None, []):
        return None
    if not isinstance(tools, list):
        raise APIError(400, "'tools' must be a list of {\"type\": \"function\", \"function\": {...}} objects",
                       param="tools", code="invalid_type")
    parsed = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str) or not FUNCTION_NAME.match(function["name"]):
            raise APIError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}} with a "
                                f"name of letters, digits, _ or - (at most 64)", param=f"tools[{i}]",
                           code="invalid_value")
        kept = {key: function[key] for key in ("name", "description", "parameters") if key in function}
        parsed.append({"type": "function", "function": kept})
    return parsed


def parse_tool_choice(choice, tools: list[dict] | None) -> tuple[list[dict] | None, str]:
    """(the tools listed in the prompt, the text the reply starts with) for tool_choice."""
    names = [tool["function"]["name"] for tool in tools or []]
    if choice in (None, "auto"):
        return tools, ""
    if choice == "none":
        return None, ""
    if not tools:
        raise APIError(400, "'tool_choice' needs 'tools'", param="tool_choice", code="invalid_value")
    # the prefixes end where a token ends in the trained text (before ' "' and ' {'), so the
    # model's next token is one it has learned to write there
    if choice == "required":
        return tools, f'{TOOL_CALL_OPEN}\n{{"name":'
    function = choice.get("function") if isinstance(choice, dict) else None
    if not isinstance(function, dict) or function.get("name") not in names:
        raise APIError(400, f"'tool_choice' must be \"auto\", \"none\", \"required\" or {{\"type\": \"function\", "
                            f"\"function\": {{\"name\": one of {', '.join(names)}}}}}", param="tool_choice",
                       code="invalid_value")
    return tools, f'{TOOL_CALL_OPEN}\n{{"name": "{function["name"]}", "arguments":'


def parse_stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them",
                       param="stop", code="invalid_value")
    return tuple(stops)


def parse_common(body: dict, settings, logprobs: bool, top_logprobs: int, min_tokens: int = 1,
                 token_field: str = "max_tokens", default_max_tokens: int | None = None) -> GenerationRequest:
    """The sampling fields both APIs share."""
    if not isinstance(body.get("model"), str):
        raise APIError(400, "'model' is required (a string; GET /v1/models lists this server's model)",
                       param="model", code="missing_required_parameter")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options", code="invalid_type")
    n = number(body, "n", 1, 1, settings.max_batch_size, integer=True)
    max_tokens = number(body, token_field, None, min_tokens, settings.context_length, integer=True)
    params = SamplingParams(
        max_tokens=settings.max_tokens if max_tokens is None else max_tokens,
        temperature=number(body, "temperature", settings.temperature, 0.0, 2.0),
        top_p=number(body, "top_p", settings.top_p, 0.0, 1.0),
        repetition_penalty=number(body, "repetition_penalty", 1.0, 0.01, 10.0),
        presence_penalty=number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        seed=number(body, "seed", None, -2**63, 2**63 - 1, integer=True),
        stop=parse_stop(body.get("stop")),
        logprobs=logprobs, top_logprobs=top_logprobs)
    return GenerationRequest(params=params, n=n, stream=flag(body, "stream"),
                             include_usage=bool(stream_options.get("include_usage")),
                             max_tokens_given=max_tokens is not None)


def parse_chat_request(body: dict, settings) -> GenerationRequest:
    check_fields(body, CHAT_FIELDS)
    response_format = body.get("response_format")
    if response_format not in (None, {}) and response_format != {"type": "text"}:
        raise APIError(400, "'response_format': only {\"type\": \"text\"} is supported (no JSON mode or schemas)",
                       param="response_format", code="unsupported_parameter")
    if body.get("modalities") not in (None, [], ["text"]):
        raise APIError(400, "'modalities': only [\"text\"] is supported", param="modalities",
                       code="unsupported_parameter")
    logprobs = flag(body, "logprobs")
    top_logprobs = number(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True)
    if top_logprobs and not logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
    # max_completion_tokens is the newer name of max_tokens
    token_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    request = parse_common(body, settings, logprobs, top_logprobs, token_field=token_field)
    request.messages = parse_messages(body.get("messages"))
    request.tools, request.reply_prefix = parse_tool_choice(body.get("tool_choice"), parse_tools(body.get("tools")))
    return request


def parse_completion_request(body: dict, settings) -> GenerationRequest:
    check_fields(body, COMPLETION_FIELDS)
    echo = flag(body, "echo")
    top_logprobs = number(body, "logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
    if body.get("best_of") not in (None, body.get("n", 1)):
        raise APIError(400, "'best_of' other than n is not supported", param="best_of", code="unsupported_parameter")
    request = parse_common(body, settings, logprobs=top_logprobs is not None, top_logprobs=top_logprobs or 0,
                           min_tokens=0 if echo else 1)
    if not request.max_tokens_given:
        request.params.max_tokens = 16  # OpenAI's default for this API
    if echo and request.stream:
        raise APIError(400, "'echo' together with 'stream' is not supported", param="echo",
                       code="unsupported_parameter")
    request.echo = echo
    request.params.prompt_logprobs = echo and top_logprobs is not None
    request.prompts = parse_prompts(body.get("prompt"), settings.vocab_size)
    return request


def parse_prompts(prompt, vocab_size: int) -> list:
    """'prompt' is a string, a list of strings, a list of token ids, or a list of such lists."""
    def is_ids(value):
        return isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool)
                                                          for t in value)

    if isinstance(prompt, str) or is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
        prompts = prompt
    else:
        raise APIError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of "
                            "token-id lists (none empty)", param="prompt", code="invalid_value")
    for i, p in enumerate(prompts):
        if isinstance(p, list) and not all(0 <= t < vocab_size for t in p):
            raise APIError(400, f"prompt {i} holds a token id outside 0..{vocab_size - 1}", param="prompt",
                           code="invalid_value")
        if p == "":
            raise APIError(400, f"prompt {i} is empty", param="prompt", code="invalid_value")
    return prompts


def replies_params(request: GenerationRequest) -> list[SamplingParams]:
    """One SamplingParams per reply: n replies to one prompt get seeds seed, seed+1, ... so they
    differ from each other and each is reproducible."""
    params = []
    for i in range(request.n):
        seed = None if request.params.seed is None else request.params.seed + i
        params.append(SamplingParams(**{**vars(request.params), "seed": seed}))
    return params


# ----------------------------------------------------------------------------------------------
# Tokens in OpenAI's logprobs shapes
# ----------------------------------------------------------------------------------------------

BYTE_OF_CHARACTER = {character: byte for byte, character in bytes_to_unicode().items()}


class TokenTexts:
    """A token's bytes and its text as the OpenAI APIs show it (a token holding part of a
    UTF-8 character shows as "bytes:\\xe4\\xbd", as OpenAI does)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special_ids = set(tokenizer.all_special_ids)
        self.bytes_of = lru_cache(maxsize=None)(self.token_bytes)

    def token_bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if token_id in self.special_ids or not all(c in BYTE_OF_CHARACTER for c in piece):
            return piece.encode("utf-8")
        return bytes(BYTE_OF_CHARACTER[c] for c in piece)  # byte-level BPE: one character per byte

    def text(self, token_id: int) -> str:
        raw = self.bytes_of(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def chat_entry(self, token_id: int, logprob: float, top=None) -> dict:
        entry = {"token": self.text(token_id), "logprob": logprob, "bytes": list(self.bytes_of(token_id))}
        if top is not None:
            entry["top_logprobs"] = [self.chat_entry(t, lp) for t, lp in top]
        return entry

    def top_dict(self, top) -> dict:
        return {self.text(t): lp for t, lp in top}


# ----------------------------------------------------------------------------------------------
# The bridge between the engine thread and the event loop
# ----------------------------------------------------------------------------------------------

class OutputRelay:
    """Carries StepOutputs from the engine thread to the requests' queues on the event loop.

    Waking the event loop is a system call and a thread switch: the outputs a step produces
    for all its rows are collected and delivered by one wake-up, not one per row."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pending: list[tuple[asyncio.Queue, StepOutput]] = []
        self.lock = threading.Lock()

    def send(self, queue: asyncio.Queue, output: StepOutput) -> None:  # on the engine thread
        with self.lock:
            self.pending.append((queue, output))
            wake = len(self.pending) == 1  # else a wake-up is already on its way
        if wake:
            self.loop.call_soon_threadsafe(self.deliver)

    def deliver(self) -> None:  # on the event loop
        with self.lock:
            pending, self.pending = self.pending, []
        for queue, output in pending:
            queue.put_nowait(output)


class Server:
    """Owns the engine loop and the tokenizer; one per app."""

    def __init__(self, engine_loop: EngineLoop, tokenizer, settings):
        self.engine_loop, self.tokenizer, self.settings = engine_loop, tokenizer, settings
        self.raw_prompts = settings.model_mode == 0  # the pretrain model continues text instead of chatting
        self.tokens = TokenTexts(tokenizer)
        self.relay: OutputRelay | None = None  # made on the event loop, at the first request

    def relay_to(self, loop: asyncio.AbstractEventLoop) -> OutputRelay:
        if self.relay is None or self.relay.loop is not loop:
            self.relay = OutputRelay(loop)
        return self.relay

    def chat_prompt_ids(self, request: GenerationRequest) -> list[int]:
        ids = build_prompt_ids(self.tokenizer, request.messages, self.raw_prompts, tools=request.tools)
        if request.reply_prefix:  # template text (a checked function name): its tags are the tag tokens
            with ENCODE_LOCK:
                ids += self.tokenizer(request.reply_prefix, add_special_tokens=False)["input_ids"]
        self.check_length(ids, "messages", "Send fewer or shorter messages.")
        return ids

    def completion_prompt_ids(self, prompt, echo: bool) -> list[int]:
        """A completions prompt is raw model input: a string's special tokens are recognised (as
        vLLM does); no bos token is added (send it yourself, as lm-evaluation-harness does)."""
        if isinstance(prompt, list):
            ids = prompt
        else:
            with ENCODE_LOCK:
                ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        self.check_length(ids, "prompt", "Send a shorter prompt.", allow_full=echo)
        return ids

    def check_length(self, ids: list[int], param: str, advice: str, allow_full: bool = False) -> None:
        context = self.settings.context_length
        if len(ids) > context or (len(ids) == context and not allow_full):
            raise APIError(400, f"the prompt is {len(ids)} tokens long; this server's context is {context} tokens "
                                f"(--context_length). {advice}", param=param, code="context_length_exceeded")

    def start(self, prompt_ids: list[int], request: GenerationRequest, queue: asyncio.Queue, replies: list):
        """Queue n replies to one prompt; their outputs arrive on `queue`. Raises 429 when full."""
        relay = self.relay_to(asyncio.get_running_loop())
        params = replies_params(request)

        def on_output(output: StepOutput):  # runs on the engine thread
            if output.finish_reason is not None:
                log_reply(output)  # here, not in the request: a client that left reads nothing more
            try:
                relay.send(queue, output)
            except RuntimeError:  # the event loop is gone (server shutting down)
                output.sequence.cancel()

        try:
            replies += self.engine_loop.submit(prompt_ids, params, on_output)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry later", code="rate_limit_exceeded",
                           kind="rate_limit_error") from e


async def output_batches(queue: asyncio.Queue, replies: list):
    """Yield lists of StepOutputs, all that have arrived, until every reply has finished (a
    stream then sends what a client has not read yet in one write, not one per token); cancel
    them all if the consumer leaves (a client that disconnects closes the response, which
    closes this generator)."""
    try:
        unfinished = len(replies)
        while unfinished:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            unfinished -= sum(output.finish_reason is not None for output in batch)
            yield batch
    finally:
        for sequence in replies:
            sequence.cancel()


async def outputs_until_done(queue: asyncio.Queue, replies: list):
    """output_batches, one StepOutput at a time."""
    async for batch in output_batches(queue, replies):
        for output in batch:
            yield output


def log_reply(output: StepOutput) -> None:
    sequence = output.sequence
    if output.finish_reason == "cancelled":
        log.info("client disconnected, generation stopped after %d tokens", len(sequence.output_ids))
    elif output.finish_reason == "error":
        log.error("generation failed: %r", sequence.error)
    else:
        seconds = time.perf_counter() - sequence.started
        log.info("%d prompt + %d completion tokens, finish_reason=%s, %.2f s (%.1f tokens/s)",
                 len(sequence.prompt_ids), len(sequence.output_ids), output.finish_reason, seconds,
                 len(sequence.output_ids) / seconds if seconds > 0 else 0.0)


def engine_error(output: StepOutput) -> APIError:
    return APIError(500, f"generation failed: {output.sequence.error}", code="engine_error", kind="server_error")


def usage(prompt_tokens: int, replies: list) -> dict:
    completion = sum(len(s.output_ids) for s in replies)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


# ----------------------------------------------------------------------------------------------
# Chat completions
# ----------------------------------------------------------------------------------------------

class ChatChoice:
    """One reply's text split into reasoning, answer and tool calls, and its logprobs entries.

    With tools, the answer goes through a ToolCallStream: a well-formed call of an offered
    function becomes a ("call", ToolCall) piece; anything else in <tool_call> tags (bad JSON, a
    function that was not offered) stays in the content as the model wrote it."""

    def __init__(self, tool_names: list[str] | None = None, reply_prefix: str = ""):
        self.splitter = ReasoningSplitter()
        self.tool_names = tool_names
        self.tool_stream = ToolCallStream() if tool_names is not None else None
        self.parts = {"reasoning": "", "content": ""}
        self.calls: list[ToolCall] = []
        self.logprobs: list[dict] = []
        self.pending = self.route(self.splitter.feed(reply_prefix)) if reply_prefix else []

    def add(self, output: StepOutput, tokens: TokenTexts) -> tuple[list, list]:
        """(pieces now certain as (kind, text or ToolCall), logprobs entries) for this output."""
        entries = []
        stop_token = output.token_id in output.sequence.params.stop_token_ids  # OpenAI leaves it out
        if output.token_id is not None and output.logprob is not None and not stop_token:
            top = output.top_logprobs if output.sequence.params.top_logprobs else []
            entries.append(tokens.chat_entry(output.token_id, output.logprob, top))
        pieces, self.pending = self.pending + self.route(self.splitter.feed(output.text)), []
        if output.finish_reason is not None:
            pieces += self.route(self.splitter.flush(), end=True)
        for kind, value in pieces:
            if kind == "call":
                self.calls.append(value)
            else:
                self.parts[kind] += value
        self.logprobs += entries
        return pieces, entries

    def route(self, pieces: list, end: bool = False) -> list:
        if self.tool_stream is None:
            return pieces
        routed = []
        for kind, text in pieces:
            routed += [(kind, text)] if kind != "content" else self.tool_events(self.tool_stream.feed(text))
        return routed + (self.tool_events(self.tool_stream.flush()) if end else [])

    def tool_events(self, events: list) -> list:
        routed = []
        for kind, value in events:
            if kind == "call" and (value.error or value.name not in self.tool_names):
                kind, value = "content", f"{TOOL_CALL_OPEN}\n{value.text}\n{TOOL_CALL_CLOSE}"  # as written
            routed.append((kind, value))
        return routed

    def finish_reason(self, sequence) -> str:
        return "tool_calls" if self.calls and sequence.finish_reason == "stop" else sequence.finish_reason

    def message(self) -> dict:
        message = {"role": "assistant", "content": self.parts["content"] or (None if self.calls else "")}
        if self.parts["reasoning"]:
            message["reasoning_content"] = self.parts["reasoning"]
        if self.calls:
            message["tool_calls"] = [call.as_openai() for call in self.calls]
        return message


def chat_choices(replies: list, request: GenerationRequest) -> dict:
    names = [tool["function"]["name"] for tool in request.tools] if request.tools else None
    return {sequence: ChatChoice(names, request.reply_prefix) for sequence in replies}


async def chat_stream(server: Server, queue, replies, request_id: str, model_name: str, prompt_tokens: int,
                      request: GenerationRequest):
    """The SSE body: a role chunk per choice, content / reasoning_content chunks, a finish chunk
    per choice, the usage chunk when asked for, then [DONE]. An engine error ends the stream
    with an error event."""
    created = int(time.time())
    usage_field = {"usage": None} if request.include_usage else {}

    def chunk(index, delta, finish_reason=None, logprobs=None):
        return sse({"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "system_fingerprint": None, **usage_field,
                    "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                 "finish_reason": finish_reason}]})

    choices = chat_choices(replies, request)
    index_of = {sequence: i for i, sequence in enumerate(replies)}
    for i in range(len(replies)):
        yield chunk(i, {"role": "assistant", "content": ""})
    async for batch in output_batches(queue, replies):
        events = []  # sent in one write
        for output in batch:
            if output.finish_reason == "error":
                yield "".join(events) + sse(engine_error(output).body())
                return
            index, choice = index_of[output.sequence], choices[output.sequence]
            calls_before = len(choice.calls)
            pieces, entries = choice.add(output, server.tokens)
            logprobs = {"content": entries, "refusal": None} if entries else None
            for n, (kind, value) in enumerate(pieces):
                if kind == "call":  # the whole call in one delta: the client's accumulator joins nothing
                    delta = {"tool_calls": [{"index": calls_before, **value.as_openai()}]}
                    calls_before += 1
                else:
                    delta = {"reasoning_content" if kind == "reasoning" else "content": value}
                events.append(chunk(index, delta, logprobs=logprobs if n == 0 else None))
            if entries and not pieces:
                events.append(chunk(index, {"content": ""}, logprobs=logprobs))
            if output.finish_reason is not None:
                events.append(chunk(index, {}, choice.finish_reason(output.sequence)))
        if events:
            yield "".join(events)
    if request.include_usage:
        yield sse({"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                   "system_fingerprint": None, "choices": [], "usage": usage(prompt_tokens, replies)})
    yield "data: [DONE]\n\n"


async def chat_whole(server: Server, queue, replies, request_id: str, model_name: str, prompt_tokens: int,
                     request: GenerationRequest) -> JSONResponse:
    choices = chat_choices(replies, request)
    async for output in outputs_until_done(queue, replies):
        if output.finish_reason == "error":
            raise engine_error(output)
        choices[output.sequence].add(output, server.tokens)
    answers = []
    for index, sequence in enumerate(replies):
        choice = choices[sequence]
        logprobs = {"content": choice.logprobs, "refusal": None} if request.params.logprobs else None
        answers.append({"index": index, "message": choice.message(), "logprobs": logprobs,
                        "finish_reason": choice.finish_reason(sequence)})
    return JSONResponse({"id": request_id, "object": "chat.completion", "created": int(time.time()),
                         "model": model_name, "system_fingerprint": None, "choices": answers,
                         "usage": usage(prompt_tokens, replies)})


# ----------------------------------------------------------------------------------------------
# Legacy completions
# ----------------------------------------------------------------------------------------------

class CompletionChoice:
    """One reply of the legacy API: its text, and its logprobs in the legacy shape
    (tokens / token_logprobs / top_logprobs / text_offset), the prompt's first when echoed."""

    def __init__(self, server: Server, prompt, prompt_ids: list[int], echo: bool, params: SamplingParams):
        self.server, self.params = server, params
        self.prompt_ids = prompt_ids if echo else None  # echoed, with logprobs once the prefill has them
        self.text = ""
        if echo:
            self.text = prompt if isinstance(prompt, str) else server.tokenizer.decode(prompt_ids)
        self.logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def append_logprob(self, token_id: int, logprob, top, offset: int) -> None:
        tokens = self.server.tokens
        self.logprobs["tokens"].append(tokens.text(token_id))
        self.logprobs["token_logprobs"].append(logprob)
        self.logprobs["top_logprobs"].append(None if top is None else tokens.top_dict(top))
        self.logprobs["text_offset"].append(offset)

    def add_prompt_logprobs(self, sequence) -> None:
        """Each prompt token's logprob; the first has none (nothing predicts it): null, as OpenAI.
        text_offset: where each token's text starts (a token inside a character: where it starts)."""
        decoder = IncrementalDecoder(self.server.tokenizer)
        offset = 0
        for token_id, (logprob, top) in zip(self.prompt_ids, [(None, None)] + sequence.prompt_logprobs):
            self.append_logprob(token_id, logprob, top, offset)
            offset += len(decoder.add(token_id))

    def add(self, output: StepOutput) -> dict | None:
        """Take one step's output; its logprobs in the legacy shape (for a stream chunk), if asked for."""
        before = len(self.logprobs["tokens"])
        if self.prompt_ids is not None and self.params.logprobs:
            self.add_prompt_logprobs(output.sequence)
        self.prompt_ids = None
        if self.params.logprobs and output.token_id is not None and output.logprob is not None:
            self.append_logprob(output.token_id, output.logprob, output.top_logprobs, len(self.text))
        self.text += output.text
        if not self.params.logprobs or len(self.logprobs["tokens"]) == before:
            return None
        return {key: values[before:] for key, values in self.logprobs.items()}

    def body(self, index: int, sequence) -> dict:
        return {"index": index, "text": self.text, "logprobs": self.logprobs if self.params.logprobs else None,
                "finish_reason": sequence.finish_reason}


async def completion_stream(queue, replies, choices, request_id, model_name, prompt_tokens, request):
    created = int(time.time())
    index_of = {sequence: i for i, sequence in enumerate(replies)}
    async for batch in output_batches(queue, replies):
        events = []  # sent in one write
        for output in batch:
            if output.finish_reason == "error":
                yield "".join(events) + sse(engine_error(output).body())
                return
            logprobs = choices[output.sequence].add(output)
            if output.text or logprobs or output.finish_reason:
                events.append(sse({"id": request_id, "object": "text_completion", "created": created,
                                   "model": model_name,
                                   "choices": [{"index": index_of[output.sequence], "text": output.text,
                                                "logprobs": logprobs, "finish_reason": output.finish_reason}]}))
        if events:
            yield "".join(events)
    if request.include_usage:
        yield sse({"id": request_id, "object": "text_completion", "created": created, "model": model_name,
                   "choices": [], "usage": usage(prompt_tokens, replies)})
    yield "data: [DONE]\n\n"


async def completion_whole(queue, replies, choices, request_id, model_name, prompt_tokens) -> JSONResponse:
    async for output in outputs_until_done(queue, replies):
        if output.finish_reason == "error":
            raise engine_error(output)
        choices[output.sequence].add(output)
    return JSONResponse({
        "id": request_id, "object": "text_completion", "created": int(time.time()), "model": model_name,
        "system_fingerprint": None,
        "choices": [choices[s].body(i, s) for i, s in enumerate(replies)],
        "usage": usage(prompt_tokens, replies)})


# ----------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------

def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="MiniMind OpenAI-compatible API")
    settings = server.settings
    model_name = settings.model_name
    started = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return error_response(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                       code=str(e.status_code)))

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        log.exception("unexpected error")
        return error_response(APIError(500, f"internal server error: {e}", kind="server_error"))

    def check_api_key(request: Request) -> None:
        if not settings.api_key:
            return
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer "):
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        if not hmac.compare_digest(header[len("Bearer "):].encode(), settings.api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    @app.get("/health")
    async def health():
        engine = server.engine_loop.engine
        return {"status": "ok", "running": len(engine.rows), "waiting": len(engine.waiting)}

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_api_key(request)
        return {"object": "list",
                "data": [{"id": model_name, "object": "model", "created": started, "owned_by": "minimind",
                          "max_model_len": settings.context_length}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_api_key(request)
        req = parse_chat_request(parse_json_body(await request.body()), settings)
        prompt_ids = server.chat_prompt_ids(req)
        queue, replies = asyncio.Queue(), []
        server.start(prompt_ids, req, queue, replies)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            return event_stream(chat_stream(server, queue, replies, request_id, model_name, len(prompt_ids), req))
        return await until_done_or_disconnect(
            request, replies, chat_whole(server, queue, replies, request_id, model_name, len(prompt_ids), req))

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_api_key(request)
        req = parse_completion_request(parse_json_body(await request.body()), settings)
        prompts_ids = [server.completion_prompt_ids(p, req.echo) for p in req.prompts]
        queue, replies, choices = asyncio.Queue(), [], {}
        try:
            for prompt, ids in zip(req.prompts, prompts_ids):
                started_before = len(replies)
                server.start(ids, req, queue, replies)
                for sequence in replies[started_before:]:
                    choices[sequence] = CompletionChoice(server, prompt, ids, req.echo, sequence.params)
        except APIError:
            for sequence in replies:
                sequence.cancel()
            raise
        prompt_tokens = sum(len(ids) for ids in prompts_ids)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        if req.stream:
            return event_stream(completion_stream(queue, replies, choices, request_id, model_name, prompt_tokens,
                                                  req))
        return await until_done_or_disconnect(
            request, replies, completion_whole(queue, replies, choices, request_id, model_name, prompt_tokens))

    return app


def event_stream(body) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def until_done_or_disconnect(request: Request, replies: list, whole):
    """Await the whole reply; if the client disconnects first, cancel its generations."""
    task = asyncio.ensure_future(whole)
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=0.2)
        if not done and await request.is_disconnected():
            task.cancel()  # closes outputs_until_done, which cancels the replies
            for sequence in replies:
                sequence.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            return JSONResponse({}, status_code=499)
    return task.result()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="0.0.0.0 exposes the server to the network")
    server.add_argument("--port", type=int, default=8998)
    server.add_argument("--api_key", default=os.environ.get("MINIMIND_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $MINIMIND_API_KEY, else no auth)")
    server.add_argument("--model_name", default="minimind", help="the model id /v1/models reports")
    server.add_argument("--context_length", type=int, default=DEFAULT_CONTEXT_LENGTH,
                        help="prompt + reply tokens allowed per request (default: 512, the trainers' --max_seq_len; "
                             "raise it for models trained longer, up to the model's max_position_embeddings)")
    server.add_argument("--max_tokens", type=int, default=1024,
                        help="reply length when a request gives none (cut to what the context leaves)")
    server.add_argument("--temperature", type=float, default=0.85, help="when a request gives none")
    server.add_argument("--top_p", type=float, default=0.85, help="when a request gives none")
    server.add_argument("--max_batch_size", type=int, default=16, help="replies decoded together")
    server.add_argument("--freeze_weights", type=int, default=0, choices=(0, 1),
                        help="CPU: compile the decode step with the weights frozen and pre-packed (Engine "
                             "freeze_weights; batches ~1.5x faster; the first requests wait for compiling)")
    server.add_argument("--max_queue", type=int, default=64,
                        help="replies that may wait for a free slot; beyond that requests get 429")
    return parser.parse_args(argv)


def build_server(model, tokenizer, args, engine_thread: bool = True) -> Server:
    """The server's state; with engine_thread=False the caller runs server.engine_loop.run()."""
    model_context = model.config.max_position_embeddings
    if not 1 < args.context_length <= model_context:
        raise SystemExit(f"error: --context_length {args.context_length} must be in 2..{model_context} "
                         f"(the model's max_position_embeddings)")
    args.max_tokens = min(args.max_tokens, args.context_length)
    args.vocab_size = model.config.vocab_size
    engine = Engine(model, tokenizer, max_batch_size=args.max_batch_size, max_seq_len=args.context_length,
                    freeze_weights=bool(args.freeze_weights))
    return Server(EngineLoop(engine, max_queue=args.max_queue, start_thread=engine_thread), tokenizer, args)


def serve(http: uvicorn.Server, engine_loop: EngineLoop) -> int:
    """Run the HTTP server on a second thread and the engine on this one, the thread that loaded
    the model, until Ctrl-C or SIGTERM (why this way round: EngineLoop's docstring; the HTTP
    thread does no tensor work). Requests still running then end as cancelled."""
    http_thread = threading.Thread(target=http.run, name="http", daemon=True)
    http_thread.start()
    while not http.started:
        if not http_thread.is_alive():  # it could not start (e.g. the port is taken); uvicorn said why
            return 1
        time.sleep(0.05)

    def stop(signum, frame):
        # A signal handler runs between two bytecodes of the engine loop: raising there
        # (KeyboardInterrupt) could leave a step half done, so it only asks the loop to stop.
        signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C / SIGTERM ends the process at once
        engine_loop.stop_soon()

    for signum in (signal.SIGINT, signal.SIGTERM):  # (also when the shell started us ignoring SIGINT)
        signal.signal(signum, stop)
    try:
        engine_loop.run()
    finally:
        engine_loop.close()
        http.should_exit = True
        http_thread.join(timeout=30)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    model, tokenizer = load_model_or_exit(args)
    server = build_server(model, tokenizer, args, engine_thread=False)
    auth = "Bearer token required" if args.api_key else "no auth"
    print(f"serving {args.model_name} on http://{args.host}:{args.port}/v1 ({auth}, context {args.context_length}, "
          f"batch {args.max_batch_size})", flush=True)
    http = uvicorn.Server(uvicorn.Config(create_app(server), host=args.host, port=args.port, log_level="info"))
    return serve(http, server.engine_loop)


if __name__ == "__main__":
    sys.exit(main())
