"""An OpenAI-compatible HTTP API for a trained MiniMind (FastAPI + uvicorn).

    python scripts/serve_openai_api.py --model_mode 1            # http://127.0.0.1:8998/v1
    python scripts/serve_openai_api.py --api_key sk-local-secret  # require "Authorization: Bearer ..."

Any OpenAI client works against it (the `openai` SDK, Open-WebUI, FastGPT, Dify, curl):
    POST /v1/chat/completions   model, messages, temperature, top_p, max_tokens, stream, stop, seed
    GET  /v1/models

How it stays responsive: one worker thread owns the model and the tokenizer and runs one
generation at a time (requests queue up in arrival order, so replies never mix); the event loop
only moves text from that thread to the clients. A client that goes away sets a cancel flag that
the worker checks before every token.
"""
import argparse
import asyncio
import hmac
import json
import logging
import os
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.inference import (Generation, ModelLoadError, ReasoningSplitter, add_model_args, build_prompt_ids,
                             load_model)

log = logging.getLogger("uvicorn.error")  # uvicorn prints this logger's lines next to its own
ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 4  # as OpenAI


# ----------------------------------------------------------------------------------------------
# Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}
# ----------------------------------------------------------------------------------------------

class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_response(status: int, message: str, param=None, code=None, kind="invalid_request_error") -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


# ----------------------------------------------------------------------------------------------
# Reading and checking a request
# ----------------------------------------------------------------------------------------------

@dataclass
class ChatRequest:
    messages: list[dict]
    max_tokens: int
    temperature: float
    top_p: float
    repetition_penalty: float
    stream: bool
    include_usage: bool
    stop: list[str]
    seed: int | None


def parse_json_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from e
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(body).__name__}", code="invalid_json")
    return body


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


def message_text(content, index: int) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise APIError(400, f"messages[{index}].content must be a string or a list of text parts "
                        f"(this model reads text only)", param=f"messages[{index}].content", code="invalid_type")


