"""scripts/web_demo.py: the checkpoint list, a chat turn driven by Streamlit's AppTest, and a
real headless Chromium typing into the running app (Debian's `chromium` package, driven by
Playwright; the test is skipped, saying so, only where /usr/bin/chromium is absent)."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from model.checkpoint import save_weights
from model.inference import build_prompt_ids, generate_text, load_model, model_args, split_reasoning
from model.model_lora import apply_lora, save_lora
from tiny_models import tiny_model

REPO_ROOT = Path(__file__).resolve().parent.parent
WEB_DEMO = REPO_ROOT / "scripts" / "web_demo.py"
CHROMIUM = "/usr/bin/chromium"
MAX_NEW_TOKENS = 48


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("out")
    model = tiny_model()
    save_weights(model, str(folder / "full_sft_64.pth"))
    return folder


def expected_reply(out_dir, question: str) -> str:
    model, tokenizer = load_model(model_args(out_dir=str(out_dir), hidden_size=64, num_hidden_layers=2, device="cpu"))
    prompt = build_prompt_ids(tokenizer, [{"role": "user", "content": question}])
    return split_reasoning(generate_text(model, tokenizer, prompt, max_new_tokens=MAX_NEW_TOKENS))[1]


def demo_args(out_dir) -> list[str]:
    return ["--out_dir", str(out_dir), "--device", "cpu", "--max_new_tokens", str(MAX_NEW_TOKENS)]


def test_checkpoints_found_in_the_out_folder(tmp_path):
    from scripts.web_demo import find_models

    model = tiny_model()
    save_weights(model, str(tmp_path / "full_sft_64.pth"))
    save_weights(model, str(tmp_path / "pretrain_64_moe.pth"))
    (tmp_path / "notes.pth").write_bytes(b"")  # not a MiniMind name: ignored
    apply_lora(model, rank=2)
    save_lora(model, str(tmp_path / "lora" / "lora_medical_64.pth"))
    model.save_pretrained(tmp_path / "MiniMind2-hf")
    found = find_models(str(tmp_path), [])
    assert found == {
        "full_sft_64": {"kind": "pth", "path": str(tmp_path / "full_sft_64.pth"), "mode": 1},
        "pretrain_64_moe": {"kind": "pth", "path": str(tmp_path / "pretrain_64_moe.pth"), "mode": 0},
        "full_sft_64 + lora_medical": {"kind": "pth", "path": str(tmp_path / "full_sft_64.pth"), "mode": 1,
                                       "lora_name": "lora_medical"},
        "MiniMind2-hf (transformers)": {"kind": "hf", "path": str(tmp_path / "MiniMind2-hf"), "mode": 1},
    }


def test_app_chat_turn_and_clear(out_dir, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setattr(sys, "argv", [str(WEB_DEMO), *demo_args(out_dir)])  # as after `streamlit run ... --`
    app = AppTest.from_file(str(WEB_DEMO), default_timeout=120)
    app.run()
    assert not app.exception and not app.error
    assert app.selectbox(key="model").options == ["full_sft_64"]
    app.slider(key="temperature").set_value(0.0)
    question = "你好，请介绍一下你自己。"
    app.chat_input[0].set_value(question).run()
    assert not app.exception
    user, assistant = app.chat_message
    assert (user.name, user.markdown[0].value) == ("user", question)
    reply = expected_reply(out_dir, question)
    assert assistant.name == "assistant" and assistant.markdown[0].value == reply and reply
    app.button(key="clear").click().run()
    assert len(app.chat_message) == 0


def test_one_engine_serves_every_reply_of_every_session(out_dir, monkeypatch):
    """The model's engine is built once with the model and shared: two browser sessions and a
    second turn in one of them add rows to the same engine (its loop batches concurrent ones)."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    import model.engine as engine_module

    built = []

    class CountedEngine(engine_module.Engine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(engine_module, "Engine", CountedEngine)
    st.cache_resource.clear()  # a model loaded by another test would hide the construction
    monkeypatch.setattr(sys, "argv", [str(WEB_DEMO), *demo_args(out_dir)])
    sessions = [AppTest.from_file(str(WEB_DEMO), default_timeout=120) for _ in range(2)]
    questions = ["你好", "为什么天空是蓝色的？"]
    for app, question in zip(sessions, questions):
        app.run()
        app.slider(key="temperature").set_value(0.0)
        app.chat_input[0].set_value(question).run()
        assert not app.exception and not app.error
        assert app.chat_message[1].markdown[0].value == expected_reply(out_dir, question)
    sessions[0].chat_input[0].set_value("再见").run()
    assert not sessions[0].exception and len(sessions[0].chat_message) == 4
    assert len(built) == 1
    assert built[0].rows == [] and not built[0].waiting  # every reply ended and left its slot
    st.cache_resource.clear()  # stops the engine thread


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Records every distinct text the assistant's message shows, to see the reply arrive in pieces.
WATCH_ASSISTANT = """() => {
  window.seenTexts = [];
  new MutationObserver(() => {
    const messages = document.querySelectorAll('[data-testid="stChatMessageContent"]');
    if (messages.length < 2) return;
    const text = messages[messages.length - 1].innerText.trim();
    if (text && window.seenTexts[window.seenTexts.length - 1] !== text) window.seenTexts.push(text);
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""
REPLY_DONE = """() => {
  const messages = document.querySelectorAll('[data-testid="stChatMessageContent"]');
  return messages.length >= 2 && messages[1].innerText.trim().length > 0 && !messages[1].innerText.includes('▌');
}"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (apt-get install chromium)")
def test_browser_types_a_question_and_sees_the_streamed_answer(out_dir, tmp_path):
    from playwright.sync_api import sync_playwright

    port = free_port()
    log_path = tmp_path / "streamlit.log"
    with open(log_path, "w") as log:
        app = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(WEB_DEMO), "--server.port", str(port),
             "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false",
             "--", *demo_args(out_dir), "--max_new_tokens", "256"],
            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert app.poll() is None and time.monotonic() < deadline, log_path.read_text()
            try:
                if httpx.get(url + "/_stcore/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.goto(url)
            box = page.get_by_test_id("stChatInputTextArea")
            box.wait_for(timeout=90_000)
            page.evaluate(WATCH_ASSISTANT)
            box.fill("Why is the sky blue?")
            box.press("Enter")
            page.wait_for_function(REPLY_DONE, timeout=90_000)
            answer = page.get_by_test_id("stChatMessageContent").nth(1).inner_text().strip()
            seen = page.evaluate("window.seenTexts")
            page.screenshot(path=str(tmp_path / "web_demo.png"))
            browser.close()
    finally:
        app.terminate()
        app.wait(timeout=30)
    assert answer
    assert len(seen) >= 3 and seen[-1] == answer, seen  # the answer grew in place: it was streamed
    assert (tmp_path / "web_demo.png").stat().st_size > 10_000


def listening_addresses(pid: int) -> set[str]:
    import psutil

    return {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}


@pytest.mark.slow
def test_demo_listens_on_localhost_only_unless_told_and_sends_no_statistics(out_dir, tmp_path):
    """`streamlit run scripts/web_demo.py` from the repository root, as the README says, reads
    .streamlit/config.toml: loopback only, no usage statistics."""
    apps = {}
    try:
        for name, extra in {"default": [], "told": ["--server.address", "0.0.0.0"]}.items():
            port = free_port()
            log = open(tmp_path / f"{name}.log", "w")
            apps[name] = (port, subprocess.Popen(
                [sys.executable, "-m", "streamlit", "run", "scripts/web_demo.py", "--server.port", str(port),
                 "--server.headless", "true", *extra, "--", *demo_args(out_dir)],
                cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT))
        for name, (port, app) in apps.items():
            deadline = time.monotonic() + 60
            while True:
                assert app.poll() is None and time.monotonic() < deadline, (tmp_path / f"{name}.log").read_text()
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/_stcore/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
        assert listening_addresses(apps["default"][1].pid) == {"127.0.0.1"}
        assert listening_addresses(apps["told"][1].pid) == {"0.0.0.0"}
    finally:
        for _, app in apps.values():
            app.terminate()
            app.wait(timeout=30)
    shown = subprocess.run([sys.executable, "-m", "streamlit", "config", "show"], cwd=REPO_ROOT, capture_output=True,
                           text=True, timeout=60).stdout
    assert "\ngatherUsageStats = false" in shown and '\naddress = "127.0.0.1"' in shown
