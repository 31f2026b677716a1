"""Tool calling: the format, a registry of tools, safe built-ins, a streaming parser and the loop.

The format is minimind-3's (Qwen3 / "Hermes"), rendered by the chat template in
model/tokenizer_config.json; a model asks for a tool by writing

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "37*48"}}
    </tool_call>

and reads the result in the next user turn as <tool_response>\\n...\\n</tool_response>.

Read it in order:
    tool_call_text / assistant_text   an assistant message as the template writes it
    ToolCall, parse_tool_call_body    one <tool_call> block, checked (errors are kept, not raised)
    ToolCallStream, split_tool_calls  find the blocks in streamed text (a tag split across deltas waits)
    Tool, ToolRegistry                named functions with JSON-schema parameters, run safely
    calculator, unit_converter, date_time, lookup_fact   the built-ins (builtin_registry())
    run_tool_loop                     reply -> calls -> results -> reply ..., at most max_rounds
    score_tool_prompts                the held-out benchmark (bench/bench_tools.py, scripts/eval_bench.py)

The front ends share all of this: eval_model.py --tools 1 and the web demo run the loop with the
built-ins; the OpenAI server parses calls into `tool_calls` and leaves running them to its client.
"""
import ast
import json
import math
import operator
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Callable, Iterable, Iterator

from model.engine import held_back_length

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
DEFAULT_MAX_ROUNDS = 4  # tool rounds before the loop stops asking the model


# ----------------------------------------------------------------------------------------------
# The format: what an assistant message with tool calls looks like as text
# ----------------------------------------------------------------------------------------------

def function_of(call: dict) -> dict:
    """{"name", "arguments"} of an OpenAI-shaped call ({"function": {...}}) or a bare one."""
    return call["function"] if isinstance(call.get("function"), dict) else call


def tool_call_text(call: dict) -> str:
    """One call as the template writes it: arguments given as a JSON string are kept verbatim,
    an object is written as json.dumps writes it (the template's tojson)."""
    function = function_of(call)
    arguments = function.get("arguments", {})
    arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return f'{TOOL_CALL_OPEN}\n{{"name": "{function["name"]}", "arguments": {arguments}}}\n{TOOL_CALL_CLOSE}'


def assistant_text(message: dict) -> str:
    """The body of an assistant turn (between "<|im_start|>assistant\\n" and "<|im_end|>"):
    its content, then its calls, each on a new line."""
    content = message.get("content") if isinstance(message.get("content"), str) else ""
    calls = [tool_call_text(call) for call in message.get("tool_calls") or []]
    return content + ("\n" if content and calls else "") + "\n".join(calls)


def json_field(value, what: str):
    """minimind-3's rows store `tools` and `tool_calls` as JSON strings; OpenAI's as objects."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} is a string but not valid JSON ({e})") from e
    return value


# ----------------------------------------------------------------------------------------------
# Parsing what the model wrote
# ----------------------------------------------------------------------------------------------

@dataclass
class ToolCall:
    """One <tool_call> block. `error` says what is wrong with it (None = well-formed); a
    malformed call is kept so that the loop can tell the model instead of crashing."""
    name: str | None
    arguments: dict | None
    text: str  # the block's body as the model wrote it
    error: str | None = None
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_openai(self) -> dict:
        """The OpenAI `tool_calls` entry (arguments as a JSON string)."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


def parse_tool_call_body(body: str) -> ToolCall:
    text = body.strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return ToolCall(None, None, text, f"the call is not valid JSON ({e.msg} at character {e.pos})")
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        return ToolCall(None, None, text, 'the call must be a JSON object with a string "name"')
    arguments = data.get("arguments", {})
    if isinstance(arguments, str):  # some writers double-encode the arguments
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        return ToolCall(data["name"], None, text, '"arguments" must be a JSON object')
    return ToolCall(data["name"], arguments, text)