def parse_messages(messages) -> list[dict]:
    """Checked messages: an optional system message first, then user and assistant taking turns,
    starting and ending with the user (the shape of MiniMind's chat training data)."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects",
                       param="messages", code="invalid_value")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise APIError(400, f"messages[{i}] must be an object with 'role' and 'content'", param=f"messages[{i}]")
        role = message.get("role")
        if role not in ROLES:
            raise APIError(400, f"messages[{i}].role is {json.dumps(role)}; it must be one of {', '.join(ROLES)}",
                           param=f"messages[{i}].role", code="invalid_value")
        checked.append({"role": role, "content": message_text(message.get("content"), i)})
    dialogue_start = 1 if checked[0]["role"] == "system" else 0
    for i, message in enumerate(checked[dialogue_start:], start=dialogue_start):
        expected = "user" if (i - dialogue_start) % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise APIError(400, f"messages[{i}] is from {message['role']!r} but {expected!r} was expected: after an "
                                f"optional first system message, user and assistant messages must alternate, "
                                f"starting with user", param=f"messages[{i}].role", code="invalid_message_order")
    if checked[-1]["role"] != "user":
        raise APIError(400, "the last message must be from the user (there is no question to answer)",
                       param="messages", code="invalid_message_order")
    return checked


def parse_stop(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them",
                       param="stop", code="invalid_value")
    return stops


def parse_chat_request(body: dict, settings) -> ChatRequest:
    if not isinstance(body.get("model"), str):
        raise APIError(400, "'model' is required (a string; GET /v1/models lists this server's model)",
                       param="model", code="missing_required_parameter")
    if body.get("n") not in (None, 1):
        raise APIError(400, "only n=1 is supported", param="n", code="invalid_value")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", param="stream", code="invalid_type")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options", code="invalid_type")
    # max_completion_tokens is the newer name of max_tokens
    token_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return ChatRequest(
        messages=parse_messages(body.get("messages")),
        max_tokens=number(body, token_field, settings.max_tokens, 1, settings.context_length, integer=True),
        temperature=number(body, "temperature", settings.temperature, 0.0, 2.0),
        top_p=number(body, "top_p", settings.top_p, 0.0, 1.0),
        repetition_penalty=number(body, "repetition_penalty", 1.0, 0.01, 10.0),
        stream=stream,
        include_usage=bool(stream_options.get("include_usage")),
        stop=parse_stop(body.get("stop")),
        seed=number(body, "seed", None, -2**63, 2**63 - 1, integer=True),
    )


# ----------------------------------------------------------------------------------------------
# The model worker: one thread, one generation at a time
# ----------------------------------------------------------------------------------------------

class ModelWorker:
    """Owns the model and the tokenizer. Every use of either runs on its single thread, which
    serialises generations (no interleaving) and keeps the tokenizer out of concurrent use."""

    def __init__(self, model, tokenizer, raw_prompts: bool, context_length: int):
        self.model, self.tokenizer = model, tokenizer
        self.raw_prompts = raw_prompts  # the pretrain model continues text instead of chatting
        self.context_length = context_length
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minimind-generate")

    async def prompt_ids(self, messages: list[dict]) -> list[int]:
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(self.executor, build_prompt_ids, self.tokenizer, messages, self.raw_prompts)
        if len(ids) >= self.context_length:
            raise APIError(400, f"the prompt is {len(ids)} tokens long; this model's context is {self.context_length} "
                                f"tokens. Send fewer or shorter messages.", param="messages",
                           code="context_length_exceeded")
        return ids

    async def stream(self, request_id: str, prompt_ids: list[int], req: ChatRequest, cancel: threading.Event):
        """Yield text deltas as the worker produces them, then the finished Generation.
        Setting `cancel` (or leaving the loop early) stops the generation before its next token."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def put(item):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (server shutting down)
                cancel.set()

        def produce():
            try:
                started = time.perf_counter()
                generation = Generation(
                    self.model, self.tokenizer, prompt_ids,
                    max_new_tokens=min(req.max_tokens, self.context_length - len(prompt_ids)),
                    temperature=req.temperature, top_p=req.top_p, repetition_penalty=req.repetition_penalty,
                    seed=req.seed, stop=req.stop, cancel=cancel)
                for delta in generation:
                    put(delta)
                log_generation(request_id, generation, time.perf_counter() - started)
                put(generation)
            except Exception as e:  # handed to the request, which answers 500
                put(e)

        self.executor.submit(produce)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if isinstance(item, Generation):
                    return
        finally:
            cancel.set()  # the client left (or we are done): stop before the next token


def log_generation(request_id: str, generation: Generation, seconds: float) -> None:
    if generation.finish_reason == "cancelled":
        log.info("%s: client disconnected, generation stopped after %d tokens", request_id,
                 generation.completion_tokens)
        return
    speed = generation.completion_tokens / seconds if seconds > 0 else 0.0
    log.info("%s: %d prompt + %d completion tokens, finish_reason=%s, %.2f s (%.1f tokens/s)", request_id,
             generation.prompt_tokens, generation.completion_tokens, generation.finish_reason, seconds, speed)


# ----------------------------------------------------------------------------------------------
# Responses in OpenAI's shapes
# ----------------------------------------------------------------------------------------------

def usage_of(generation: Generation) -> dict:
    return {"prompt_tokens": generation.prompt_tokens, "completion_tokens": generation.completion_tokens,
            "total_tokens": generation.prompt_tokens + generation.completion_tokens}


def chunk(request_id: str, created: int, model_name: str, delta: dict, finish_reason=None, include_usage=False) -> str:
    """One server-sent event of a streamed reply: a chat.completion.chunk object."""
    body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if include_usage:
        body["usage"] = None  # OpenAI sends usage null on every chunk but the extra last one
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def stream_events(worker: ModelWorker, request_id: str, model_name: str, prompt_ids: list[int],
                        req: ChatRequest):
    """The SSE body: a role chunk, content / reasoning_content chunks, a finish chunk, [DONE]."""
    created = int(time.time())
    yield chunk(request_id, created, model_name, {"role": "assistant", "content": ""}, include_usage=req.include_usage)
    splitter = ReasoningSplitter()
    # a client that hangs up cancels this generator (Starlette watches the connection), which
    # runs the stream's `finally` and so sets the cancel flag
    async for item in worker.stream(request_id, prompt_ids, req, threading.Event()):
        if isinstance(item, Generation):
            pieces = splitter.flush()
        else:
            pieces = splitter.feed(item)
        for kind, text in pieces:
            field = "reasoning_content" if kind == "reasoning" else "content"
            yield chunk(request_id, created, model_name, {field: text}, include_usage=req.include_usage)
        if isinstance(item, Generation):
            yield chunk(request_id, created, model_name, {}, item.finish_reason, include_usage=req.include_usage)
            if req.include_usage:
                final = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                         "system_fingerprint": None, "choices": [], "usage": usage_of(item)}
                yield f"data: {json.dumps(final)}\n\n"
    yield "data: [DONE]\n\n"


