"""The newcomer's path: from a fresh clone to a model you trained yourself, answering questions.

    python scripts/quickstart.py          # CPU: about 6-7 minutes on 2 cores; on a CUDA machine it uses the GPU
    python scripts/quickstart.py --tiny   # an even smaller model and fewer steps (what the test suite runs)
    python scripts/quickstart.py --tools 1  # + the pretraining that makes tool calls work (about an hour more on 2 CPU cores)

It trains a small MiniMind on the bundled demo data (dataset/demo/) through the stages of the
real recipe, each one through its own command line, printed before it starts so that you can
run it again, change a flag, or swap in the full data set:

    pretrain -> full SFT -> DPO -> reasoning distillation, and a LoRA adapter on the SFT model,
    and online RL (GRPO) on the SFT model with before/after accuracy on held-out demo sums

(the SFT stage also learns tool calling from dataset/demo/sft_tools.jsonl), then asks the trained
models a few questions from the demo data (greedy decoding), lets the SFT model answer one
question through the calculator tool, draws the loss and learning-rate curves of every stage
into out/quickstart_metrics.png, scores every stage on the held-out demo sets
(scripts/eval_bench.py: bits per byte, multiple choice, arithmetic) into a table and
out/quickstart_eval.png, and says what to run next. Weights, metrics and resume states stay in
out/ and checkpoints/ like any other run.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)


@dataclass
class Size:
    """Model shape and how long each stage trains: whole epochs (so the learning-rate schedule
    runs its full course), optionally cut short after max_steps optimizer steps."""
    hidden_size: int
    num_hidden_layers: int
    max_seq_len: int
    epochs: dict        # stage -> epochs over its demo file (--tools 1: passes over the pretraining data)
    max_steps: int = 0  # 0 = all epochs
    grpo_steps: int = 40  # the GRPO stage is cut to this many steps (its demo file holds 1000 prompts)
    sft_max_seq_len: int = 640  # full SFT: a tool conversation (tools block, call, result, answer) is 260-640 tokens
    long_max_seq_len: int = 1024  # --tools 1: the rows of joined documents (longer than any tool conversation)
    tool_transcripts: int = 12000  # --tools 1: new tool transcripts in each pass over the 3,000 demo pretraining lines

    def flags(self, stage: str = "") -> list[str]:
        max_seq_len = {"full_sft": self.sft_max_seq_len, "pretrain_long": self.long_max_seq_len}.get(
            stage, self.max_seq_len)
        return ["--hidden_size", str(self.hidden_size), "--num_hidden_layers", str(self.num_hidden_layers),
                "--max_seq_len", str(max_seq_len)]


# The default is sized for a 2-core CPU (about 6-7 minutes in all); --tiny is for the test suite.
SIZES = {
    "default": Size(hidden_size=256, num_hidden_layers=4, max_seq_len=128,
                    # reason: 10 epochs (was 6); with MiniMind2's init and LR curve, 6 left 5+6=10
                    epochs={"pretrain": 2, "pretrain_long": 6, "full_sft": 2, "rlhf": 1, "reason": 10, "lora": 3,
                            "grpo": 1}),
    "tiny": Size(hidden_size=64, num_hidden_layers=2, max_seq_len=96,
                 epochs={"pretrain": 1, "pretrain_long": 1, "full_sft": 1, "rlhf": 1, "reason": 1, "lora": 1,
                         "grpo": 1}, max_steps=2, sft_max_seq_len=96, long_max_seq_len=192, tool_transcripts=200),
}


@dataclass
class Stage:
    name: str      # the stage's file name stem (pretrain, full_sft, ...)
    script: str    # trainer/<script>
    flags: list    # the stage's own flags (learning rate, batch size, ...)
    about: str     # one line for the learner


# Learning rates are far higher than MiniMind2's full-data recipe: a tiny model, a tiny data set
# and a few hundred steps. Each stage starts from the previous one by its default --from_weight.
STAGES = [
    Stage("pretrain", "train_pretrain.py",
          ["--batch_size", "32", "--accumulation_steps", "1", "--learning_rate", "3e-3", "--warmup_iters", "10"],
          "random init -> continues text (next-token loss on every token)"),
    Stage("full_sft", "train_full_sft.py",
          ["--batch_size", "16", "--learning_rate", "2e-3", "--warmup_iters", "10", "--group_by_length", "1"],
          "pretrain -> answers in ChatML and calls tools (loss on the assistant's tokens only)"),
    Stage("rlhf", "train_dpo.py",
          ["--batch_size", "8", "--learning_rate", "2e-5"],
          "full_sft -> prefers the chosen answer over the rejected one (DPO)"),
    Stage("reason", "train_distill_reason.py",
          ["--batch_size", "8", "--learning_rate", "1e-3"],
          "rlhf -> thinks in <think>...</think>, then answers in <answer>...</answer>"),
    Stage("lora", "train_lora.py",
          ["--lora_name", "lora_identity", "--batch_size", "16", "--learning_rate", "2e-3"],
          "full_sft + a LoRA adapter (only the adapter is trained and saved)"),
    # online RL on the demo sums and capitals: 8 sampled replies per prompt, rewarded by the rules
    # (correct answer, length, repetition); before/after accuracy on held-out sums at the end
    Stage("grpo", "train_grpo.py",
          ["--batch_size", "4", "--num_generations", "8", "--max_gen_len", "32", "--learning_rate", "5e-5",
           "--beta", "0.02"],
          "full_sft -> online RL (GRPO): replies that give the right answer are made likelier"),
]

# --tools 1 swaps the first two stages for three. A 4.5M-parameter model does not learn from 600 SFT
# conversations to copy the question's numbers into a call and the tool's result into its answer
# (README, "Tool calling"). Pretraining on tool transcripts teaches the copying; such documents
# joined into long rows then teach it to copy with a 250-token tools block in front (the short rows
# never showed the model anything that far back); a gentler SFT keeps the skill.
TOOL_STAGES = [
    Stage("pretrain", "train_pretrain.py",
          ["--batch_size", "32", "--accumulation_steps", "1", "--learning_rate", "3e-3", "--warmup_iters", "10",
           "--packing", "1"],
          "random init -> continues text and tool transcripts (question, call, result, answer)"),
    Stage("pretrain_long", "train_pretrain.py",
          ["--from_weight", "pretrain", "--save_weight", "pretrain_long", "--batch_size", "8",
           "--accumulation_steps", "1", "--learning_rate", "1e-3", "--warmup_iters", "10"],
          "pretrain -> transcripts and demo text joined into long rows (attention reaches far back)"),
    Stage("full_sft", "train_full_sft.py",
          ["--from_weight", "pretrain_long", "--batch_size", "16", "--learning_rate", "5e-4", "--warmup_iters", "10",
           "--group_by_length", "1"],
          "pretrain_long -> answers in ChatML and calls tools (loss on the assistant's tokens only)"),
]


def stages(tools: bool) -> list[Stage]:
    return TOOL_STAGES + STAGES[2:] if tools else STAGES


# Questions from the demo data, asked of the model each stage produced.
QUESTIONS = [
    (1, None, "你是谁？"),
    (1, None, "Which city is the capital of Germany?"),
    (2, None, "一天有多少小时？"),
    (3, None, "小明有5个苹果，妈妈又给了他6个，小明现在有几个苹果？"),
    (1, "lora_identity", "Who are you?"),
]
MODEL_MODE_NAMES = {1: "full_sft", 2: "rlhf (DPO)", 3: "reason"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a 64-wide, 2-layer model and a few steps per stage")
    p.add_argument("--out_dir", default=os.path.join(REPO_ROOT, "out"))
    p.add_argument("--checkpoint_dir", default=os.path.join(REPO_ROOT, "checkpoints"))
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--resume", type=int, default=0, choices=[0, 1],
                   help="1: continue an interrupted quickstart (each stage resumes from its saved state)")
    p.add_argument("--tools", type=int, default=0, choices=[0, 1],
                   help="1: pretrain on tool transcripts, then on long rows, so that the SFT model really uses the "
                        "calculator (about an hour more on 2 CPU cores, minutes on a GPU)")
    return p.parse_args(argv)


# The SFT stage learns chat and tool calling together: the demo chats and the demo tool
# conversations in one file (written into out_dir, so the bundled files stay as they are).
SFT_MIX_SOURCES = ("sft.jsonl", "sft_tools.jsonl")


def write_if_changed(path: str, text: str) -> str:
    """Unchanged files keep their cached line index (and --resume 1 its position in them)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.isfile(path) or open(path, encoding="utf-8").read() != text:
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    return path