class ToolCallStream:
    """Splits streamed reply text into content and tool calls.

        stream = ToolCallStream()
        for delta in deltas:
            for kind, value in stream.feed(delta):   # ("content", str) or ("call", ToolCall)
                ...
        events = stream.flush()                      # the end: an unclosed block becomes a malformed call

    Text that may be the start of a tag is held until the next delta settles it, and the
    whitespace around a block (the template's newlines) is not content."""

    def __init__(self):
        self.held = ""
        self.inside = False
        self.after_call = False

    def feed(self, text: str) -> list[tuple[str, object]]:
        self.held += text
        events = []
        while True:
            tag = TOOL_CALL_CLOSE if self.inside else TOOL_CALL_OPEN
            index = self.held.find(tag)
            if index < 0:
                break
            before, self.held = self.held[:index], self.held[index + len(tag):]
            if self.inside:
                events.append(("call", parse_tool_call_body(before)))
                self.after_call = True
            else:
                self.add_content(events, before.rstrip())
            self.inside = not self.inside
        if not self.inside:
            keep = held_back_length(self.held, (TOOL_CALL_OPEN,))
            certain = self.held[:len(self.held) - keep]
            settled = certain.rstrip()  # trailing whitespace may be the glue before a block
            self.add_content(events, settled)
            self.held = certain[len(settled):] + self.held[len(self.held) - keep:]
        return events

    def add_content(self, events: list, text: str) -> None:
        if self.after_call:
            text = text.lstrip()
        if text:
            self.after_call = False
            events.append(("content", text))

    def flush(self) -> list[tuple[str, object]]:
        events = []
        if self.inside:
            events.append(("call", ToolCall(None, None, self.held.strip(),
                                            f"the reply ended inside a call (no {TOOL_CALL_CLOSE})")))
        else:
            self.add_content(events, self.held.rstrip())
        self.held, self.inside = "", False
        return events


def split_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """(content without the blocks, the calls) of a whole reply."""
    stream = ToolCallStream()
    content, calls = "", []
    for kind, value in stream.feed(text) + stream.flush():
        if kind == "content":
            content += value
        else:
            calls.append(value)
    return content, calls


# ----------------------------------------------------------------------------------------------
# Tools and the registry
# ----------------------------------------------------------------------------------------------

class ToolError(Exception):
    """A tool refused its arguments; the message goes back to the model as the result."""


JSON_TYPES = {"string": (str,), "number": (int, float), "integer": (int,), "boolean": (bool,),
              "object": (dict,), "array": (list,)}


