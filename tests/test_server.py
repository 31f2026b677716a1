"""scripts/serve_openai_api.py in a real subprocess on a free loopback port, driven by the
official `openai` client (and raw httpx where the client would hide the wire format), plus
scripts/chat_openai_api.py against it.

The server runs a tiny random MiniMind (gibberish text, deterministic at temperature 0) with
--api_key, so every request here carries the key except the ones checking that it is needed,
and with --context_length 2048 so a too-long prompt is cheap to send."""
import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers.convert_slow_tokenizer import bytes_to_unicode

from model.checkpoint import save_weights
from model.engine import Engine, SamplingParams
from model.inference import build_prompt_ids, generate_text, load_model, model_args, split_reasoning
from tiny_models import tiny_model

REPO_ROOT = Path(__file__).resolve().parent.parent
API_KEY = "sk-test-key"
CONTEXT = 2048
pytestmark = pytest.mark.slow  # a server subprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(f"server did not answer within {timeout} s:\n{log_path.read_text()}")


def server_command(out_dir: Path, port: int, *flags: str) -> list[str]:
    """The command of a tiny-model server (hidden 64, 2 layers, CPU) on the given port."""
    return [sys.executable, str(REPO_ROOT / "scripts" / "serve_openai_api.py"), "--out_dir", str(out_dir),
            "--hidden_size", "64", "--num_hidden_layers", "2", "--device", "cpu", "--port", str(port), *flags]


@contextlib.contextmanager
def running_server(out_dir: Path, log_path: Path, *flags: str):
    """A tiny-model server (hidden 64, 2 layers, CPU) on a free loopback port with the extra
    flags; yields its base URL and stops it afterwards."""
    port = free_port()
    with open(log_path, "w") as log:
        process = subprocess.Popen(server_command(out_dir, port, *flags), stdout=log, stderr=subprocess.STDOUT,
                                   cwd=out_dir)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until_serving(base_url + "/models", process, log_path)
        yield base_url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("out")
    save_weights(tiny_model(), str(folder / "full_sft_64.pth"))
    return folder


@pytest.fixture(scope="module")
def server(out_dir, tmp_path_factory):
    """(base_url, log file) of a running server; stopped after the module."""
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with running_server(out_dir, log_path, "--api_key", API_KEY, "--context_length", str(CONTEXT)) as base_url:
        yield base_url, log_path


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local(out_dir):
    """The same model loaded in the test process, to compute what the server should say."""
    return load_model(model_args(out_dir=str(out_dir), hidden_size=64, num_hidden_layers=2, device="cpu"))


def ask(client, content, **options):
    options = {"temperature": 0, "max_tokens": 24, **options}
    return client.chat.completions.create(model="minimind", messages=[{"role": "user", "content": content}],
                                          **options)


def ask_streaming(client, content, **options):
    options = {"temperature": 0, "max_tokens": 24, **options}
    chunks = list(client.chat.completions.create(
        model="minimind", messages=[{"role": "user", "content": content}], stream=True, **options))
    return chunks, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def post(server, body, key=API_KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server[0] + "/chat/completions", content=data, timeout=60,
                      headers={"Content-Type": "application/json", **headers})


# ----------------------------------------------------------------------------------------------

def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["minimind"]
    assert models.data[0].object == "model"


