"""Tool calling: the chat template against minimind-3's strings, SFT masks on tool rows, the
built-in tools (the calculator refuses anything but arithmetic), the streaming parser, the loop
with malformed calls, the demo data, and the loop on a real model fine-tuned on one tool chat."""
import json
import random
import re
import subprocess
import sys
from datetime import datetime

import pytest
import torch
from transformers import AutoTokenizer

from dataset.lm_dataset import SFTDataset, check_sft, conversation_of
from model.inference import build_prompt_ids
from model.tools import (DEMO_NOW, ToolCall, ToolCallStream, ToolError, builtin_registry, calculator,
                         engine_stream_reply, load_tool_prompts, make_date_time, parse_tool_call_body, run_tool_loop,
                         score_tool_prompts, split_tool_calls, unit_converter)
from tool_helpers import CALCULATOR, REPO_ROOT, TOOL_CHAT, fine_tuned_tool_model

DEMO = REPO_ROOT / "dataset" / "demo"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(REPO_ROOT / "model"))


def test_the_six_tags_are_single_added_tokens(tok):
    tags = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
    assert [tok(tag, add_special_tokens=False)["input_ids"] for tag in tags] == [[3], [4], [5], [6], [7], [8]]
    assert tok.decode([5, 6], skip_special_tokens=True) == "<tool_call></tool_call>"  # text, not skipped


# ---------------------------------------------------------------- the template (minimind-3's strings)

TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n')
CALC_JSON = ('{"type": "function", "function": {"name": "calculator", "description": "Evaluate an arithmetic '
             'expression", "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, '
             '"required": ["expression"]}}}')
# minimind-3's rendering of TOOL_CHAT (its template, less the empty "<think>\n\n</think>\n\n")
EXPECTED_TOOL_CHAT = (
    "<|im_start|>system\n" + TOOLS_HEADER + "\n" + CALC_JSON + TOOLS_FOOTER
    + "<|im_start|>user\nWhat is 37 times 48?<|im_end|>\n"
    + '<|im_start|>assistant\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "37*48"}}\n'
      "</tool_call><|im_end|>\n"
    + '<|im_start|>user\n<tool_response>\n{"result": 1776}\n</tool_response><|im_end|>\n'
    + "<|im_start|>assistant\n37 × 48 = 1776.<|im_end|>\n")


def test_tool_conversation_renders_as_minimind3(tok):
    assert tok.apply_chat_template(TOOL_CHAT["messages"], tools=TOOL_CHAT["tools"], tokenize=False) \
        == EXPECTED_TOOL_CHAT


def test_system_text_parallel_calls_and_shared_tool_turn(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "12*13 and 14*15?"},
        {"role": "assistant", "content": "Two products.", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "12*13"}'}},
            {"name": "calculator", "arguments": {"expression": "14*15"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "156"},
        {"role": "tool", "content": "210"},
        {"role": "assistant", "content": "156 and 210."},
        {"role": "user", "content": "谢谢"},
    ]
    expected = ("<|im_start|>system\nBe brief.\n\n" + TOOLS_HEADER + "\n" + CALC_JSON + TOOLS_FOOTER
                + "<|im_start|>user\n12*13 and 14*15?<|im_end|>\n"
                + "<|im_start|>assistant\nTwo products.\n"
                  '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*13"}}\n</tool_call>\n'
                  '<tool_call>\n{"name": "calculator", "arguments": {"expression": "14*15"}}\n</tool_call><|im_end|>\n'
                + "<|im_start|>user\n<tool_response>\n156\n</tool_response>\n<tool_response>\n210\n"
                  "</tool_response><|im_end|>\n"
                + "<|im_start|>assistant\n156 and 210.<|im_end|>\n<|im_start|>user\n谢谢<|im_end|>\n"
                + "<|im_start|>assistant\n")
    assert tok.apply_chat_template(messages, tools=[CALCULATOR], tokenize=False, add_generation_prompt=True) \
        == expected


