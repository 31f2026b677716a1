"""A chat page for MiniMind in the browser (Streamlit).

    streamlit run scripts/web_demo.py                         # models found in out/
    streamlit run scripts/web_demo.py -- --out_dir my_out     # another folder (or $MINIMIND_OUT_DIR)
    streamlit run scripts/web_demo.py -- --hf_path MiniMind2  # add a transformers folder

The sidebar lists every checkpoint found: {stage}_{hidden}{_moe}.pth files in the out folder,
LoRA adapters in its lora/ subfolder (on top of the full_sft weights of the same size) and
transformers model folders (a config.json next to the weights). The chosen model is loaded once
and kept for all sessions (st.cache_resource), with one generation engine running on its own
thread (model/engine.py's EngineLoop): every reply of every browser session is a row of that
engine, so replies being written at the same time are decoded together in one batch
(--max_batch_size rows, each up to --context_length tokens of conversation and reply).
Replies stream; a reasoning model's <think>…</think> text goes into a collapsible block above
the answer.
The sidebar's "Tools" switch offers the built-in tools of model/tools.py: each call the
model makes is run and shown (a collapsible block with the call and its result) before the
answer that uses it.
"""
import argparse
import os
import random
import re
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import streamlit as st
import torch

from model.checkpoint import STAGE_OF_MODEL_MODE
from model.engine import Engine, EngineLoop, QueueFull, SamplingParams
from model.inference import (ModelLoadError, ReasoningSplitter, build_prompt_ids, count_parameters, default_device,
                             load_model, model_args, sizes_of_checkpoint, trim_history)
from model.tools import builtin_registry, describe_call, run_tool_loop

MODE_OF_STAGE = {stage: mode for mode, stage in STAGE_OF_MODEL_MODE.items()}
WEIGHTS_NAME = re.compile(r"^(?P<stage>" + "|".join(MODE_OF_STAGE) + r")_(?P<hidden>\d+)(?P<moe>_moe)?\.pth$")
LORA_NAME = re.compile(r"^(?P<name>.+)_(?P<hidden>\d+)\.pth$")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


def parse_args():
    """Flags after `--` on the streamlit command line; unknown ones (e.g. a test runner's) are ignored."""
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--out_dir", default=os.environ.get("MINIMIND_OUT_DIR", str(ROOT / "out")))
    parser.add_argument("--hf_path", action="append", default=[], help="a transformers model folder (repeatable)")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--tokenizer_path", default=None, help="tokenizer folder (default: model/)")
    parser.add_argument("--max_new_tokens", type=int, default=1024, help="the sidebar's initial reply length")
    parser.add_argument("--context_length", type=int, default=2048,
                        help="conversation + reply tokens per reply (the engine's cache is sized for it)")
    parser.add_argument("--max_batch_size", type=int, default=4, help="replies (sessions) decoded together")
    return parser.parse_known_args(sys.argv[1:])[0]


# ----------------------------------------------------------------------------------------------
# Which models there are
# ----------------------------------------------------------------------------------------------

def find_models(out_dir: str, hf_paths: list[str]) -> dict[str, dict]:
    """{label shown in the sidebar: how to load it}, newest kinds of checkpoints first."""
    found = {}
    out = Path(out_dir)
    pth_files = sorted(out.glob("*.pth")) if out.is_dir() else []
    for path in pth_files:
        match = WEIGHTS_NAME.match(path.name)
        if match:
            found[path.stem] = {"kind": "pth", "path": str(path), "mode": MODE_OF_STAGE[match["stage"]]}
    for path in sorted((out / "lora").glob("*.pth")) if (out / "lora").is_dir() else []:
        match = LORA_NAME.match(path.name)
        base = out / f"full_sft_{match['hidden']}.pth" if match else None
        if base is not None and base.is_file():
            found[f"{base.stem} + {match['name']}"] = {"kind": "pth", "path": str(base), "mode": 1,
                                                        "lora_name": match["name"]}
    folders = [p for p in sorted(out.iterdir()) if p.is_dir()] if out.is_dir() else []
    for folder in folders + [Path(p) for p in hf_paths]:
        if (folder / "config.json").is_file() and any((folder / f).is_file() for f in HF_WEIGHT_FILES):
            found[f"{folder.name} (transformers)"] = {"kind": "hf", "path": str(folder), "mode": 1}
    return found


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    engine_loop: EngineLoop  # decodes the replies of every session, in one batch