def test_non_stream_reply_with_usage_is_the_shared_routine_reply(client, local):
    model, tokenizer = local
    question = "为什么天空是蓝色的？"
    reply = ask(client, question, max_tokens=30)
    prompt = build_prompt_ids(tokenizer, [{"role": "user", "content": question}])
    expected = split_reasoning(generate_text(model, tokenizer, prompt, max_new_tokens=30))[1]
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected and expected
    assert reply.usage.prompt_tokens == len(prompt)
    assert 1 <= reply.usage.completion_tokens <= 30
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_stream_concatenation_equals_the_non_stream_reply(client, server):
    whole = ask(client, "tell me a story")
    chunks, streamed = ask_streaming(client, "tell me a story")
    assert streamed == whole.choices[0].message.content
    assert len(chunks) > 3  # really streamed, not one block
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    # the wire format the client hides: server-sent events ending with data: [DONE]
    body = {"model": "minimind", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 4}
    with httpx.stream("POST", server[0] + "/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_max_tokens_ends_with_finish_reason_length(client):
    reply = ask(client, "hello", max_tokens=3)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3
    chunks, _ = ask_streaming(client, "hello", max_tokens=3, stream_options={"include_usage": True})
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3


def test_stop_string_and_seed(client):
    text = ask(client, "hello", max_tokens=20).choices[0].message.content
    stop = text[6:9]
    cut = ask(client, "hello", max_tokens=20, stop=[stop])
    assert cut.choices[0].message.content == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    sampled = [ask(client, "hello", temperature=1.0, top_p=0.95, seed=11).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


BAD_REQUESTS = {
    "malformed JSON": ('{"model": "minimind", "messages": [', 400, None),
    "body not an object": ("[1, 2]", 400, None),
    "empty messages": ({"messages": []}, 400, "messages"),
    "assistant first": ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages[0].role"),
    "two user turns in a row": ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
                                400, "messages[1].role"),
    "system not first": ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
                         400, "messages[1].role"),
    "ends with assistant": ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                            400, "messages"),
    "unknown role": ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    "negative max_tokens": ({"max_tokens": -5}, 400, "max_tokens"),
    "huge max_tokens": ({"max_tokens": 10**9}, 400, "max_tokens"),
    "prompt longer than the context": ({"messages": [{"role": "user", "content": "word " * 3000}]}, 400, "messages"),
    "temperature out of range": ({"temperature": 7}, 400, "temperature"),
    "missing model": ({"model": None}, 400, "model"),
    "logit_bias (not implemented)": ({"logit_bias": {"42": 5}}, 400, "logit_bias"),
    "JSON mode (not implemented)": ({"response_format": {"type": "json_object"}}, 400, "response_format"),
    "a tool without a function name": ({"tools": [{"type": "function", "function": {}}]}, 400, "tools[0]"),
    "tool_choice naming no offered tool": ({"tools": [{"type": "function", "function": {"name": "f"}}],
                                           "tool_choice": {"type": "function", "function": {"name": "g"}}},
                                          400, "tool_choice"),
    "a tool result without its call": ({"messages": [{"role": "user", "content": "a"},
                                                     {"role": "tool", "tool_call_id": "x", "content": "1"}]},
                                       400, "messages[1].role"),
    "unknown field": ({"top_k": 5}, 400, "top_k"),
    "n above the batch size": ({"n": 99}, 400, "n"),
    "top_logprobs without logprobs": ({"top_logprobs": 3}, 400, "top_logprobs"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_a_4xx_error_object_and_the_server_keeps_serving(server, client, case):
    body, status, param = BAD_REQUESTS[case]
    if isinstance(body, dict):
        body = {"model": "minimind", "messages": [{"role": "user", "content": "hi"}], **body}
        body = {k: v for k, v in body.items() if v is not None}
    response = post(server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert ask(client, "still there?", max_tokens=2).choices[0].finish_reason == "length"


def test_api_key_is_required(server):
    for key in (None, "sk-wrong"):
        response = post(server, {"model": "minimind", "messages": [{"role": "user", "content": "hi"}]}, key=key)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server[0] + "/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server[0], api_key="sk-wrong", max_retries=0).models.list()


def test_16_concurrent_streams_get_their_own_replies(client):
    questions = [f"question number {i}: {'why ' * i}?" for i in range(16)]
    expected = [ask(client, q).choices[0].message.content for q in questions]  # one at a time
    assert len(set(expected)) > 8  # distinct replies, so mixing them up would show
    with ThreadPoolExecutor(16) as pool:
        streamed = list(pool.map(lambda q: ask_streaming(client, q)[1], questions))
    assert streamed == expected


def test_a_client_that_disconnects_stops_its_generation(server, client):
    _, log_path = server
    body = {"model": "minimind", "messages": [{"role": "user", "content": "go on forever"}], "stream": True,
            "max_tokens": CONTEXT - 30, "temperature": 0}
    with httpx.stream("POST", server[0] + "/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # generation has started; now hang up
    wait_for_log_count(log_path, "client disconnected, generation stopped", 1)
    # a non-streamed request whose client gives up waiting
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server[0] + "/chat/completions", json={**body, "stream": False}, timeout=0.5,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    wait_for_log_count(log_path, "client disconnected, generation stopped", 2)
    assert ask(client, "and now?", max_tokens=2).usage.completion_tokens == 2


def wait_for_log_count(log_path: Path, line: str, count: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while log_path.read_text().count(line) < count:
        assert time.monotonic() < deadline, log_path.read_text()[-2000:]
        time.sleep(0.1)


def test_terminal_chat_client_keeps_the_history(server, client):
    first, second = "你好", "你是谁？"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "chat_openai_api.py"), "--base_url", server[0],
         "--api_key", API_KEY, "--temperature", "0", "--max_tokens", "16"],
        input=f"{first}\n{second}\n", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    answer1 = ask(client, first, max_tokens=16).choices[0].message.content
    messages = [{"role": "user", "content": first}, {"role": "assistant", "content": answer1},
                {"role": "user", "content": second}]
    answer2 = client.chat.completions.create(model="minimind", messages=messages, temperature=0,
                                             max_tokens=16).choices[0].message.content
    assert result.stdout == f"{answer1}\n{answer2}\n"
    once = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "chat_openai_api.py"), "--base_url", server[0],
         "--api_key", "sk-wrong", "--once", "hi"], capture_output=True, text=True, timeout=120)
    assert once.returncode == 1 and "401" in once.stderr


