"""Talk to a trained MiniMind in the terminal.

    python eval_model.py --model_mode 1                      # menu: [0] auto test, [1] manual input
    python eval_model.py --model_mode 0                      # pretrain model: continues your text
    python eval_model.py --lora_name lora_identity           # full_sft + a LoRA adapter
    python eval_model.py --load 1 --hf_path MiniMind2        # a transformers folder
    python eval_model.py --prompt "你好" --temperature 0      # answer once and exit (scripting)

Replies stream token by token. The weights file is {out_dir}/{stage}_{hidden}{_moe}.pth with
the stage chosen by --model_mode; the size flags must be the ones the model was trained with.
"""
import argparse
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the repository root

from model.inference import (Generation, ModelLoadError, add_model_args, build_prompt_ids, count_parameters,
                             load_model, lora_name_of, trim_history)

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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--prompt", default=None, help="answer this one prompt and exit")
    parser.add_argument("--temperature", type=float, default=0.85, help="0 = greedy (always the likeliest token)")
    parser.add_argument("--top_p", type=float, default=0.85)
    parser.add_argument("--repetition_penalty", type=float, default=1.0)
    parser.add_argument("--max_new_tokens", type=int, default=8192)
    parser.add_argument("--history_cnt", type=int, default=0,
                        help="earlier turns (question + answer pairs) kept in the prompt; 0 = each question alone")
    parser.add_argument("--seed", type=int, default=None, help="fix the sampling for reproducible replies")
    args = parser.parse_args(argv)
    if args.temperature < 0 or not 0 <= args.top_p <= 1 or args.max_new_tokens < 1 or args.history_cnt < 0:
        parser.error("need --temperature >= 0, 0 <= --top_p <= 1, --max_new_tokens >= 1, --history_cnt >= 0")
    return args


def auto_test_prompts(args) -> list[str]:
    if args.model_mode == 0:
        return CONTINUATION_PROMPTS
    name = lora_name_of(args)
    if name:
        # an adapter named like MiniMind's (lora_identity, lora_medical) gets its domain's questions
        return next((prompts for key, prompts in LORA_PROMPTS.items() if key in name), CHAT_PROMPTS)
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


def questions(mode: str, args):
    """The built-in prompts, or lines typed by the user until EOF / 'exit'."""
    if mode == "0":
        for prompt in auto_test_prompts(args):
            print(f"👶: {prompt}")
            yield prompt
        return
    while True:
        try:
            prompt = input("👶: ")
        except EOFError:
            return
        if prompt.strip() in ("exit", "quit"):
            return
        if prompt.strip():
            yield prompt


def chat(model, tokenizer, args, mode: str) -> None:
    messages = []
    for prompt in questions(mode, args):
        messages.append({"role": "user", "content": prompt})
        print("🤖️: ", end="", flush=True)
        answer = ask(model, tokenizer, args, messages)
        messages.append({"role": "assistant", "content": answer})
        print()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        model, tokenizer = load_model(args)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # with --prompt, stdout carries the reply alone; notes go to stderr
    notes = sys.stderr if args.prompt is not None else sys.stdout
    n_params = count_parameters(model)
    print(f"MiniMind parameters: {n_params / 1e6:.2f} M ({n_params:,}) on {args.device}", file=notes)

    if args.prompt is not None:
        ask(model, tokenizer, args, [{"role": "user", "content": args.prompt}])
        return 0
    try:
        mode = input("[0] auto test\n[1] manual input\n").strip()
    except EOFError:
        return 0
    if mode not in ("0", "1"):
        print(f"unknown choice {mode!r}: type 0 or 1", file=sys.stderr)
        return 2
    chat(model, tokenizer, args, mode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