def write_sft_mix(out_dir: str) -> str:
    text = "".join(open(os.path.join(REPO_ROOT, "dataset", "demo", name), encoding="utf-8").read()
                   for name in SFT_MIX_SOURCES)
    return write_if_changed(os.path.join(out_dir, "sft_mix.jsonl"), text)


def jsonl(texts) -> str:
    return "".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts)


# --tools 1: the pretraining stages' files hold all their passes (each stage then runs one epoch):
# every pass has the demo lines and transcripts of its own. A transcript seen twice could be
# remembered instead of read; seen once, its numbers can only be predicted by copying them.
TOOL_PRETRAINING_SEEDS = {"pretrain": 16, "pretrain_long": 17}


def tool_pretraining_documents(size: Size, stage: str) -> list[str]:
    """size.epochs[stage] passes, each the demo pretraining lines and size.tool_transcripts new
    tool transcripts (none asks a held-out question), shuffled."""
    from scripts.make_demo_data import builtin_registry, held_out_tool_questions, make_tool_transcripts
    rng, registry, held_out = random.Random(TOOL_PRETRAINING_SEEDS[stage]), builtin_registry(), \
        held_out_tool_questions(seed=1337)
    demo = [json.loads(line)["text"]
            for line in open(os.path.join(REPO_ROOT, "dataset", "demo", "pretrain.jsonl"), encoding="utf-8")]
    documents = []
    for _ in range(size.epochs[stage]):
        one_pass = demo + [row["text"] for row in make_tool_transcripts(rng, registry, size.tool_transcripts, held_out)]
        rng.shuffle(one_pass)
        documents += one_pass
    return documents


