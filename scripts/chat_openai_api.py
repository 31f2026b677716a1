"""Chat in the terminal with a MiniMind served by scripts/serve_openai_api.py, through the
official `openai` client (so it works against any OpenAI-compatible server).

    python scripts/serve_openai_api.py &                        # in another terminal
    python scripts/chat_openai_api.py                            # type, Enter; 'exit' or Ctrl-D ends
    python scripts/chat_openai_api.py --once "你好"               # one question, then exit
    printf '你好\\n你是谁？\\n' | python scripts/chat_openai_api.py  # questions from stdin

Replies stream; reasoning (`reasoning_content`) is printed apart from the answer. The last
--history_cnt question/answer pairs are sent along with each new question.
"""
import argparse
import os
import sys

from openai import OpenAI, OpenAIError


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base_url", default="http://127.0.0.1:8998/v1")
    parser.add_argument("--api_key", default=os.environ.get("OPENAI_API_KEY", "none"),
                        help="the server's --api_key (default: $OPENAI_API_KEY; any text when the server has none)")
    parser.add_argument("--model", default="minimind")
    parser.add_argument("--system", default=None, help="a system message sent first")
    parser.add_argument("--temperature", type=float, default=0.85)
    parser.add_argument("--top_p", type=float, default=0.85)
    parser.add_argument("--max_tokens", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--history_cnt", type=int, default=2,
                        help="earlier question/answer pairs sent with each question (0 = none)")
    parser.add_argument("--once", default=None, metavar="TEXT", help="ask one question, print the answer, exit")
    return parser.parse_args(argv)


def questions(args):
    """--once, or lines from stdin (typed or piped) until EOF or 'exit'."""
    if args.once is not None:
        yield args.once
        return
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("👶: " if interactive else "")
        except EOFError:
            return
        if line.strip() in ("exit", "quit"):
            return
        if line.strip():
            yield line


def stream_reply(client: OpenAI, args, messages: list[dict]) -> str:
    """Print the reply as it arrives; return the answer (without the reasoning)."""
    out = sys.stdout
    stream = client.chat.completions.create(
        model=args.model, messages=messages, stream=True, temperature=args.temperature, top_p=args.top_p,
        max_tokens=args.max_tokens, seed=args.seed)
    answer, thinking = "", False
    for event in stream:
        if not event.choices:
            continue
        delta = event.choices[0].delta
        reasoning = getattr(delta, "reasoning_content", None)  # an extra field, as DeepSeek's API sends it
        if reasoning:
            if not thinking:
                out.write("[thinking] ")
                thinking = True
            out.write(reasoning)
        if delta.content:
            if thinking:
                out.write("\n[answer] ")
                thinking = False
            out.write(delta.content)
            answer += delta.content
        out.flush()
    out.write("\n")
    return answer


def main(argv=None) -> int:
    args = parse_args(argv)
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    for question in questions(args):
        kept = history[len(history) - 2 * args.history_cnt:] if args.history_cnt > 0 else []
        messages = system + kept + [{"role": "user", "content": question}]
        if sys.stdin.isatty() and args.once is None:
            print("🤖️: ", end="", flush=True)
        try:
            answer = stream_reply(client, args, messages)
        except OpenAIError as e:
            print(f"error from {args.base_url}: {e}", file=sys.stderr)
            return 1
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return 0


if __name__ == "__main__":
    sys.exit(main())