@dataclass
class Tool:
    """A function the model may call: its name, what it does and its JSON-schema parameters."""
    name: str
    description: str
    parameters: dict
    function: Callable[..., object]

    def schema(self) -> dict:
        """OpenAI's tool shape, which is also what the template lists in <tools>."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def check_arguments(self, arguments: dict) -> None:
        properties = self.parameters.get("properties", {})
        missing = [name for name in self.parameters.get("required", []) if name not in arguments]
        unknown = [name for name in arguments if name not in properties]
        if missing or unknown:
            problems = ([f"missing {', '.join(missing)}"] if missing else []) + \
                       ([f"unknown {', '.join(unknown)}"] if unknown else [])
            raise ToolError(f"bad arguments for {self.name}: {'; '.join(problems)} "
                            f"(parameters: {', '.join(properties) or 'none'})")
        for name, value in arguments.items():
            wanted = JSON_TYPES.get(properties[name].get("type"))
            if wanted and (not isinstance(value, wanted) or (isinstance(value, bool) and bool not in wanted)):
                raise ToolError(f"bad arguments for {self.name}: {name} must be a {properties[name]['type']}, "
                                f"got {json.dumps(value, ensure_ascii=False)}")


class ToolRegistry:
    """Tools by name. run() never raises: whatever goes wrong becomes {"error": ...} for the model."""

    def __init__(self, tools: Iterable[Tool] = ()):
        self.tools = {tool.name: tool for tool in tools}

    def __contains__(self, name) -> bool:
        return name in self.tools

    def names(self) -> list[str]:
        return list(self.tools)

    def schemas(self, names: Iterable[str] | None = None) -> list[dict]:
        return [self.tools[name].schema() for name in (self.names() if names is None else names)]

    def check(self, call: ToolCall, offered: Iterable[str] | None = None) -> str | None:
        """What is wrong with a call before running it, or None."""
        if call.error:
            return call.error
        allowed = self.names() if offered is None else [n for n in offered if n in self.tools]
        if call.name not in allowed:
            return f"unknown tool {call.name!r}; available: {', '.join(allowed) or 'none'}"
        try:
            self.tools[call.name].check_arguments(call.arguments)
        except ToolError as e:
            return str(e)
        return None

    def run(self, call: ToolCall, offered: Iterable[str] | None = None) -> str:
        """The result as the JSON text the model reads in <tool_response>."""
        problem = self.check(call, offered)
        if problem is None:
            try:
                result = self.tools[call.name].function(**call.arguments)
            except ToolError as e:
                problem = str(e)
            except Exception as e:  # a tool's own bug must not end the conversation
                problem = f"{call.name} failed: {type(e).__name__}: {e}"
        if problem is not None:
            return json.dumps({"error": problem}, ensure_ascii=False)
        return json.dumps(result, ensure_ascii=False)


# ----------------------------------------------------------------------------------------------
# The built-in tools: safe by construction (no eval, no files, no network)
# ----------------------------------------------------------------------------------------------

BINARY_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
                    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
                    ast.Pow: operator.pow}
UNARY_OPERATORS = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPRESSION_LENGTH = 200
MAX_EXPONENT = 100
MAX_MAGNITUDE = 1e100
# what people and small models write for the operators
OPERATOR_SPELLINGS = {"×": "*", "÷": "/", "^": "**", "（": "(", "）": ")", "−": "-"}


def arithmetic(node: ast.AST):
    """Value of an arithmetic syntax tree: numbers, + - * / // % **, unary +/-, brackets. Any
    other node (names, calls, attributes, strings, comparisons, ...) is refused."""
    if isinstance(node, ast.Expression):
        return arithmetic(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY_OPERATORS:
        return UNARY_OPERATORS[type(node.op)](arithmetic(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY_OPERATORS:
        left, right = arithmetic(node.left), arithmetic(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > MAX_EXPONENT or abs(left) > MAX_MAGNITUDE ** 0.01):
            raise ToolError(f"the power {left}**{right} is too large")
        try:
            value = BINARY_OPERATORS[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        if isinstance(value, complex) or abs(value) > MAX_MAGNITUDE:
            raise ToolError("the result is out of range")
        return value
    raise ToolError(f"only arithmetic is allowed (numbers, + - * / // % ** and brackets), "
                    f"not {type(node).__name__}")


def tidy_number(value):
    """4.0 -> 4, 0.1 + 0.2 -> 0.3: what a person expects to read."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ToolError("the result is not a finite number")
        value = round(value, 10)
        return int(value) if value.is_integer() else value
    return value


def calculator(expression: str) -> dict:
    if len(expression) > MAX_EXPRESSION_LENGTH:
        raise ToolError(f"the expression is longer than {MAX_EXPRESSION_LENGTH} characters")
    for spelling, python in OPERATOR_SPELLINGS.items():
        expression = expression.replace(spelling, python)
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ToolError(f"cannot parse {expression!r} as arithmetic") from None
    return {"result": tidy_number(arithmetic(tree))}


# unit -> (quantity, factor to the base unit); temperatures are converted apart
UNITS = {"m": ("length", 1.0), "km": ("length", 1000.0), "cm": ("length", 0.01), "mm": ("length", 0.001),
         "mile": ("length", 1609.344), "ft": ("length", 0.3048), "inch": ("length", 0.0254),
         "kg": ("mass", 1.0), "g": ("mass", 0.001), "lb": ("mass", 0.45359237), "oz": ("mass", 0.028349523125),
         "celsius": ("temperature", None), "fahrenheit": ("temperature", None), "kelvin": ("temperature", None)}
