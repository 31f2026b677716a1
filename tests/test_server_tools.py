"""Tool calling through the OpenAI-compatible server with the official `openai` client: a model
fine-tuned on one calculator conversation (tests/tool_helpers.py) really calls the tool; the
client parses the tool_calls (whole and streamed) and sends the result back for the answer."""
import json

import openai
import pytest

from model.checkpoint import save_weights
from test_server import API_KEY, running_server
from tool_helpers import CALCULATOR, fine_tuned_tool_model

pytestmark = pytest.mark.slow  # a server subprocess
QUESTION = [{"role": "user", "content": "What is 37 times 48?"}]
NAMED = {"type": "function", "function": {"name": "calculator"}}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tool_out")
    save_weights(fine_tuned_tool_model(), str(out_dir / "full_sft_64.pth"))
    with running_server(out_dir, out_dir / "server.log", "--api_key", API_KEY, "--context_length", "1024") as url:
        yield openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0, timeout=60)


def ask(client, messages, **options):
    return client.chat.completions.create(model="minimind", messages=messages, tools=[CALCULATOR], temperature=0,
                                          max_tokens=48, **options)


def assert_calculator_call(choice):
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "calculator"
    assert json.loads(call.function.arguments) == {"expression": "37*48"}
    return call


@pytest.mark.parametrize("tool_choice", [None, "auto", "required", NAMED])
def test_the_reply_is_a_tool_call_and_the_result_gets_the_answer(client, tool_choice):
    options = {} if tool_choice is None else {"tool_choice": tool_choice}
    first = ask(client, QUESTION, **options).choices[0]
    call = assert_calculator_call(first)
    assert first.message.content is None
    history = QUESTION + [first.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": '{"result": 1776}'}]
    second = ask(client, history).choices[0]
    assert second.finish_reason == "stop" and second.message.content == "37 × 48 = 1776."
    assert not second.message.tool_calls


def test_streamed_tool_calls_are_assembled_by_the_client(client):
    with client.chat.completions.stream(model="minimind", messages=QUESTION, tools=[CALCULATOR], temperature=0,
                                        max_tokens=48) as stream:
        events = [event.type for event in stream]
        completion = stream.get_final_completion()
    assert "tool_calls.function.arguments.done" in events
    call = assert_calculator_call(completion.choices[0])
    # the raw chunks: one tool_calls delta with everything, then the finish chunk
    chunks = list(client.chat.completions.create(model="minimind", messages=QUESTION, tools=[CALCULATOR],
                                                 temperature=0, max_tokens=48, stream=True))
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(deltas) == 1 and deltas[0][0].index == 0 and deltas[0][0].function.name == call.function.name
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_leaves_the_tools_out(client):
    """No tools block in the prompt, and no tool_calls in the reply (this one-chat model writes
    its call anyway: with tool_choice "none" that is text)."""
    offered, refused = ask(client, QUESTION), ask(client, QUESTION, tool_choice="none")
    assert refused.usage.prompt_tokens < offered.usage.prompt_tokens - 100  # the tools block is gone
    assert refused.choices[0].finish_reason in ("stop", "length") and not refused.choices[0].message.tool_calls


def test_compact_client_arguments_are_sent_to_the_model_as_it_was_trained(client):
    """Clients write arguments as they like ('{"expression":"37*48"}'); the prompt gets the
    trained form back, so the answer is the same."""
    history = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_x", "type": "function", "function": {"name": "calculator", "arguments": '{"expression":"37*48"}'}}]},
        {"role": "tool", "tool_call_id": "call_x", "content": '{"result": 1776}'}]
    assert ask(client, history).choices[0].message.content == "37 × 48 = 1776."
    with pytest.raises(openai.BadRequestError, match="tool_call_id"):
        ask(client, history[:2] + [{**history[2], "tool_call_id": "call_y"}])