def joined_rows(documents: list[str], max_tokens: int) -> list[str]:
    """Documents, each as <|im_start|>text<|im_end|>, joined in order into rows of at most
    max_tokens tokens. Nothing masks one document from the next: the model learns to look far
    back and to ignore what does not concern the question at hand."""
    from trainer.stage import load_tokenizer
    tokenizer = load_tokenizer()
    rows, row, row_tokens = [], [], 0
    for document in documents:
        marked = f"{tokenizer.bos_token}{document}{tokenizer.eos_token}"
        tokens = len(tokenizer(marked, add_special_tokens=False)["input_ids"])
        if row and row_tokens + tokens > max_tokens:
            rows.append("".join(row))
            row, row_tokens = [], 0
        row.append(marked)
        row_tokens += tokens
    return rows + ["".join(row)] if row else rows


def write_tool_pretraining(out_dir: str, size: Size, stage: str) -> str:
    """out_dir/pretrain_tools.jsonl (one document a line, for packing) or
    out_dir/pretrain_tools_long.jsonl (documents joined into long rows)."""
    documents = tool_pretraining_documents(size, stage)
    if stage == "pretrain":
        return write_if_changed(os.path.join(out_dir, "pretrain_tools.jsonl"), jsonl(documents))
    return write_if_changed(os.path.join(out_dir, "pretrain_tools_long.jsonl"),
                            jsonl(joined_rows(documents, size.long_max_seq_len)))


def stage_data_flags(stage: Stage, size: Size, args) -> list[str]:
    if stage.name == "full_sft":
        return ["--data_path", write_sft_mix(args.out_dir)]
    if args.tools and stage.name in TOOL_PRETRAINING_SEEDS:
        return ["--data_path", write_tool_pretraining(args.out_dir, size, stage.name)]
    return []


def stage_epochs(stage: Stage, size: Size, args) -> int:
    return 1 if args.tools and stage.name in TOOL_PRETRAINING_SEEDS else size.epochs[stage.name]


def stage_command(stage: Stage, size: Size, args) -> list[str]:
    max_steps = size.max_steps or (size.grpo_steps if stage.name == "grpo" else 0)
    command = [sys.executable, os.path.join("trainer", stage.script), *size.flags(stage.name), *stage.flags,
               *stage_data_flags(stage, size, args),
               "--epochs", str(stage_epochs(stage, size, args)), "--max_steps", str(max_steps),
               "--log_interval", "50", "--save_interval", "100",
               "--out_dir", args.out_dir, "--checkpoint_dir", args.checkpoint_dir]
    if args.device:
        command += ["--device", args.device]
    if args.resume:
        command += ["--resume", "1"]
    return command


def shown(command: list[str]) -> str:
    """The command as a user would type it: python, and paths inside the repository relative to it."""
    def short(word: str) -> str:
        if word == sys.executable:
            return "python"
        inside = os.path.isabs(word) and os.path.commonpath([word, REPO_ROOT]) == REPO_ROOT
        return os.path.relpath(word, REPO_ROOT) if inside else word
    return " ".join(f'"{w}"' if " " in w else w for w in map(short, command))