def close_engine(loaded: LoadedModel) -> None:
    """When Streamlit drops a model from its cache, stop its engine thread too."""
    loaded.engine_loop.close()


@st.cache_resource(show_spinner="Loading the model…", max_entries=2, on_release=close_engine)
def load_cached(kind: str, path: str, mode: int, lora_name: str | None, device: str, tokenizer_path: str | None,
                context_length: int, max_batch_size: int) -> LoadedModel:
    """Loaded once per model and shared by every browser session, with its engine."""
    if kind == "hf":
        args = model_args(load=1, hf_path=path, device=device, tokenizer_path=tokenizer_path)
    else:
        sizes = sizes_of_checkpoint(path)  # the size flags are read off the file itself
        args = model_args(load=0, out_dir=str(Path(path).parent), model_mode=mode, lora_name=lora_name,
                          device=device, tokenizer_path=tokenizer_path, **sizes)

    def build_engine():  # on the engine's own thread, which should hold the model (EngineLoop's docstring)
        model, tokenizer = load_model(args)
        return Engine(model, tokenizer, max_batch_size=max_batch_size, max_seq_len=context_length)

    engine_loop = EngineLoop.building(build_engine)
    return LoadedModel(engine_loop.engine.model, engine_loop.engine.tokenizer, engine_loop)


# ----------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------

def sidebar(models: dict, args) -> dict:
    with st.sidebar:
        st.title("MiniMind")
        label = st.selectbox("Model", list(models), key="model")
        longest_reply = max(16, args.context_length)  # what the engine's cache can hold
        settings = {
            "label": label,
            "temperature": st.slider("Temperature (0 = greedy)", 0.0, 1.5, 0.85, 0.05, key="temperature"),
            "top_p": st.slider("Top-p", 0.0, 1.0, 0.85, 0.05, key="top_p"),
            "max_new_tokens": st.slider("Max new tokens", 16, longest_reply, min(args.max_new_tokens, longest_reply),
                                        16, key="max_new_tokens"),
            "history_cnt": st.slider("History turns kept", 0, 10, 2, key="history_cnt"),
            "tools": st.toggle("Tools (calculator, units, date, facts)", value=False, key="tools"),
        }
        names = builtin_registry().names()
        settings["tool_names"] = st.multiselect("Offered tools", names, default=names, key="tool_names") \
            if settings["tools"] else []
        if st.button("Clear chat", key="clear", width="stretch"):
            st.session_state.messages = []
    return settings


def show_tool_step(step: dict) -> None:
    with st.expander(f"🔧 {step['call']}", expanded=False):
        st.code(step["result"] or "…", language="json")


def show_message(message: dict) -> None:
    with st.chat_message(message["role"]):
        if message.get("reasoning"):
            with st.expander("Reasoning", expanded=False):
                st.markdown(message["reasoning"])
        for step in message.get("tool_steps", []):
            show_tool_step(step)
        st.markdown(message["content"])


def reply_deltas(loaded: LoadedModel, prompt_ids: list[int], settings: dict):
    """The reply's text as it comes, from the shared engine. If the page stops reading (the
    user sent another message or left), closing this generator cancels the reply's row."""
    params = SamplingParams(max_tokens=settings["max_new_tokens"], temperature=settings["temperature"],
                            top_p=settings["top_p"], seed=random.randint(0, 2**31 - 1))
    outputs = loaded.engine_loop.stream(prompt_ids, params)
    try:
        for output in outputs:
            if output.finish_reason == "error":
                raise output.sequence.error
            if output.text:
                yield output.text
    finally:
        outputs.close()


