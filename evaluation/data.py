"""Reading evaluation files. A line or row that cannot be used stops the run with its file and
line number; rows that are valid but cannot be scored (e.g. a C-Eval test row without its
answer) are counted and reported, never dropped silently.

    read_jsonl(path)                      -> [(line_number, object), ...]
    read_documents(path, tokenizer)       -> [text, ...]          (bpb)
    read_choice_questions(path)           -> ChoiceSet            (mc: jsonl or a CSV folder)
    read_answer_questions(path)           -> [{"question", "answer"}, ...]   (gen, judge)
"""
import csv
import json
import os
from dataclasses import dataclass, field

LETTERS = "ABCDEFGHIJ"
NO_ANSWER = "no answer letter A-D (e.g. a test split without answers)"


class EvalDataError(Exception):
    """A data file that cannot be evaluated; the message names the file (and line)."""


def read_jsonl(path: str) -> list[tuple[int, dict]]:
    if not os.path.isfile(path):
        raise EvalDataError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise EvalDataError(f"{path}:{number}: not JSON ({error})") from None
            if not isinstance(row, dict):
                raise EvalDataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    if not rows:
        raise EvalDataError(f"{path}: no lines to evaluate")
    return rows


# ----------------------------------------------------------------------------------------------
# Text for bits per byte
# ----------------------------------------------------------------------------------------------

def read_documents(path: str, tokenizer=None) -> list[str]:
    """The documents of a .txt file (the whole file is one document) or a jsonl file:
    {"text"} lines as they are, {"conversations"} (SFT) and {"chosen"} (DPO) lines rendered with
    the tokenizer's chat template, as the chat stages train on them."""
    if path.endswith(".txt"):
        if not os.path.isfile(path):
            raise EvalDataError(f"{path}: no such file")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if not text.strip():
            raise EvalDataError(f"{path}: empty")
        return [text]
    documents = []
    for number, row in read_jsonl(path):
        messages = row.get("conversations") or row.get("chosen")
        if isinstance(row.get("text"), str):
            documents.append(row["text"])
        elif isinstance(messages, list) and tokenizer is not None:
            documents.append(tokenizer.apply_chat_template(messages, tokenize=False))
        else:
            raise EvalDataError(f"{path}:{number}: expected a \"text\" string or a \"conversations\" list")
    return documents


# ----------------------------------------------------------------------------------------------
# Multiple choice
# ----------------------------------------------------------------------------------------------

@dataclass
class ChoiceQuestion:
    question: str
    choices: list[str]
    answer: int
    subject: str = ""


@dataclass
class ChoiceSet:
    """Questions to score, and how: "continuation" (jsonl: each choice's text after the question)
    or "letter" (C-Eval/CMMLU: the answer letter after a prompt listing the choices)."""
    style: str
    questions: list[ChoiceQuestion]
    dev: dict = field(default_factory=dict)           # subject -> [ChoiceQuestion] (few-shot examples)
    subject_names: dict = field(default_factory=dict)  # subject -> the name the prompt uses
    benchmark: str = ""                               # "ceval", "cmmlu" or "" (jsonl)
    skipped: dict = field(default_factory=dict)       # why -> count


def answer_index(value, n_choices: int, where: str) -> int:
    """0-based index from an index or a letter ("B", "b")."""
    if isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS:
        index = LETTERS.index(value.strip().upper())
    elif isinstance(value, int) and not isinstance(value, bool):
        index = value
    else:
        raise EvalDataError(f"{where}: \"answer\" must be a choice index or letter, got {value!r}")
    if not 0 <= index < n_choices:
        raise EvalDataError(f"{where}: answer {value!r} is not one of the {n_choices} choices")
    return index


def read_choice_questions(path: str) -> ChoiceSet:
    if os.path.isdir(path):
        return read_csv_benchmark(path)
    questions = []
    for number, row in read_jsonl(path):
        where = f"{path}:{number}"
        choices = row.get("choices")
        if not isinstance(row.get("question"), str) or not isinstance(choices, list) or len(choices) < 2 \
                or not all(isinstance(c, str) for c in choices):
            raise EvalDataError(f"{where}: expected {{\"question\": str, \"choices\": [at least 2 strings], \"answer\"}}")
        questions.append(ChoiceQuestion(row["question"], choices, answer_index(row.get("answer"), len(choices), where),
                                        str(row.get("subject", ""))))
    return ChoiceSet("continuation", questions)