# ----------------------------------------------------------------------------------------------
# Logprobs, n, penalties, the legacy completions API, health, the queue bound
# ----------------------------------------------------------------------------------------------

def token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log P(ids[i] | ids[:i]) for i >= 1 from one full forward pass."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return logprobs[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_chat_logprobs_equal_the_model_s(client, local):
    model, tokenizer = local
    question = "why is the sky blue?"
    reply = ask(client, question, max_tokens=12, temperature=0.9, seed=5, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens - (reply.choices[0].finish_reason == "stop")
    prompt = build_prompt_ids(tokenizer, [{"role": "user", "content": question}])
    # the sampled ids from each entry's bytes: re-encoding the joined text can merge or split
    # sampled tokens differently (a sampled sequence need not be BPE's own encoding of its text)
    character_of_byte = bytes_to_unicode()
    reply_ids = tokenizer.convert_tokens_to_ids(["".join(character_of_byte[b] for b in e.bytes) for e in content])
    expected = token_logprobs(model, prompt + reply_ids)[len(prompt) - 1:]
    assert torch.allclose(torch.tensor([e.logprob for e in content]), expected, atol=1e-4)
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in content)
    assert all(bytes(e.bytes).decode() == e.token for e in content if not e.token.startswith("bytes:"))
    chunks, _ = ask_streaming(client, question, max_tokens=12, temperature=0.9, seed=5, logprobs=True)
    streamed = [e.logprob for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == [e.logprob for e in content]


def test_n_replies_stream_and_not(client):
    reply = ask(client, "tell me a joke", n=3, temperature=1.0, seed=42, max_tokens=10)
    texts = [c.message.content for c in reply.choices]
    assert [c.index for c in reply.choices] == [0, 1, 2] and len(set(texts)) > 1
    assert 3 <= reply.usage.completion_tokens <= 30  # summed over the three replies
    chunks, _ = ask_streaming(client, "tell me a joke", n=3, temperature=1.0, seed=42, max_tokens=10)
    streamed = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
                for i in range(3)]
    assert streamed == texts
    # the first reply of n has the seed's own reply; the others differ
    single = ask(client, "tell me a joke", temperature=1.0, seed=42, max_tokens=10).choices[0].message.content
    assert single == texts[0]


def test_presence_and_frequency_penalties_reach_the_engine(client, local):
    model, tokenizer = local
    options = dict(temperature=1.0, top_p=1.0, seed=3, max_tokens=40)
    penalties = dict(frequency_penalty=-2.0, presence_penalty=-2.0)  # negative: repeat yourself
    penalized = ask(client, "go on", **options, **penalties).choices[0].message.content
    prompt = build_prompt_ids(tokenizer, [{"role": "user", "content": "go on"}])
    engine = Engine(model, tokenizer, max_batch_size=1, max_seq_len=CONTEXT)
    expected = engine.generate([prompt], SamplingParams(max_tokens=40, temperature=1.0, seed=3, **penalties))[0]
    assert penalized == split_reasoning(expected.text)[1]
    assert penalized != ask(client, "go on", **options).choices[0].message.content