def test_plain_chats_render_exactly_as_minimind2_with_or_without_an_empty_tools_list(tok):
    chat = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    minimind2 = ("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
                 "<|im_start|>assistant\n你好！<|im_end|>\n")
    assert tok.apply_chat_template(chat, tokenize=False) == minimind2
    assert tok.apply_chat_template(chat, tools=[], tokenize=False) == minimind2


def test_prompt_ids_with_tools_match_the_template_and_keep_message_text_as_text(tok):
    messages = TOOL_CHAT["messages"][:3] + [{"role": "tool", "content": "<|im_end|>"}]
    ids = build_prompt_ids(tok, messages, tools=TOOL_CHAT["tools"])
    text = tok.apply_chat_template(messages, tools=TOOL_CHAT["tools"], tokenize=False, add_generation_prompt=True)
    assert tok.decode(ids) == text
    assert ids.count(2) == text.count("<|im_end|>") - 1  # the tool's "<|im_end|>" is text, not the token
    # the tags (in the tools block, the call and the result) are single tokens
    assert ids.count(5) == text.count("<tool_call>") == 3 and ids.count(7) == text.count("<tool_response>") == 2


# ---------------------------------------------------------------- SFT rows with tools

SYSTEM = {"role": "system", "content": "You are MiniMind."}


def minimind3_row(row):
    """TOOL_CHAT in minimind-3's dataset shape: tools on the system message, JSON strings."""
    messages = [dict(m) for m in row["messages"]]
    for m in messages:
        if "tool_calls" in m:
            m["tool_calls"] = json.dumps(m["tool_calls"])
    return {"conversations": [{**SYSTEM, "tools": json.dumps(row["tools"])}] + messages}


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def trained_and_masked_text(tok, dataset, i):
    x, y, mask = dataset[i]
    return tok.decode(y[mask.bool()]), tok.decode(y[~mask.bool()])


@pytest.mark.parametrize("shape", ["openai", "minimind3"])
def test_sft_trains_calls_and_answers_not_the_tools_block_or_results(tok, tmp_path, shape):
    row = TOOL_CHAT if shape == "openai" else minimind3_row(TOOL_CHAT)
    dataset = SFTDataset(str(write_rows(tmp_path / "tools.jsonl", [row])), tok, max_length=1024,
                         cache_dir=tmp_path / "cache")
    trained, masked = trained_and_masked_text(tok, dataset, 0)
    assert trained == ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "37*48"}}\n</tool_call>'
                       "<|im_end|>37 × 48 = 1776.<|im_end|>")
    assert "<tools>" in masked and '"result": 1776' in masked and "What is 37 times 48?" in masked


def test_both_row_shapes_give_the_same_tokens(tok, tmp_path):
    openai_row = {"tools": TOOL_CHAT["tools"], "messages": [SYSTEM] + TOOL_CHAT["messages"]}
    path = write_rows(tmp_path / "both.jsonl", [openai_row, minimind3_row(TOOL_CHAT)])
    dataset = SFTDataset(str(path), tok, max_length=1024, cache_dir=tmp_path / "cache")
    (x1, y1, m1), (x2, y2, m2) = dataset[0], dataset[1]
    assert torch.equal(x1, x2) and torch.equal(m1, m2)
    assert tok.decode(x1).startswith("<|im_start|>system\nYou are MiniMind.\n\n# Tools\n")