def stream_reply(loaded: LoadedModel, messages: list[dict], settings: dict, raw: bool) -> dict:
    """Generate the assistant's reply into the page as it comes; returns the finished message."""
    prompt_ids = build_prompt_ids(loaded.tokenizer, trim_history(messages, settings["history_cnt"]), raw=raw)
    reasoning_area, answer_area = st.empty(), st.empty()
    reasoning_text = None
    parts = {"reasoning": "", "content": ""}
    splitter = ReasoningSplitter()

    def show(pieces, cursor):
        nonlocal reasoning_text
        for kind, text in pieces:
            parts[kind] += text
            if kind == "reasoning":
                if reasoning_text is None:  # the first reasoning text: open the block
                    reasoning_text = reasoning_area.expander("Reasoning", expanded=True).empty()
                reasoning_text.markdown(parts["reasoning"] + cursor)
            else:
                answer_area.markdown(parts["content"] + cursor)

    try:
        for delta in reply_deltas(loaded, prompt_ids, settings):
            show(splitter.feed(delta), cursor=" ▌")
    except (ValueError, QueueFull) as e:  # a conversation longer than the context; too many sessions
        st.error(f"{e}. Clear the chat, keep fewer history turns or wait a moment.")
    show(splitter.flush(), cursor="")
    answer_area.markdown(parts["content"])
    if reasoning_text is not None:
        reasoning_text.markdown(parts["reasoning"])
    return {"role": "assistant", "content": parts["content"], "reasoning": parts["reasoning"]}


def stream_tool_reply(loaded: LoadedModel, messages: list[dict], settings: dict) -> dict:
    """The reply through the tool loop (each round a row of the shared engine): each call and its
    result appear as they happen, then the answer streams below them. Only the final text goes
    into the chat history."""
    def stream(history, schemas):
        yield from reply_deltas(loaded, build_prompt_ids(loaded.tokenizer, history, tools=schemas or None), settings)

    steps, step_of_call, text = [], {}, ""
    steps_area, answer_area = st.container(), st.empty()
    for event in run_tool_loop(stream, trim_history(messages, settings["history_cnt"]),
                               builtin_registry(now=datetime.now()), offered=settings["tool_names"]):
        if event.kind == "content":
            text += event.text
            answer_area.markdown(text + " ▌")
        elif event.kind == "call":
            step_of_call[event.call.id] = {"call": describe_call(event.call), "result": ""}
            steps.append(step_of_call[event.call.id])
        elif event.kind == "result":
            step_of_call[event.call.id]["result"] = event.text
            with steps_area:
                show_tool_step(step_of_call[event.call.id])
        elif event.kind == "round" and steps:
            text += "\n\n" if text else ""
    answer_area.markdown(text.strip())
    return {"role": "assistant", "content": text.strip(), "tool_steps": steps}


def main():
    args = parse_args()
    st.set_page_config(page_title="MiniMind", page_icon="🤖")
    models = find_models(args.out_dir, args.hf_path)
    if not models:
        st.error(f"No model found in {args.out_dir}. Train one (python trainer/train_full_sft.py), or start the "
                 f"demo with: streamlit run scripts/web_demo.py -- --out_dir DIR")
        st.stop()
    settings = sidebar(models, args)
    choice = models[settings["label"]]
    try:
        loaded = load_cached(choice["kind"], choice["path"], choice["mode"], choice.get("lora_name"),
                             args.device, args.tokenizer_path, args.context_length, args.max_batch_size)
    except ModelLoadError as e:
        st.error(str(e))
        st.stop()
    st.caption(f"{settings['label']} · {count_parameters(loaded.model) / 1e6:.1f} M parameters · {args.device}")

    st.session_state.setdefault("messages", [])
    for message in st.session_state.messages:
        show_message(message)

    prompt = st.chat_input("Ask MiniMind something")
    if prompt:
        user_message = {"role": "user", "content": prompt}
        show_message(user_message)
        st.session_state.messages.append(user_message)
        history = [{"role": m["role"], "content": m["content"]} for m in st.session_state.messages]
        with st.chat_message("assistant"):
            if settings["tools"] and choice["mode"] != 0:
                reply = stream_tool_reply(loaded, history, settings)
            else:
                reply = stream_reply(loaded, history, settings, raw=choice["mode"] == 0)
        st.session_state.messages.append(reply)


if __name__ == "__main__":  # `streamlit run` (and AppTest) run the file as __main__
    main()