def test_completions_echo_logprobs_equal_the_model_s_token_loglikelihoods(server, client, local):
    model, tokenizer = local
    text = "The capital of France is Paris. 中国的首都是北京。"
    reply = client.completions.create(model="minimind", prompt=text, max_tokens=0, echo=True, logprobs=2)
    choice = reply.choices[0]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert choice.text == text and len(choice.logprobs.tokens) == len(ids) == reply.usage.prompt_tokens
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    expected = token_logprobs(model, ids)
    assert torch.allclose(torch.tensor(choice.logprobs.token_logprobs[1:]), expected, atol=1e-4)
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs[1:])
    assert choice.logprobs.text_offset[0] == 0 and choice.logprobs.text_offset == sorted(choice.logprobs.text_offset)
    # token ids in, as lm-evaluation-harness sends them; several prompts in one request
    body = {"model": "minimind", "prompt": [ids, ids[:5]], "max_tokens": 1, "echo": True, "logprobs": 1,
            "temperature": 0}
    response = httpx.post(server[0] + "/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 200, response.text
    first, second = response.json()["choices"]
    assert len(first["logprobs"]["token_logprobs"]) == len(ids) + 1
    assert torch.allclose(torch.tensor(first["logprobs"]["token_logprobs"][1:len(ids)]), expected, atol=1e-4)
    assert second["logprobs"]["token_logprobs"][1:5] == pytest.approx(expected[:4].tolist(), abs=1e-4)


def test_completions_continue_a_prompt(client, local):
    model, tokenizer = local
    ids = tokenizer("长城是中国古代", add_special_tokens=False)["input_ids"]
    reply = client.completions.create(model="minimind", prompt="长城是中国古代", max_tokens=8, temperature=0)
    expected = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(ids):]
    assert reply.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    assert reply.object == "text_completion" and reply.usage.completion_tokens == len(expected)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="minimind", prompt="长城是中国古代", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == reply.choices[0].text


def test_health(server):
    response = httpx.get(server[0].removesuffix("/v1") + "/health", timeout=10)
    assert response.status_code == 200 and response.json()["status"] == "ok"


@pytest.fixture(scope="module")
def busy_server(out_dir, tmp_path_factory):
    """One slot and a queue of one, to fill it on purpose."""
    log_path = tmp_path_factory.mktemp("busy") / "server.log"
    with running_server(out_dir, log_path, "--context_length", str(CONTEXT), "--max_batch_size", "1",
                        "--max_queue", "1") as base_url:
        yield base_url