def train_all(size: Size, args) -> None:
    chain = stages(args.tools)
    for number, stage in enumerate(chain, start=1):
        command = stage_command(stage, size, args)
        print(f"\n=== [{number}/{len(chain)}] {stage.name}: {stage.about}\n$ {shown(command)}", flush=True)
        started = time.time()
        result = subprocess.run(command, cwd=REPO_ROOT)
        if result.returncode != 0:
            raise SystemExit(f"quickstart: the {stage.name} stage failed (exit code {result.returncode}); "
                             f"its message is above. Fix it and re-run with --resume 1 to keep what is done.")
        print(f"=== {stage.name} done in {time.time() - started:.0f} s", flush=True)


def ask_questions(size: Size, args) -> None:
    """Print the trained models' greedy answers to the demo questions."""
    from model.inference import build_prompt_ids, default_device, generate_text, load_model, model_args
    for model_mode, lora_name, question in QUESTIONS:
        model, tokenizer = load_model(model_args(model_mode=model_mode, lora_name=lora_name, out_dir=args.out_dir,
                                                 hidden_size=size.hidden_size,
                                                 num_hidden_layers=size.num_hidden_layers,
                                                 device=args.device or default_device()))
        prompt_ids = build_prompt_ids(tokenizer, [{"role": "user", "content": question}])
        answer = generate_text(model, tokenizer, prompt_ids, max_new_tokens=size.max_seq_len, temperature=0.0)
        label = MODEL_MODE_NAMES[model_mode] + (f" + {lora_name}" if lora_name else "")
        print(f"\n[{label}] 👶: {question}\n🤖️: {answer}", flush=True)