def read_csv_benchmark(folder: str, split: str | None = None) -> ChoiceSet:
    """A C-Eval or CMMLU folder as published:

        C-Eval  dev/{subject}_dev.csv  val/{subject}_val.csv  test/{subject}_test.csv
                columns id,question,A,B,C,D,answer[,explanation]; test has no answers;
                subject_mapping.json gives each subject's Chinese name
        CMMLU   dev/{subject}.csv  test/{subject}.csv
                columns (unnamed index),Question,A,B,C,D,Answer

    Questions come from val/ when there is one (C-Eval's test answers are not public), else
    test/; few-shot examples from dev/."""
    split = split or next((s for s in ("val", "test") if os.path.isdir(os.path.join(folder, s))), None)
    if split is None:
        raise EvalDataError(f"{folder}: not a C-Eval/CMMLU folder (expected a val/ or test/ folder of CSV files)")
    names = subject_display_names(folder)
    benchmark = "ceval" if names or any(f.endswith(f"_{split}.csv") for f in os.listdir(os.path.join(folder, split))) \
        else "cmmlu"
    skipped = {}
    questions = []
    for subject, file in csv_subjects(folder, split):
        questions += read_csv_questions(file, subject, skipped)
    if not questions:
        raise EvalDataError(f"{folder}/{split}: no questions with answers")
    dev = {subject: read_csv_questions(file, subject, {}) for subject, file in csv_subjects(folder, "dev")}
    return ChoiceSet("letter", questions, dev, {s: names.get(s, s.replace("_", " ")) for s in
                                                {q.subject for q in questions}}, benchmark, skipped)


def subject_display_names(folder: str) -> dict:
    """C-Eval's subject_mapping.json: {"computer_network": ["Computer Network", "计算机网络", "STEM"], ...}."""
    path = os.path.join(folder, "subject_mapping.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        mapping = json.load(f)
    return {subject: names[1] for subject, names in mapping.items() if isinstance(names, list) and len(names) > 1}


def csv_subjects(folder: str, split: str) -> list[tuple[str, str]]:
    """(subject, file) for each CSV of a split; the subject is the file name without _{split}."""
    directory = os.path.join(folder, split)
    if not os.path.isdir(directory):
        return []
    found = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".csv"):
            stem = name[:-len(".csv")]
            found.append((stem[:-len(split) - 1] if stem.endswith("_" + split) else stem, os.path.join(directory, name)))
    return found


def read_csv_questions(path: str, subject: str, skipped: dict) -> list[ChoiceQuestion]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return []
    header = [h.strip().lower() for h in rows[0]]
    try:
        question_col, answer_col = header.index("question"), header.index("answer")
        letter_cols = [header.index(letter.lower()) for letter in "ABCD"]
    except ValueError:
        raise EvalDataError(f"{path}:1: expected the columns question, A, B, C, D, answer (got {rows[0]})") from None
    questions = []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) <= max(question_col, answer_col, *letter_cols):
            raise EvalDataError(f"{path}:{number}: {len(row)} columns, the header has {len(header)}")
        answer = row[answer_col].strip().upper()
        if answer not in ("A", "B", "C", "D"):
            skipped[NO_ANSWER] = skipped.get(NO_ANSWER, 0) + 1
            continue
        questions.append(ChoiceQuestion(row[question_col], [row[c] for c in letter_cols], "ABCD".index(answer), subject))
    return questions


# ----------------------------------------------------------------------------------------------
# Questions with a reference answer (gen, judge)
# ----------------------------------------------------------------------------------------------

def read_answer_questions(path: str, need_answer: bool = True) -> list[dict]:
    """{"question", "answer"} lines; GSM8K's own files work as they are ("answer" ends in #### N).
    "reference" is accepted for "answer"."""
    questions = []
    for number, row in read_jsonl(path):
        answer = row.get("answer", row.get("reference"))
        if not isinstance(row.get("question"), str) or (need_answer and answer is None):
            raise EvalDataError(f"{path}:{number}: expected {{\"question\": str, \"answer\": ...}}")
        questions.append({"question": row["question"], "answer": None if answer is None else str(answer),
                          "subject": str(row.get("subject", ""))})
    return questions
