"""Talk to a trained MiniMind in the terminal.

    python eval_model.py --model_mode 1                      # menu: [0] auto test, [1] manual input
    python eval_model.py --model_mode 0                      # pretrain model: continues your text
    python eval_model.py --lora_name lora_identity           # full_sft + a LoRA adapter
    python eval_model.py --load 1 --hf_path MiniMind2        # a transformers folder
    python eval_model.py --prompt "你好" --temperature 0      # answer once and exit (scripting)
    python eval_model.py --tools 1 --prompt "What is 37 times 48?"   # with the built-in tools

Replies stream token by token. The weights file is {out_dir}/{stage}_{hidden}{_moe}.pth with
the stage chosen by --model_mode; the size flags must be the ones the model was trained with.
The auto test asks a model trained on the bundled demo data (its {name}_run.json says so)
questions from the demo facts, and any other model MiniMind2's general questions.

--tools 1 offers the built-in tools of model/tools.py (calculator, unit_converter, date_time,
lookup_fact): the model's calls are run and shown (🔧 call, 📎 result) and it answers from the
results, up to --max_tool_rounds rounds of calls per question.
"""
import argparse
import json
import os
import random
import sys
from datetime import datetime

from model.checkpoint import STAGE_OF_MODEL_MODE, run_name
from model.command_line import ArgumentParser, check_size_flags
from model.inference import (Generation, add_model_args, build_prompt_ids, count_parameters, load_model_or_exit,
                             lora_name_of, trim_history)
from model.tools import builtin_registry, engine_stream_reply, print_tool_loop, run_tool_loop

# Built-in prompts for the auto test ([0] in the menu), one list per kind of model.
CONTINUATION_PROMPTS = [  # the pretrain model only continues text
    "人工智能的发展历史可以追溯到",
    "长城是中国古代",
    "水在零摄氏度时会",
    "The capital of France is",
    "地球围绕太阳运动，一年",
    "学习一门新的语言最好的方法是",
]
CHAT_PROMPTS = [
    "你好，请介绍一下你自己。",
    "为什么天空是蓝色的？",
    "请用三句话解释什么是机器学习。",
    "推荐几本适合初学者阅读的历史书。",
    "What is the difference between a list and a tuple in Python?",
    "如果明天下雨，周末的野餐应该怎么安排？",
]
# Questions a model trained on the bundled demo data can answer (they are in dataset/demo/; the
# quickstart trains such models). Asked instead of the lists above when the run used demo data.
DEMO_CONTINUATION_PROMPTS = ["中国的首都是", "A clear sky is", "一年有", "水在"]
DEMO_CHAT_PROMPTS = [
    "你是谁？",
    "Which city is the capital of Germany?",
    "一天有多少小时？",
    "What color is a ripe banana?",
    "猫怎么叫？",
    "What is the largest ocean?",
]
DEMO_REASONING_PROMPTS = [
    "小明有5个苹果，妈妈又给了他6个，小明现在有几个苹果？",
    "小华有3个苹果，妈妈又给了他6个，小华现在有几个苹果？",
]
DEMO_TOOL_PROMPTS = ["What is 37 times 48?", "请计算125加389。", "Convert 10 km to miles.", "今天是几号？",
                     "珠穆朗玛峰的数据是多少？", "你是谁？"]
DEMO_LORA_PROMPTS = {"lora_identity": ["你是谁？", "Who are you?"], "lora_medical": ["我头痛，怎么办？", "失眠有什么办法？"]}
QUIT_WORDS = ("exit", "quit")

