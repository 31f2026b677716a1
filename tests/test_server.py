"""scripts/serve_openai_api.py in a real subprocess on a free loopback port, driven by the
official `openai` client (and raw httpx where the client would hide the wire format), plus
scripts/chat_openai_api.py against it.

The server runs a tiny random MiniMind (gibberish text, deterministic at temperature 0) with
--api_key, so every request here carries the key except the ones checking that it is needed,
and with --context_length 2048 so a too-long prompt is cheap to send."""
import json
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

from model.checkpoint import config_from_sizes, save_weights
from model.inference import build_prompt_ids, generate_text, load_model, model_args, split_reasoning
from model.model_minimind import MiniMindForCausalLM

REPO_ROOT = Path(__file__).resolve().parent.parent
API_KEY = "sk-test-key"
CONTEXT = 2048
pytestmark = pytest.mark.slow  # a server subprocess


def tiny_model(seed: int = 0) -> MiniMindForCausalLM:
    """Random weights with a wide spread, so greedy replies differ from prompt to prompt."""
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(config_from_sizes(64, 2, False))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model.eval()


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


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("out")
    save_weights(tiny_model(), str(folder / "full_sft_64.pth"))
    return folder


@pytest.fixture(scope="module")
def server(out_dir, tmp_path_factory):
    """(base_url, log file) of a running server; stopped after the module."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "scripts" / "serve_openai_api.py"), "--out_dir", str(out_dir),
             "--hidden_size", "64", "--num_hidden_layers", "2", "--device", "cpu", "--port", str(port),
             "--api_key", API_KEY, "--context_length", str(CONTEXT)],
            stdout=log, stderr=subprocess.STDOUT, cwd=out_dir)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until_serving(base_url + "/models", process, log_path)
        yield base_url, log_path
    finally:
        process.terminate()
        process.wait(timeout=30)


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