def evaluation_command(size: Size, args) -> list[str]:
    """scripts/eval_bench.py on the held-out demo sets, one model per trained stage (and the LoRA
    adapter), side by side."""
    from model.checkpoint import STAGE_OF_MODEL_MODE
    mode_of_stage = {stage: mode for mode, stage in STAGE_OF_MODEL_MODE.items()}
    models = [f"--model_mode {mode_of_stage[stage.name]}" for stage in STAGES if stage.name in mode_of_stage]
    models += [f"--model_mode 1 --lora_name {stage.flags[stage.flags.index('--lora_name') + 1]}"
               for stage in STAGES if "--lora_name" in stage.flags]
    command = [sys.executable, os.path.join("scripts", "eval_bench.py"), "--task", "bpb,mc,gen",
               "--hidden_size", str(size.hidden_size), "--num_hidden_layers", str(size.num_hidden_layers),
               "--max_seq_len", str(size.max_seq_len), "--max_new_tokens", str(size.max_seq_len // 2),
               "--out_dir", args.out_dir, "--out", os.path.join(args.out_dir, "quickstart_eval.json"),
               "--plot", os.path.join(args.out_dir, "quickstart_eval.png"), "--models", *models]
    if size.max_steps:  # the test-suite size: a few questions are enough to show the table
        command += ["--max_questions", "8"]
    if args.device:
        command += ["--device", args.device]
    return command


def evaluate_stages(size: Size, args) -> None:
    command = evaluation_command(size, args)
    print(f"\n=== Every stage on the held-out demo sets (dataset/demo/eval_*.jsonl)\n$ {shown(command)}", flush=True)
    result = subprocess.run(command, cwd=REPO_ROOT)
    if result.returncode != 0:
        raise SystemExit(f"quickstart: the evaluation failed (exit code {result.returncode}); its message is above")
TOOL_QUESTION = "What is 37 times 48?"


def show_tool_round_trip(size: Size, args) -> None:
    """The SFT model with the calculator offered: its call, the tool's result, its answer."""
    from model.inference import default_device, load_model, model_args
    from model.tools import builtin_registry, engine_stream_reply, print_tool_loop, run_tool_loop
    model, tokenizer = load_model(model_args(model_mode=1, out_dir=args.out_dir, hidden_size=size.hidden_size,
                                             num_hidden_layers=size.num_hidden_layers,
                                             device=args.device or default_device()))
    print(f"\n[full_sft + tools: calculator] 👶: {TOOL_QUESTION}", flush=True)
    reply = engine_stream_reply(model, tokenizer, max_new_tokens=96, temperature=0.0)
    print_tool_loop(run_tool_loop(reply, [{"role": "user", "content": TOOL_QUESTION}], builtin_registry(),
                                  offered=["calculator"], max_rounds=2))


def tool_score_command(size: Size, args) -> list[str]:
    """bench/bench_tools.py on the held-out tool prompts (dataset/demo/tools_eval.jsonl), SFT model."""
    command = [sys.executable, os.path.join("bench", "bench_tools.py"), "--model_mode", "1",
               "--hidden_size", str(size.hidden_size), "--num_hidden_layers", str(size.num_hidden_layers),
               "--out_dir", args.out_dir, "--out", os.path.join(args.out_dir, "quickstart_tools.json")]
    return command + (["--device", args.device] if args.device else [])


def score_tools(size: Size, args) -> None:
    command = tool_score_command(size, args)
    print(f"\n=== Tool calling on the held-out prompts (dataset/demo/tools_eval.jsonl)\n$ {shown(command)}", flush=True)
    if subprocess.run(command, cwd=REPO_ROOT).returncode != 0:
        raise SystemExit("quickstart: the tool benchmark failed; its message is above")


def rl_accuracy(size: Size, args) -> dict:
    """Greedy accuracy on the held-out demo sums (prompts GRPO never trained on) of the model
    before GRPO (full_sft) and after it; written to {out_dir}/quickstart_rl_accuracy.json."""
    import json
    from model.checkpoint import REPO_ROOT as ROOT
    from model.inference import default_device, load_model, model_args
    from trainer.rollout import held_out_accuracy, read_rows
    rows = read_rows(os.path.join(ROOT, "dataset", "demo", "rlaif_heldout.jsonl"))
    results = {}
    for model_mode, stage in ((1, "full_sft"), (5, "grpo")):
        model, tokenizer = load_model(model_args(model_mode=model_mode, out_dir=args.out_dir, hidden_size=size.hidden_size,
                                                 num_hidden_layers=size.num_hidden_layers,
                                                 device=args.device or default_device()))
        results[stage] = held_out_accuracy(model, tokenizer, rows, max_new_tokens=32)
    print(f"\n=== Held-out demo sums ({results['grpo']['rows']} prompts GRPO never saw, greedy): correct answers "
          f"{results['full_sft']['accuracy']:.1%} before GRPO (full_sft) -> {results['grpo']['accuracy']:.1%} after",
          flush=True)
    for question, reply, answer in results["grpo"]["examples"]:
        print(f"  {question} -> {reply!r} (answer {answer})")
    with open(os.path.join(args.out_dir, "quickstart_rl_accuracy.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, ensure_ascii=False, indent=2)
    return results


def plot_curves(args) -> str:
    from scripts.plot_metrics import main as plot_main
    return plot_main([args.out_dir, "--out", os.path.join(args.out_dir, "quickstart_metrics.png"), "--smooth", "10"])


def next_steps(size: Size) -> str:
    sizes = f"--hidden_size {size.hidden_size} --num_hidden_layers {size.num_hidden_layers}"
    return f"""
What next:
  chat in the terminal     python eval_model.py {sizes} --model_mode 1
  the reasoning model      python eval_model.py {sizes} --model_mode 3
  with the LoRA adapter    python eval_model.py {sizes} --model_mode 1 --lora_name lora_identity
  in the browser           streamlit run scripts/web_demo.py
  an OpenAI-compatible API python scripts/serve_openai_api.py {sizes}
  the real thing           download minimind_dataset into dataset/ (README, "Data"), then
                           python trainer/train_pretrain.py and python trainer/train_full_sft.py
"""


def main(argv=None) -> int:
    args = parse_args(argv)
    size = SIZES["tiny" if args.tiny else "default"]
    started = time.time()
    print(f"MiniMind quickstart: a {size.hidden_size}-wide, {size.num_hidden_layers}-layer model on the demo data "
          f"(dataset/demo/), every stage of the recipe; outputs go to {args.out_dir}", flush=True)
    train_all(size, args)
    print("\n=== The trained models answer demo questions (greedy decoding)", flush=True)
    ask_questions(size, args)
    show_tool_round_trip(size, args)
    score_tools(size, args)
    evaluate_stages(size, args)
    rl_accuracy(size, args)
    png = plot_curves(args)
    minutes = (time.time() - started) / 60
    print(f"\nDone in {minutes:.1f} min. Weights and metrics: {args.out_dir}; loss/lr curves: {png}")
    print(next_steps(size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