LORA_PROMPTS = {  # domain questions for the adapters MiniMind trains
    "lora_identity": [
        "你是谁？",
        "你叫什么名字？是谁训练了你？",
        "Who are you and what can you do?",
    ],
    "lora_medical": [
        "感冒了应该多喝水吗？",
        "长期失眠可能是什么原因引起的？",
        "高血压患者在饮食上要注意什么？",
    ],
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each flag's default."""


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(parser)
    parser.add_argument("--prompt", default=None, help="answer this one prompt and exit")
    parser.add_argument("--temperature", type=float, default=0.85, help="0 = greedy (always the likeliest token)")
    parser.add_argument("--top_p", type=float, default=0.85)
    parser.add_argument("--repetition_penalty", type=float, default=1.0)
    parser.add_argument("--max_new_tokens", type=int, default=8192)
    parser.add_argument("--history_cnt", type=int, default=0,
                        help="earlier turns (question + answer pairs) kept in the prompt; 0 = each question alone")
    parser.add_argument("--seed", type=int, default=None, help="fix the sampling for reproducible replies")
    parser.add_argument("--tools", type=int, default=0, choices=[0, 1],
                        help="1: offer the built-in tools (calculator, unit_converter, date_time, lookup_fact) and "
                             "run the model's calls")
    parser.add_argument("--tool_names", default=None,
                        help="with --tools 1: offer only these built-in tools (comma-separated, e.g. calculator)")
    parser.add_argument("--max_tool_rounds", type=int, default=4, help="rounds of tool calls per question")
    args = parser.parse_args(argv)
    if args.temperature < 0 or not 0 <= args.top_p <= 1 or args.max_new_tokens < 1 or args.history_cnt < 0:
        parser.error("need --temperature >= 0, 0 <= --top_p <= 1, --max_new_tokens >= 1, --history_cnt >= 0")
    if args.tools and args.model_mode == 0:
        parser.error("--tools 1 needs a chat model (--model_mode 1, 2 or 3); the pretrain model only continues text")
    known = builtin_registry().names()
    args.tool_names = args.tool_names.split(",") if args.tool_names else known
    if set(args.tool_names) - set(known):
        parser.error(f"--tool_names: unknown {', '.join(sorted(set(args.tool_names) - set(known)))}; "
                     f"the built-in tools are {', '.join(known)}")
    if args.load == 0:
        check_size_flags(parser, args)
    return args


def trained_on_demo_data(args) -> bool:
    """What the trainer recorded next to the weights ({out_dir}/{name}_run.json): were they (or the
    LoRA adapter) trained on the bundled demo data? False when there is no record (e.g. MiniMind2's
    released weights, or a transformers folder)."""
    if args.load != 0:
        return False
    stage = STAGE_OF_MODEL_MODE[args.model_mode]
    name = run_name(lora_name_of(args) or stage, args.hidden_size, bool(args.use_moe))
    try:
        with open(os.path.join(args.out_dir, f"{name}_run.json"), encoding="utf-8") as f:
            return bool(json.load(f).get("trained_on_demo_data"))
    except (OSError, ValueError):
        return False


def auto_test_prompts(args) -> list[str]:
    demo = trained_on_demo_data(args)
    if args.model_mode == 0:
        return DEMO_CONTINUATION_PROMPTS if demo else CONTINUATION_PROMPTS
    name = lora_name_of(args)
    if name:
        # an adapter named like MiniMind's (lora_identity, lora_medical) gets its domain's questions
        prompts = DEMO_LORA_PROMPTS if demo else LORA_PROMPTS
        return next((questions for key, questions in prompts.items() if key in name), CHAT_PROMPTS)
    if getattr(args, "tools", 0):  # the questions the built-in tools answer
        return DEMO_TOOL_PROMPTS
    if demo:
        return DEMO_REASONING_PROMPTS if args.model_mode == 3 else DEMO_CHAT_PROMPTS
    return CHAT_PROMPTS


def ask(model, tokenizer, args, messages) -> str:
    """Stream the reply to the last message in `messages` to stdout and return it."""
    prompt_ids = build_prompt_ids(tokenizer, trim_history(messages, args.history_cnt), raw=args.model_mode == 0)
    seed = args.seed if args.seed is not None else random.randint(0, 2**31 - 1)
    reply = Generation(model, tokenizer, prompt_ids, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_p=args.top_p,
                       repetition_penalty=args.repetition_penalty, seed=seed)
    for delta in reply:
        print(delta, end="", flush=True)
    print()
    return reply.text


def ask_with_tools(model, tokenizer, args, messages) -> list[dict]:
    """Answer the last message through the tool loop, showing calls and results as they happen;
    returns the messages the loop added (assistant replies and tool results)."""
    seed = args.seed if args.seed is not None else random.randint(0, 2**31 - 1)
    stream_reply = engine_stream_reply(model, tokenizer, max_new_tokens=args.max_new_tokens,
                                       temperature=args.temperature, top_p=args.top_p,
                                       repetition_penalty=args.repetition_penalty, seed=seed)
    history = trim_history(messages, args.history_cnt)
    asked = len(history)
    print_tool_loop(run_tool_loop(stream_reply, history, builtin_registry(now=datetime.now()),
                                  offered=args.tool_names, max_rounds=args.max_tool_rounds))
    return history[asked:]


def questions(mode: str, args):
    """The built-in prompts, or lines typed by the user until EOF / 'exit'."""
    if mode == "0":
        for prompt in auto_test_prompts(args):
            print(f"👶: {prompt}")
            yield prompt
        return
    print(f"type a message and press Enter; {' or '.join(QUIT_WORDS)} (or Ctrl-D) quits")
    while True:
        try:
            prompt = input("👶: ")
        except EOFError:
            return
        if prompt.strip() in QUIT_WORDS:
            return
        if prompt.strip():
            yield prompt


def chat(model, tokenizer, args, mode: str) -> None:
    messages = []
    for prompt in questions(mode, args):
        messages.append({"role": "user", "content": prompt})
        if args.tools:
            messages += ask_with_tools(model, tokenizer, args, messages)
        else:
            print("🤖️: ", end="", flush=True)
            messages.append({"role": "assistant", "content": ask(model, tokenizer, args, messages)})
        print()


def main(argv=None) -> int:
    args = parse_args(argv)
    model, tokenizer = load_model_or_exit(args)
    # with --prompt, stdout carries the reply alone; notes go to stderr
    notes = sys.stderr if args.prompt is not None else sys.stdout
    n_params = count_parameters(model)
    print(f"MiniMind parameters: {n_params / 1e6:.2f} M ({n_params:,}) on {args.device}", file=notes)
    if getattr(model, "lora_summary", None):
        print(model.lora_summary, file=notes)

    if args.prompt is not None:
        (ask_with_tools if args.tools else ask)(model, tokenizer, args, [{"role": "user", "content": args.prompt}])
        return 0
    try:
        mode = input("[0] auto test\n[1] manual input\nchoose 0 or 1: ").strip()
    except EOFError:
        return 0
    if mode not in ("0", "1"):
        print(f"unknown choice {mode!r}: type 0 or 1", file=sys.stderr)
        return 2
    chat(model, tokenizer, args, mode)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C while chatting: leave quietly, as a shell would
        print()
        sys.exit(130)
