"""The tasks scripts/eval_bench.py runs, registered by name in TASKS.

A task is a function run(model, tokenizer, data_path, settings, subject) -> results (a dict of
numbers and examples) and a description of its table columns. To add one:

    TASKS["tools"] = Task(run=run_tools, columns=("accuracy", "n"), headline="accuracy",
                          default_data="eval_tools.jsonl")

`subject` describes the model being evaluated (its label and whether it is a chat model:
pretrain models get plain text prompts, chat models the chat template).
"""
import os
from dataclasses import dataclass, field

from evaluation import choice, generative, judge
from evaluation.bpb import bits_per_byte
from evaluation.data import read_answer_questions, read_choice_questions, read_documents

DEMO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dataset", "demo")


@dataclass
class Subject:
    """The model under evaluation, as the tasks need to know it."""
    label: str
    chat: bool = True  # False for pretrain models: they continue text and never saw the chat template


@dataclass
class Task:
    run: object                  # run(model, tokenizer, data_path, settings, subject) -> dict
    columns: tuple               # result keys shown in the table, in order
    headline: str                # the key plotted (and compared)
    default_data: str            # file in dataset/demo/ used when --data_path is not given
    lower_is_better: bool = False
    needs: tuple = field(default_factory=tuple)  # settings that must be set (e.g. the judge's URL)


def limit(items: list, settings) -> list:
    return items[:settings.max_questions] if settings.max_questions else items


def progress_label(subject: Subject, task: str, settings) -> str | None:
    """The progress bar's title, or None for no bar (--progress 0)."""
    return f"{subject.label} {task}" if settings.progress else None


def prompt_ids(tokenizer, question: str, subject: Subject) -> list[int]:
    from model.inference import build_prompt_ids
    return build_prompt_ids(tokenizer, [{"role": "user", "content": question}], raw=not subject.chat)


def run_bpb(model, tokenizer, data_path: str, settings, subject: Subject) -> dict:
    texts = limit(read_documents(data_path, tokenizer), settings)
    result = bits_per_byte(model, tokenizer, texts, settings.max_seq_len, settings.batch_tokens,
                           progress_label(subject, "bpb", settings))
    return result.as_dict()


def run_mc(model, tokenizer, data_path: str, settings, subject: Subject) -> dict:
    choice_set = read_choice_questions(data_path)
    choice_set.questions = limit(choice_set.questions, settings)
    prompting = choice.Prompting(tokenizer, settings.max_seq_len, bool(settings.add_bos), bool(settings.chat_template),
                                 settings.target_delimiter)
    label = progress_label(subject, "mc", settings)
    extra = {}
    if choice_set.style == "letter":
        scores, extra = choice.score_letters(model, choice_set, prompting, settings.num_fewshot, settings.batch_tokens,
                                             label)
    elif settings.num_fewshot:
        raise ValueError("--num_fewshot needs a C-Eval/CMMLU folder (few-shot examples come from its dev split)")
    else:
        scores = choice.score_continuations(model, choice_set.questions, prompting, settings.batch_tokens, label)
    chance = sum(1 / len(q.choices) for q in choice_set.questions) / len(choice_set.questions)
    return {**choice.summarize(scores), "chance": chance, "skipped": choice_set.skipped, **extra,
            "predictions": [s.predicted for s in scores], "predictions_norm": [s.predicted_norm for s in scores]}


def answers_of(model, tokenizer, questions: list[dict], settings, subject: Subject, task: str) -> list[str]:
    prompts = [prompt_ids(tokenizer, q["question"], subject) for q in questions]
    return generative.generate_answers(model, tokenizer, prompts, settings.max_new_tokens, settings.gen_batch_size,
                                       progress_label(subject, task, settings))


def run_gen(model, tokenizer, data_path: str, settings, subject: Subject) -> dict:
    questions = limit(read_answer_questions(data_path), settings)
    return generative.summarize(questions, answers_of(model, tokenizer, questions, settings, subject, "gen"))


def run_judge(model, tokenizer, data_path: str, settings, subject: Subject) -> dict:
    questions = limit(read_answer_questions(data_path, need_answer=False), settings)
    answers = answers_of(model, tokenizer, questions, settings, subject, "judge")
    grader = judge.Judge(settings.judge_base_url, settings.judge_model, os.environ.get(settings.judge_api_key_env),
                         settings.judge_criteria, settings.judge_max_tokens)
    verdicts = [grader.score(q["question"], a, q["answer"]) for q, a in zip(questions, answers)]
    return {**judge.summarize(questions, answers, verdicts), "criteria": settings.judge_criteria}


def run_tools(model, tokenizer, data_path: str, settings, subject: Subject) -> dict:
    """Held-out tool prompts through model/tools.py's loop with the built-in tools (greedy)."""
    from model.tools import load_tool_prompts, score_tool_prompts
    prompts = limit(load_tool_prompts(data_path), settings)
    scores = score_tool_prompts(model, tokenizer, prompts, max_new_tokens=settings.max_new_tokens,
                                batch_size=settings.gen_batch_size)
    return {**scores, "n": scores["prompts"]}


TASKS = {
    "bpb": Task(run_bpb, ("bpb", "loss", "tokens", "bytes"), "bpb", "eval_text.jsonl", lower_is_better=True),
    "mc": Task(run_mc, ("accuracy", "acc_norm", "n", "chance"), "accuracy", "eval_mc.jsonl"),
    "gen": Task(run_gen, ("accuracy", "n"), "accuracy", "eval_gen.jsonl"),
    "judge": Task(run_judge, ("score", "scored", "unparseable", "failed_requests", "n"), "score", "eval_gen.jsonl",
                  needs=("judge_base_url", "judge_model")),
    "tools": Task(run_tools, ("valid_call", "right_tool", "exact_arguments", "answer_with_tools",
                              "answer_without_tools", "no_call_when_not_needed", "n"), "answer_with_tools",
                  "tools_eval.jsonl"),
}


def default_data_path(task: str) -> str:
    return os.path.join(DEMO_DIR, TASKS[task].default_data)