@pytest.mark.parametrize("row,problem", [
    ({"tools": [CALCULATOR], "messages": [{"role": "user", "content": "q"},
                                          {"role": "assistant", "content": "", "tool_calls": [{"x": 1}]},
                                          {"role": "tool", "content": "1"}, {"role": "assistant", "content": "a"}]},
     '"name"'),
    ({"tools": [CALCULATOR], "messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "1"},
                                          {"role": "assistant", "content": "a"}]}, "roles out of order"),
    ({"tools": [CALCULATOR], "messages": TOOL_CHAT["messages"][:3]}, "end with an assistant answer"),
    ({"conversations": [{"role": "system", "content": "", "tools": "[{bad json"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"}]}, "tools is a string but not valid JSON"),
])
def test_bad_tool_rows_say_what_is_wrong(row, problem):
    assert problem in check_sft(row)


def test_good_tool_rows_pass_the_check():
    assert check_sft(TOOL_CHAT) is None and check_sft(minimind3_row(TOOL_CHAT)) is None
    messages, tools = conversation_of(minimind3_row(TOOL_CHAT))
    assert tools == TOOL_CHAT["tools"] and isinstance(messages[2]["tool_calls"], list)


# ---------------------------------------------------------------- the built-in tools

@pytest.mark.parametrize("expression,result", [("37*48", 1776), ("(1+2)*3 - 4/2", 7), ("2**10", 1024),
                                               ("7 // 2 + 7 % 2", 4), ("-3 + +5", 2), ("0.1+0.2", 0.3),
                                               ("37×48", 1776), ("2^3", 8), ("144÷12", 12)])
def test_calculator_does_arithmetic(expression, result):
    assert calculator(expression) == {"result": result}


@pytest.mark.parametrize("expression", ["__import__('os').system('echo hi')", "open('/etc/passwd')", "x + 1",
                                        "(1).__class__", "'a' * 3", "[1, 2]", "1 < 2", "lambda: 1", "abs(-1)",
                                        "9**9**9", "10**1000", "1/0", "1 +", "True + 1"])
def test_calculator_refuses_anything_but_arithmetic(expression):
    with pytest.raises(ToolError):
        calculator(expression)


def test_unit_converter_date_time_and_lookup():
    assert unit_converter(100, "km", "mile") == {"result": 62.14, "unit": "mile"}
    assert unit_converter(100, "celsius", "fahrenheit") == {"result": 212, "unit": "fahrenheit"}
    assert unit_converter(5, "公斤", "磅") == {"result": 11.02, "unit": "lb"}
    with pytest.raises(ToolError, match="cannot convert length"):
        unit_converter(1, "km", "kg")
    date_time = make_date_time(datetime(2024, 2, 28, 12, 0))
    assert date_time(1) == {"date": "2024-02-29", "weekday": "Thursday", "time": "12:00"}
    registry = builtin_registry()
    assert json.loads(registry.run(ToolCall("lookup_fact", {"topic": "珠穆朗玛峰"}, "")))["value"] == "8849 m"


@pytest.mark.parametrize("call,error", [
    (ToolCall("calculator", {"expr": "1+1"}, ""), "missing expression; unknown expr"),
    (ToolCall("calculator", {"expression": 5}, ""), "expression must be a string"),
    (ToolCall("weather", {}, ""), "unknown tool 'weather'"),
    (ToolCall("lookup_fact", {"topic": "atlantis"}, ""), "no fact about 'atlantis'"),
    (ToolCall("date_time", {"days_from_now": True}, ""), "days_from_now must be a integer"),
])
def test_registry_turns_every_failure_into_an_error_result(call, error):
    result = json.loads(builtin_registry().run(call))
    assert error in result["error"]


def test_registry_runs_only_offered_tools():
    result = json.loads(builtin_registry().run(ToolCall("calculator", {"expression": "1+1"}, ""), offered=["date_time"]))
    assert result == {"error": "unknown tool 'calculator'; available: date_time"}


# ---------------------------------------------------------------- parsing, streamed or whole

REPLY = ('Let me check.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+2"}}\n</tool_call>\n'
         '<tool_call>\n{"name": "date_time", "arguments": "{\\"days_from_now\\": 3}"}\n</tool_call>')


def events_of(pieces):
    """The parser's events, consecutive content pieces joined (how finely content is cut
    depends on the deltas; what it says and where the calls fall must not)."""
    stream = ToolCallStream()
    events = []
    for kind, value in [e for piece in pieces for e in stream.feed(piece)] + stream.flush():
        if kind == "content" and events and events[-1][0] == "content":
            events[-1] = ("content", events[-1][1] + value)
        else:
            events.append((kind, value if kind == "content" else (value.name, value.arguments, value.error)))
    return events


def test_stream_parser_gives_the_same_events_however_the_text_is_cut():
    whole = events_of([REPLY])
    assert whole == [("content", "Let me check."), ("call", ("calculator", {"expression": "2+2"}, None)),
                     ("call", ("date_time", {"days_from_now": 3}, None))]
    for cut in range(1, len(REPLY)):
        assert events_of([REPLY[:cut], REPLY[cut:]]) == whole
    assert events_of(list(REPLY)) == whole  # one character at a time


def test_stream_parser_never_shows_a_partial_tag_as_content():
    stream = ToolCallStream()
    assert stream.feed("Sure <tool_") == [("content", "Sure")]
    assert stream.feed("call>\n{") == []
    assert [kind for kind, _ in stream.feed('"name": "x"}\n</tool_call> done')] == ["call", "content"]


@pytest.mark.parametrize("body,error", [("{not json", "not valid JSON"), ('{"arguments": {}}', 'string "name"'),
                                        ('{"name": "calculator", "arguments": [1]}', '"arguments" must be')])
def test_malformed_call_bodies_are_kept_with_their_error(body, error):
    call = parse_tool_call_body(body)
    assert error in call.error and call.text == body


def test_an_unclosed_call_is_a_malformed_call():
    content, calls = split_tool_calls('Hi <tool_call>\n{"name": "calculator"')
    assert content == "Hi" and "ended inside a call" in calls[0].error


# ---------------------------------------------------------------- the loop

def scripted(replies):
    """A stream_reply that plays fixed replies in order (to drive the loop through failures a
    trained model makes only by chance) and records the tools it was offered."""
    seen = []

    def stream_reply(messages, schemas):
        seen.append([s["function"]["name"] for s in schemas])
        text = replies[len(seen) - 1]
        yield from (text[i:i + 3] for i in range(0, len(text), 3))
    return stream_reply, seen


def test_the_loop_survives_malformed_calls_and_shows_the_model_its_errors():
    replies = ["<tool_call>\n{oops\n</tool_call>",
               '<tool_call>\n{"name": "weather", "arguments": {}}\n</tool_call>',
               '<tool_call>\n{"name": "calculator", "arguments": {"expr": "1"}}\n</tool_call>',
               '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n</tool_call>',
               "It is 42."]
    stream_reply, seen = scripted(replies)
    messages = [{"role": "user", "content": "6*7?"}]
    events = list(run_tool_loop(stream_reply, messages, builtin_registry(), offered=["calculator"], max_rounds=4))
    results = [json.loads(e.text) for e in events if e.kind == "result"]
    assert "not valid JSON" in results[0]["error"] and "unknown tool 'weather'" in results[1]["error"]
    assert "missing expression" in results[2]["error"] and results[3] == {"result": 42}
    assert messages[-1] == {"role": "assistant", "content": "It is 42."}
    assert messages[1]["content"] == "<tool_call>\n{oops\n</tool_call>"  # kept as written
    assert messages[7]["tool_calls"][0]["function"]["name"] == "calculator"
    assert seen == [["calculator"]] * 5


def test_the_loop_stops_after_max_rounds():
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+1"}}\n</tool_call>'
    stream_reply, seen = scripted([call] * 10)
    events = list(run_tool_loop(stream_reply, [{"role": "user", "content": "?"}], builtin_registry(), max_rounds=2))
    assert len(seen) == 3 and sum(e.kind == "result" for e in events) == 2


# ---------------------------------------------------------------- the demo data

def test_demo_tool_data_is_bilingual_varied_and_held_out(tok, tmp_path):
    rows = [json.loads(line) for line in (DEMO / "sft_tools.jsonl").read_text(encoding="utf-8").splitlines()]
    held_out = load_tool_prompts(DEMO / "tools_eval.jsonl")
    assert len(rows) >= 200 and len(held_out) >= 50
    conversations = [conversation_of(row) for row in rows]
    calls_per_row = [sum(1 for m in msgs if m.get("tool_calls")) for msgs, _ in conversations]
    assert {0, 1, 2} <= set(calls_per_row)  # not needed, single step, multi-step
    assert any(len(m.get("tool_calls") or []) == 2 for msgs, _ in conversations for m in msgs)  # parallel calls
    questions = [next(m["content"] for m in msgs if m["role"] == "user") for msgs, _ in conversations]
    assert sum(q.isascii() for q in questions) > 0.3 * len(rows) and sum(not q.isascii() for q in questions) > 0.3 * len(rows)
    assert "conversations" in rows[0] or "conversations" in rows[1]  # both shapes are in the file
    assert any("messages" in row for row in rows) and any("conversations" in row for row in rows)
    tool_questions = {q for q, n in zip(questions, calls_per_row) if n}
    assert not tool_questions & {row["messages"][-1]["content"] for row in held_out if row["expected_calls"]}
    assert sum(not row["expected_calls"] for row in held_out) >= 5
    dataset = SFTDataset(str(DEMO / "sft_tools.jsonl"), tok, max_length=640, cache_dir=tmp_path / "cache")
    assert dataset.window.skipped == 0 and dataset.window.cut == 0


def test_expected_calls_of_the_held_out_set_give_its_answers():
    registry = builtin_registry()
    for row in load_tool_prompts(DEMO / "tools_eval.jsonl"):
        offered = [tool["function"]["name"] for tool in row["tools"]]
        for expected in row["expected_calls"]:
            result = registry.run(ToolCall(expected["name"], expected["arguments"], ""), offered)
            assert "error" not in json.loads(result)


def test_make_demo_data_writes_the_same_tool_files_again(tmp_path):
    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "make_demo_data.py"), "--out_dir", str(tmp_path)],
                   check=True, capture_output=True)
    for name in ("sft_tools.jsonl", "tools_eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (DEMO / name).read_bytes()


def test_tool_transcripts_show_real_results_and_answers_that_read_them():
    """Pretraining text of quickstart --tools 1: every call's <tool_response> is what the tool
    returns, a single calculator answer starts from its result, no held-out question appears."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    from make_demo_data import held_out_tool_questions, make_tool_transcripts
    registry, held_out = builtin_registry(), held_out_tool_questions(seed=1337)
    held_out_with_a_call = {row["messages"][-1]["content"] for row in load_tool_prompts(DEMO / "tools_eval.jsonl")
                            if row["expected_calls"]}
    assert held_out_with_a_call and held_out_with_a_call <= held_out
    texts = [row["text"] for row in make_tool_transcripts(random.Random(0), registry, 400, held_out)]
    assert not {text.split("\n")[0] for text in texts} & held_out
    names = set()
    for text in texts:
        bodies = re.findall(r"<tool_call>\n(.*?)\n</tool_call>", text)
        responses = re.findall(r"<tool_response>\n(.*?)\n</tool_response>", text)
        assert bodies and len(bodies) == len(responses)
        for body, response in zip(bodies, responses):
            call = json.loads(body)
            names.add(call["name"])
            assert response == registry.run(ToolCall(call["name"], call["arguments"], body), [call["name"]])
        if len(bodies) == 1 and bodies[0].startswith('{"name": "calculator"'):
            result = str(json.loads(responses[0])["result"])
            assert text.split("\n")[-1] in (f"The result is {result}.", f"结果是{result}。")
    assert names == set(registry.names())


# ---------------------------------------------------------------- a real model in the loop

@pytest.mark.slow
def test_a_model_fine_tuned_on_a_tool_chat_calls_the_calculator_through_the_loop(tok):
    model = fine_tuned_tool_model()
    messages = [{"role": "user", "content": "What is 37 times 48?"}]
    events = list(run_tool_loop(engine_stream_reply(model, tok, max_new_tokens=48, temperature=0.0), messages,
                                builtin_registry(now=DEMO_NOW), offered=["calculator"]))
    calls = [e.call for e in events if e.kind == "call"]
    assert [(c.name, c.arguments) for c in calls] == [("calculator", {"expression": "37*48"})]
    assert [e.text for e in events if e.kind == "result"] == ['{"result": 1776}']
    assert messages[-1] == {"role": "assistant", "content": "37 × 48 = 1776."}
    prompt = {"messages": [{"role": "user", "content": "What is 37 times 48?"}], "tools": [CALCULATOR],
              "expected_calls": [{"name": "calculator", "arguments": {"expression": "37 * 48"}}], "answer": ["1776"]}
    scores = score_tool_prompts(model, tok, [prompt], max_new_tokens=48)
    assert scores["valid_call"] == scores["exact_arguments"] == scores["answer_with_tools"] == 1.0


@pytest.mark.slow
def test_eval_model_with_tools_shows_the_call_the_result_and_the_answer(tmp_path, capsys):
    import eval_model
    from model.checkpoint import save_weights
    save_weights(fine_tuned_tool_model(), str(tmp_path / "full_sft_64.pth"))
    assert eval_model.main(["--out_dir", str(tmp_path), "--hidden_size", "64", "--num_hidden_layers", "2",
                            "--device", "cpu", "--tools", "1", "--tool_names", "calculator",
                            "--prompt", "What is 37 times 48?",
                            "--temperature", "0", "--max_new_tokens", "48"]) == 0
    assert capsys.readouterr().out.splitlines() == ['🔧 calculator {"expression": "37*48"}', '📎 {"result": 1776}',
                                                    "🤖️: 37 × 48 = 1776."]


@pytest.mark.slow
def test_web_demo_tools_switch_shows_the_call_the_result_and_the_answer(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest
    from model.checkpoint import save_weights
    save_weights(fine_tuned_tool_model(), str(tmp_path / "full_sft_64.pth"))
    web_demo = REPO_ROOT / "scripts" / "web_demo.py"
    monkeypatch.setattr(sys, "argv", [str(web_demo), "--out_dir", str(tmp_path), "--device", "cpu",
                                      "--max_new_tokens", "48"])
    app = AppTest.from_file(str(web_demo), default_timeout=120)
    app.run()
    app.slider(key="temperature").set_value(0.0)
    app.toggle(key="tools").set_value(True).run()
    app.multiselect(key="tool_names").set_value(["calculator"])
    app.chat_input[0].set_value("What is 37 times 48?").run()
    assert not app.exception
    assistant = app.chat_message[1]
    assert [e.label for e in assistant.expander] == ['🔧 calculator {"expression": "37*48"}']
    assert assistant.code[0].value == '{"result": 1776}'
    assert assistant.markdown[-1].value == "37 × 48 = 1776."


@pytest.mark.slow
def test_eval_bench_tools_task_scores_the_held_out_format(tok, tmp_path):
    from argparse import Namespace
    from evaluation.tasks import TASKS, Subject
    prompt = {"messages": [{"role": "user", "content": "What is 37 times 48?"}], "tools": [CALCULATOR],
              "expected_calls": [{"name": "calculator", "arguments": {"expression": "37*48"}}], "answer": ["1776"]}
    path = write_rows(tmp_path / "tools_eval.jsonl", [prompt, {**prompt, "expected_calls": [], "answer": ["?"]}])
    settings = Namespace(max_questions=0, max_new_tokens=48, gen_batch_size=4, progress=0)
    result = TASKS["tools"].run(fine_tuned_tool_model(), tok, str(path), settings, Subject("m", chat=True))
    assert (result["n"], result["valid_call"], result["answer_with_tools"]) == (2, 1.0, 1.0)
    assert result["no_call_when_not_needed"] == 0.0  # this one-chat model calls the calculator for anything


def test_a_bad_held_out_file_is_named_with_its_line(tmp_path):
    from evaluation.data import EvalDataError
    path = write_rows(tmp_path / "prompts.jsonl", [{"messages": [], "tools": [], "expected_calls": [], "answer": []},
                                                   {"messages": []}])
    with pytest.raises(EvalDataError, match=r"prompts.jsonl:2: missing tools, expected_calls, answer"):
        load_tool_prompts(path)