def test_a_full_queue_answers_429_and_bad_requests_are_answered_at_once(busy_server):
    body = {"model": "minimind", "messages": [{"role": "user", "content": "go on forever"}], "stream": True,
            "max_tokens": CONTEXT - 30, "temperature": 0}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", busy_server + "/chat/completions", json=body) as running:
            lines = running.iter_lines()  # (kept: a dropped iterator would close the response)
            next(lines)  # it holds the only slot
            with http.stream("POST", busy_server + "/chat/completions", json=body) as waiting:
                assert waiting.status_code == 200  # queued
                third = httpx.post(busy_server + "/chat/completions", json=body, timeout=10)
                assert third.status_code == 429
                assert third.json()["error"]["code"] == "rate_limit_exceeded"
                with pytest.raises(openai.RateLimitError):
                    openai.OpenAI(base_url=busy_server, api_key="none", max_retries=0).chat.completions.create(
                        model="minimind", messages=[{"role": "user", "content": "hi"}])
                started = time.monotonic()
                bad = httpx.post(busy_server + "/chat/completions", json={**body, "temperature": 9}, timeout=10)
                assert bad.status_code == 400 and time.monotonic() - started < 5
    # both clients left: their replies are cancelled, and the slot is free again within seconds (the
    # server notices a closed connection on its next write, the engine drops the reply on its next
    # step), so the client may meet a 429 first: it retries those itself, backing off 0.5-8 s
    reply = openai.OpenAI(base_url=busy_server, api_key="none", max_retries=4, timeout=60).chat.completions.create(
        model="minimind", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert reply.usage.completion_tokens == 2


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_ends_the_streams_in_flight_and_the_server(out_dir, tmp_path, stop_signal):
    """The engine runs on the server's main thread, uvicorn on another: a stop signal must end
    both, the replies still running ending as cancelled, not leave a process behind."""
    port = free_port()
    with open(tmp_path / "server.log", "w") as log:
        process = subprocess.Popen(server_command(out_dir, port, "--context_length", str(CONTEXT)),
                                   stdout=log, stderr=subprocess.STDOUT, cwd=out_dir)
    try:
        base_url = f"http://127.0.0.1:{port}/v1"
        wait_until_serving(base_url + "/models", process, tmp_path / "server.log")
        body = {"model": "minimind", "messages": [{"role": "user", "content": "go on forever"}], "stream": True,
                "max_tokens": CONTEXT - 30, "temperature": 0}
        with httpx.stream("POST", base_url + "/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            process.send_signal(stop_signal)
            rest = list(lines)  # the stream ends instead of hanging
        assert process.wait(timeout=30) == 0
        finish = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in rest
                  if line.startswith("data: {") and json.loads(line[6:])["choices"]]
        assert finish[-1] == "cancelled" and len(rest) < CONTEXT - 30
    finally:
        process.kill()


def test_a_port_in_use_is_an_error_exit_not_a_server_without_http(out_dir, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = subprocess.run(server_command(out_dir, taken.getsockname()[1]), capture_output=True, text=True,
                                cwd=out_dir, timeout=120)
    assert result.returncode == 1
    assert "address already in use" in (result.stdout + result.stderr).lower()


def test_an_engine_error_ends_a_stream_with_an_error_event(local):
    """The app in this process, its engine made to fail at the second decode step (the only way
    to make a healthy model fail on purpose); the stream must end with an error event."""
    import asyncio

    from scripts.serve_openai_api import build_server, create_app, parse_args

    model, tokenizer = local
    settings = parse_args(["--context_length", "256"])
    server = build_server(model, tokenizer, settings)
    engine = server.engine_loop.engine
    real_decode, calls = engine.decode, []

    def failing_decode(sequences):
        calls.append(len(sequences))
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return real_decode(sequences)

    engine.decode = failing_decode
    body = {"model": "minimind", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 20}

    async def stream():
        transport = httpx.ASGITransport(app=create_app(server))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                return [line async for line in response.aiter_lines() if line]

    events = asyncio.run(stream())
    error = json.loads(events[-1].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and "out of memory (simulated)" in error["message"]
    assert '"content": ""' in events[0] and len(events) >= 2
    # the engine goes on serving
    engine.decode = real_decode
    assert asyncio.run(stream())[-1] == "data: [DONE]"


def test_a_step_s_outputs_reach_the_event_loop_in_one_wake_up_and_one_batch():
    """The engine thread's outputs of one step (several requests' rows) wake the event loop once;
    what has arrived when a stream looks is taken as one batch (one write), in order."""
    import asyncio
    import threading

    from model.engine import Sequence, StepOutput
    from scripts.serve_openai_api import OutputRelay, output_batches

    first, second = Sequence([1], SamplingParams()), Sequence([1, 2], SamplingParams())
    outputs = [StepOutput(first, 5, "a"), StepOutput(second, 6, "b"),
               StepOutput(first, 7, "c", finish_reason="stop"), StepOutput(second, None, "", finish_reason="length")]

    async def scenario():
        queue, relay, wake_ups = asyncio.Queue(), OutputRelay(asyncio.get_running_loop()), []
        deliver = relay.deliver
        relay.deliver = lambda: (wake_ups.append(1), deliver())
        engine_thread = threading.Thread(target=lambda: [relay.send(queue, output) for output in outputs])
        engine_thread.start()
        engine_thread.join()  # the loop is busy meanwhile, as it is while a step's outputs arrive
        batches = [batch async for batch in output_batches(queue, [first, second])]
        return wake_ups, batches

    wake_ups, batches = asyncio.run(scenario())
    assert wake_ups == [1] and batches == [outputs]
    assert first.cancelled and second.cancelled  # the generator's end releases the replies (a no-op here)