async def complete(worker: ModelWorker, request: Request, request_id: str, model_name: str,
                   prompt_ids: list[int], req: ChatRequest) -> JSONResponse:
    """The whole reply as one chat.completion object (generation stops if the client leaves)."""
    splitter = ReasoningSplitter()
    parts = {"reasoning": "", "content": ""}
    generation = None
    cancel = threading.Event()
    watcher = asyncio.create_task(cancel_on_disconnect(request, cancel))
    try:
        async for item in worker.stream(request_id, prompt_ids, req, cancel):
            pieces = splitter.flush() if isinstance(item, Generation) else splitter.feed(item)
            for kind, text in pieces:
                parts[kind] += text
            if isinstance(item, Generation):
                generation = item
    finally:
        watcher.cancel()
    message = {"role": "assistant", "content": parts["content"]}
    if parts["reasoning"]:
        message["reasoning_content"] = parts["reasoning"]
    return JSONResponse({
        "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model_name,
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": generation.finish_reason}],
        "usage": usage_of(generation),
    })


async def cancel_on_disconnect(request: Request, cancel: threading.Event) -> None:
    """Set `cancel` once the client of a non-streamed request has disconnected."""
    while not cancel.is_set():
        if await request.is_disconnected():
            cancel.set()
            return
        await asyncio.sleep(0.2)


# ----------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------

def create_app(worker: ModelWorker, settings) -> FastAPI:
    app = FastAPI(title="MiniMind OpenAI-compatible API")
    model_name = settings.model_name
    started = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code, e.kind)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return error_response(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=str(e.status_code))

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        log.exception("unexpected error")
        return error_response(500, f"internal server error: {e}", kind="server_error")

    def check_api_key(request: Request) -> None:
        if not settings.api_key:
            return
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer "):
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        if not hmac.compare_digest(header[len("Bearer "):].encode(), settings.api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_api_key(request)
        return {"object": "list",
                "data": [{"id": model_name, "object": "model", "created": started, "owned_by": "minimind"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_api_key(request)
        req = parse_chat_request(parse_json_body(await request.body()), settings)
        prompt_ids = await worker.prompt_ids(req.messages)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            return StreamingResponse(stream_events(worker, request_id, model_name, prompt_ids, req),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await complete(worker, request, request_id, model_name, prompt_ids, req)

    return app


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="0.0.0.0 exposes the server to the network")
    server.add_argument("--port", type=int, default=8998)
    server.add_argument("--api_key", default=os.environ.get("MINIMIND_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $MINIMIND_API_KEY, else no auth)")
    server.add_argument("--model_name", default="minimind", help="the model id /v1/models reports")
    server.add_argument("--context_length", type=int, default=None,
                        help="prompt + reply tokens allowed (default: the model's max_position_embeddings)")
    server.add_argument("--max_tokens", type=int, default=1024, help="reply length when a request gives none")
    server.add_argument("--temperature", type=float, default=0.85, help="when a request gives none")
    server.add_argument("--top_p", type=float, default=0.85, help="when a request gives none")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        model, tokenizer = load_model(args)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model_context = model.config.max_position_embeddings
    args.context_length = min(args.context_length or model_context, model_context)
    args.max_tokens = min(args.max_tokens, args.context_length)
    worker = ModelWorker(model, tokenizer, raw_prompts=args.model_mode == 0, context_length=args.context_length)
    auth = "Bearer token required" if args.api_key else "no auth"
    print(f"serving {args.model_name} on http://{args.host}:{args.port}/v1 ({auth}, context {args.context_length})",
          flush=True)
    uvicorn.run(create_app(worker, args), host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