UNIT_ALIASES = {"meter": "m", "meters": "m", "metre": "m", "米": "m", "kilometer": "km", "kilometers": "km",
                "公里": "km", "千米": "km", "厘米": "cm", "毫米": "mm", "miles": "mile", "mi": "mile", "英里": "mile",
                "feet": "ft", "foot": "ft", "英尺": "ft", "inches": "inch", "in": "inch", "英寸": "inch",
                "kilogram": "kg", "kilograms": "kg", "公斤": "kg", "千克": "kg", "gram": "g", "grams": "g", "克": "g",
                "pound": "lb", "pounds": "lb", "lbs": "lb", "磅": "lb", "ounce": "oz", "ounces": "oz", "盎司": "oz",
                "c": "celsius", "°c": "celsius", "摄氏度": "celsius", "f": "fahrenheit", "°f": "fahrenheit",
                "华氏度": "fahrenheit", "k": "kelvin", "开尔文": "kelvin"}


def canonical_unit(name: str) -> str:
    unit = UNIT_ALIASES.get(name.strip().lower(), name.strip().lower())
    if unit not in UNITS:
        raise ToolError(f"unknown unit {name!r}; known: {', '.join(UNITS)}")
    return unit


def to_kelvin(value: float, unit: str) -> float:
    return {"celsius": value + 273.15, "fahrenheit": (value - 32) * 5 / 9 + 273.15, "kelvin": value}[unit]


def from_kelvin(value: float, unit: str) -> float:
    return {"celsius": value - 273.15, "fahrenheit": (value - 273.15) * 9 / 5 + 32, "kelvin": value}[unit]


def unit_converter(value: float, from_unit: str, to_unit: str) -> dict:
    source, target = canonical_unit(from_unit), canonical_unit(to_unit)
    (quantity, factor), (target_quantity, target_factor) = UNITS[source], UNITS[target]
    if quantity != target_quantity:
        raise ToolError(f"cannot convert {quantity} ({source}) to {target_quantity} ({target})")
    if quantity == "temperature":
        converted = from_kelvin(to_kelvin(value, source), target)
    else:
        converted = value * factor / target_factor
    return {"result": tidy_number(round(converted, 2)), "unit": target}


DEMO_NOW = datetime(2026, 1, 15, 9, 30)  # the demo data's "now": answers stay the same on any day
MAX_DAYS = 36500


def make_date_time(now: datetime) -> Callable[..., dict]:
    """A date/time tool that reads the given `now` (the demo data and tests need a fixed one)."""
    def date_time(days_from_now: int = 0) -> dict:
        if abs(days_from_now) > MAX_DAYS:
            raise ToolError(f"days_from_now must be within ±{MAX_DAYS}")
        day = now + timedelta(days=days_from_now)
        return {"date": day.strftime("%Y-%m-%d"), "weekday": day.strftime("%A"), "time": now.strftime("%H:%M")}
    return date_time


# A small table of demo facts (approximate public figures), with English and Chinese topic names.
DEMO_FACTS = {
    "mount everest": ("珠穆朗玛峰", "8849 m", "height"),
    "yangtze river": ("长江", "6300 km", "length"),
    "nile river": ("尼罗河", "6650 km", "length"),
    "great wall": ("长城", "21196 km", "length"),
    "speed of light": ("光速", "299792 km/s", "speed"),
    "moon distance": ("月球距离", "384400 km", "average distance from the Earth"),
    "earth radius": ("地球半径", "6371 km", "mean radius"),
    "water boiling point": ("水的沸点", "100 °C", "boiling point at sea level"),
    "pacific ocean depth": ("太平洋深度", "10935 m", "greatest depth"),
    "eiffel tower": ("埃菲尔铁塔", "330 m", "height"),
    "mount fuji": ("富士山", "3776 m", "height"),
    "lake baikal depth": ("贝加尔湖深度", "1642 m", "greatest depth"),
    "amazon river": ("亚马孙河", "6400 km", "length"),
    "sun distance": ("太阳距离", "149600000 km", "average distance from the Earth"),
    "mars diameter": ("火星直径", "6779 km", "diameter"),
    "human bones": ("人体骨骼", "206", "number of bones in an adult"),
}
FACT_TOPIC_OF_NAME = {name: topic for topic, (zh, _, _) in DEMO_FACTS.items() for name in (topic, zh)}


def lookup_fact(topic: str) -> dict:
    key = FACT_TOPIC_OF_NAME.get(topic.strip().lower())
    if key is None:
        raise ToolError(f"no fact about {topic!r} in the demo table")
    _, value, what = DEMO_FACTS[key]
    return {"topic": key, "fact": what, "value": value}


def builtin_tools(now: datetime = DEMO_NOW) -> list[Tool]:
    return [
        Tool("calculator", "Evaluate an arithmetic expression",
             {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
             calculator),
        Tool("unit_converter", "Convert a value between units of length, mass or temperature",
             {"type": "object", "properties": {"value": {"type": "number"}, "from_unit": {"type": "string"},
                                               "to_unit": {"type": "string"}},
              "required": ["value", "from_unit", "to_unit"]},
             unit_converter),
        Tool("date_time", "Today's date, weekday and time, or the date some days from now",
             {"type": "object", "properties": {"days_from_now": {"type": "integer"}}, "required": []},
             make_date_time(now)),
        Tool("lookup_fact", "Look up a fact in a small table",
             {"type": "object", "properties": {"topic": {"type": "string"}}, "required": ["topic"]},
             lookup_fact),
    ]


def builtin_registry(now: datetime = DEMO_NOW) -> ToolRegistry:
    return ToolRegistry(builtin_tools(now))


# ----------------------------------------------------------------------------------------------
# The loop: reply, run the calls, hand back the results, reply again
# ----------------------------------------------------------------------------------------------

@dataclass
class ToolEvent:
    """What the loop reports, in order: "content" (a piece of reply text), "call" (a parsed
    call), "result" (its result text, after the call), "round" (a reply ended)."""
    kind: str
    text: str = ""
    call: ToolCall | None = None


def assistant_message(content: str, calls: list[ToolCall]) -> dict:
    """The reply as a history message. Well-formed calls are kept as structured tool_calls (the
    template writes them back as the model is trained to write them); a reply with a malformed
    call keeps its text as written, so the model sees its own mistake next to the error."""
    if all(call.error is None for call in calls):
        return {"role": "assistant", "content": content,
                "tool_calls": [call.as_openai() for call in calls]} if calls else {"role": "assistant",
                                                                                     "content": content}
    raw = content + ("\n" if content else "") + "\n".join(
        f"{TOOL_CALL_OPEN}\n{call.text}\n{TOOL_CALL_CLOSE}" for call in calls)
    return {"role": "assistant", "content": raw}


def run_tool_loop(stream_reply: Callable[[list, list], Iterator[str]], messages: list[dict],
                  registry: ToolRegistry, offered: list[str] | None = None,
                  max_rounds: int = DEFAULT_MAX_ROUNDS) -> Iterator[ToolEvent]:
    """Talk with tools until the model answers without calling one (or max_rounds of calls).

    stream_reply(messages, tool_schemas) yields a reply's text deltas. `messages` is extended in
    place with the assistant replies and tool results, so the caller keeps the whole exchange.
    After max_rounds rounds of calls the model gets one last turn with the results."""
    schemas = registry.schemas(offered)
    for round_number in range(max_rounds + 1):
        content, calls = "", []
        for kind, value in parsed_reply(stream_reply(messages, schemas)):
            if kind == "content":
                content += value
                yield ToolEvent("content", text=value)
            else:
                calls.append(value)
                yield ToolEvent("call", call=value)
        messages.append(assistant_message(content, calls))
        yield ToolEvent("round")
        if not calls or round_number == max_rounds:
            return
        for call in calls:
            result = registry.run(call, offered)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
            yield ToolEvent("result", text=result, call=call)


def parsed_reply(deltas: Iterable[str]) -> Iterator[tuple[str, object]]:
    """("content", text) and ("call", ToolCall) events of a streamed reply, as they become certain."""
    stream = ToolCallStream()
    for delta in deltas:
        yield from stream.feed(delta)
    yield from stream.flush()


def engine_stream_reply(model, tokenizer, max_new_tokens: int = 256, **sampling) -> Callable:
    """stream_reply for run_tool_loop: one reply at a time on the generation engine."""
    from model.inference import Generation, build_prompt_ids

    def stream_reply(messages, schemas):
        prompt_ids = build_prompt_ids(tokenizer, messages, tools=schemas or None)
        yield from Generation(model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, **sampling)
    return stream_reply


# ----------------------------------------------------------------------------------------------
# Scoring: held-out prompts with their expected calls and answers (dataset/demo/tools_eval.jsonl)
# ----------------------------------------------------------------------------------------------

def same_value(expected, got) -> bool:
    """Numbers by value (5 == 5.0), strings ignoring spaces and case ("37 * 48" == "37*48")."""
    if isinstance(expected, str) and isinstance(got, str):
        return "".join(expected.split()).casefold() == "".join(got.split()).casefold()
    if isinstance(expected, (int, float)) and isinstance(got, (int, float)) and not isinstance(got, bool):
        return expected == got
    return expected == got


def same_arguments(expected: dict, got: dict | None) -> bool:
    return isinstance(got, dict) and expected.keys() == got.keys() and all(
        same_value(expected[k], got[k]) for k in expected)


@dataclass
class PromptRun:
    """One held-out prompt going through the loop: its messages grow round by round."""
    row: dict
    messages: list
    offered: list
    rounds: list = field(default_factory=list)  # (content, [ToolCall]) per reply
    done: bool = False


def load_tool_prompts(path) -> list[dict]:
    """The rows of a held-out file, checked: messages, tools, expected_calls, answer. Raises
    evaluation.data.EvalDataError naming the file and line."""
    from evaluation.data import EvalDataError, read_jsonl
    rows = []
    for number, row in read_jsonl(str(path)):
        missing = [key for key in ("messages", "tools", "expected_calls", "answer") if key not in row]
        if missing:
            raise EvalDataError(f"{path}:{number}: missing {', '.join(missing)}")
        rows.append(row)
    return rows


def run_prompts_through_loop(model, tokenizer, runs: list[PromptRun], registry: ToolRegistry, with_tools: bool,
                             max_new_tokens: int, max_rounds: int, batch_size: int) -> None:
    """All prompts together, greedy, one batched engine call per round."""
    from model.engine import Engine, SamplingParams
    from model.inference import build_prompt_ids
    engine = Engine(model, tokenizer, max_batch_size=batch_size,
                    max_seq_len=min(model.config.max_position_embeddings, 2048))
    for round_number in range(max_rounds + 1):
        active = [run for run in runs if not run.done]
        if not active:
            return
        prompts = [build_prompt_ids(tokenizer, run.messages, tools=registry.schemas(run.offered) if with_tools
                                    else None) for run in active]
        replies = engine.generate(prompts, SamplingParams(max_tokens=max_new_tokens, temperature=0.0))
        for run, reply in zip(active, replies):
            content, calls = split_tool_calls(reply.text)
            run.rounds.append((content, calls))
            run.messages.append(assistant_message(content, calls))
            if not calls or round_number == max_rounds:
                run.done = True
                continue
            for call in calls:
                run.messages.append({"role": "tool", "tool_call_id": call.id,
                                     "content": registry.run(call, run.offered)})


def score_run(run: PromptRun, registry: ToolRegistry) -> dict:
    expected = run.row["expected_calls"]
    content, calls = run.rounds[0]
    names = [call.name for call in calls]
    final = run.rounds[-1][0]
    right_tool = bool(calls) and names == [e["name"] for e in expected]
    return {
        "prompt": run.row["messages"][-1]["content"],
        "expects_call": bool(expected),
        "called": bool(calls),
        "valid_call": bool(calls) and all(registry.check(call, run.offered) is None for call in calls),
        "right_tool": right_tool,
        "exact_arguments": right_tool and all(same_arguments(e["arguments"], call.arguments)
                                              for e, call in zip(expected, calls)),
        "answer_right": all(key in final for key in run.row["answer"]),
        "rounds": len(run.rounds),
        "calls": [call.text for call in calls],
        "final_answer": final,
    }


def share(rows: list[dict], key: str) -> float | None:
    return round(sum(row[key] for row in rows) / len(rows), 4) if rows else None


def score_tool_prompts(model, tokenizer, rows: list[dict], registry: ToolRegistry | None = None,
                       max_new_tokens: int = 128, max_rounds: int = 3, batch_size: int = 16,
                       without_tools: bool = True) -> dict:
    """Run held-out prompts through the tool loop (greedy) and score them.

    Prompts that need a tool: valid_call (well-formed, offered tool, arguments fit its schema),
    right_tool (the expected tools in order), exact_arguments (values equal; strings up to
    spaces and case), answer (every answer key in the final reply). Prompts with tools offered
    but not needed: no_call and answer. without_tools=True asks the tool prompts again with no
    tools offered: what the model answers on its own (the tools' worth)."""
    registry = registry or builtin_registry()

    def runs(selected):
        return [PromptRun(row, [dict(m) for m in row["messages"]],
                          [function_of(tool)["name"] for tool in row["tools"]]) for row in selected]

    with_tools = runs(rows)
    run_prompts_through_loop(model, tokenizer, with_tools, registry, True, max_new_tokens, max_rounds, batch_size)
    scored = [score_run(run, registry) for run in with_tools]
    tool_rows = [row for row in scored if row["expects_call"]]
    plain_rows = [row for row in scored if not row["expects_call"]]
    result = {
        "prompts": len(scored), "tool_prompts": len(tool_rows), "no_tool_prompts": len(plain_rows),
        "valid_call": share(tool_rows, "valid_call"), "right_tool": share(tool_rows, "right_tool"),
        "exact_arguments": share(tool_rows, "exact_arguments"), "answer_with_tools": share(tool_rows, "answer_right"),
        "no_call_when_not_needed": round(1 - share(plain_rows, "called"), 4) if plain_rows else None,
        "answer_when_not_needed": share(plain_rows, "answer_right"),
        "answer_all": share(scored, "answer_right"),
    }
    if without_tools and tool_rows:
        alone = runs([row for row in rows if row["expected_calls"]])
        run_prompts_through_loop(model, tokenizer, alone, registry, False, max_new_tokens, 0, batch_size)
        result["answer_without_tools"] = share([score_run(run, registry) for run in alone], "answer_right")
    result["rows"] = scored
    return result


# ----------------------------------------------------------------------------------------------
# Showing the loop in a terminal (eval_model.py --tools 1, the quickstart's demo)
# ----------------------------------------------------------------------------------------------

def describe_call(call: ToolCall) -> str:
    if call.error:
        return f"malformed call {call.text!r}: {call.error}"
    return f"{call.name} {json.dumps(call.arguments, ensure_ascii=False)}"


def print_tool_loop(events: Iterable[ToolEvent], file=None) -> None:
    """The replies streamed after 🤖️, each call (🔧) and result (📎) on a line of its own."""
    import sys
    file = file or sys.stdout
    line_open = False
    for event in events:
        if event.kind == "content":
            print(event.text if line_open else f"🤖️: {event.text}", end="", flush=True, file=file)
            line_open = True
            continue
        if line_open:
            print(file=file)
            line_open = False
        if event.kind == "call":
            print(f"🔧 {describe_call(event.call)}", flush=True, file=file)
        elif event.kind == "result":
            print(f"📎 {event.text}", flush=True, file=file)
