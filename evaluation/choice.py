"""Multiple choice, scored by the model's log-likelihoods (no generation, no parsing).

Continuations (jsonl, as lm-evaluation-harness scores ARC / HellaSwag style tasks): each choice
is the text after the question; the chosen one has the highest summed log-likelihood
(`accuracy`), or the highest log-likelihood per character of the choice (`acc_norm`, which
stops long choices from losing just for being long). The text is split as lm-evaluation-harness
splits it: question + delimiter + choice is tokenized whole, and the choice's tokens are what
follows the question's own tokens.

Letters (C-Eval / CMMLU folders, as their official code scores): the prompt lists the choices
as A-D after the benchmark's standard instruction, with --num_fewshot solved examples from the
subject's dev split, and ends in "答案："; the chosen letter is the one of A-D the model finds
likeliest as the next token.
"""
from dataclasses import dataclass

import torch

from evaluation.data import LETTERS, ChoiceQuestion, ChoiceSet
from evaluation.scoring import continuation_logprob, token_logprobs

INSTRUCTIONS = {
    "ceval": "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n",
    "cmmlu": "以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n",
}


@dataclass
class Prompting:
    """How questions become token ids."""
    tokenizer: object
    max_seq_len: int = 512
    add_bos: bool = True          # MiniMind trains every line after <bos>; lm-eval adds none (--add_bos 0)
    chat_template: bool = False   # the question as a user turn, the choice as the reply
    delimiter: str = ""           # put between question and choice (lm-eval: target_delimiter, " " there)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def context_ids(self, text: str) -> list[int]:
        if self.chat_template:
            from model.inference import build_prompt_ids
            return build_prompt_ids(self.tokenizer, [{"role": "user", "content": text}])
        return ([self.tokenizer.bos_token_id] if self.add_bos else []) + self.encode(text)

    def pair_ids(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) of a question and one choice, split as
        lm-evaluation-harness splits them: the delimiter goes in front of the choice, spaces at
        the end of the context move to the continuation, the whole is tokenized at once. With the
        chat template the choice is the start of the assistant's reply (no delimiter)."""
        if self.chat_template:
            return self.context_ids(context), self.encode(continuation)
        continuation = self.delimiter + continuation
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_ids = self.encode(context)
        # an empty question still needs a token to predict the choice from (lm-eval uses its prefix token)
        prefix = [self.tokenizer.bos_token_id] if self.add_bos or not context_ids else []
        whole = self.encode(context + continuation)
        return prefix + context_ids, whole[len(context_ids):]


@dataclass
class ChoiceScore:
    """One question's outcome."""
    subject: str
    answer: int
    predicted: int
    predicted_norm: int
    truncated: bool = False


# ----------------------------------------------------------------------------------------------
# Continuations
# ----------------------------------------------------------------------------------------------

def fit(context: list[int], continuation: list[int], max_seq_len: int) -> tuple[list[int], int, bool]:
    """(sequence, index of the first continuation token, truncated): the context loses tokens at
    its start when the whole does not fit into max_seq_len + 1 tokens (the last is never an input)."""
    sequence = context + continuation
    cut = max(0, len(sequence) - (max_seq_len + 1))
    cut = min(cut, len(context) - 1)  # keep at least one context token to predict from
    return sequence[cut:], len(context) - cut, cut > 0


def score_continuations(model, questions: list[ChoiceQuestion], prompting: Prompting, batch_tokens: int = 8192,
                        progress: str | None = None) -> list[ChoiceScore]:
    sequences, starts, owners, truncated = [], [], [], set()
    for q_index, question in enumerate(questions):
        for choice in question.choices:
            context, continuation = prompting.pair_ids(question.question, choice)
            sequence, start, was_cut = fit(context, continuation, prompting.max_seq_len)
            sequences.append(sequence)
            starts.append(start)
            owners.append(q_index)
            if was_cut:
                truncated.add(q_index)
    loglikelihoods = [0.0] * len(sequences)
    for index, logprobs in token_logprobs(model, sequences, batch_tokens, progress):
        loglikelihoods[index] = continuation_logprob(logprobs, sequences[index], starts[index])[0]
    scores, position = [], 0
    for q_index, question in enumerate(questions):
        lls = torch.tensor(loglikelihoods[position:position + len(question.choices)])
        lengths = torch.tensor([float(max(len(c), 1)) for c in question.choices])
        position += len(question.choices)
        scores.append(ChoiceScore(question.subject, question.answer, int(lls.argmax()), int((lls / lengths).argmax()),
                                  q_index in truncated))
    return scores


# ----------------------------------------------------------------------------------------------
# Letters (C-Eval / CMMLU)
# ----------------------------------------------------------------------------------------------

def question_block(question: ChoiceQuestion) -> str:
    options = "".join(f"\n{LETTERS[i]}. {choice}" for i, choice in enumerate(question.choices))
    return f"{question.question}{options}\n答案："


def letter_prompt(choice_set: ChoiceSet, question: ChoiceQuestion, shots: int) -> str:
    """The benchmark's instruction, `shots` solved dev questions of the subject, the question."""
    instruction = INSTRUCTIONS.get(choice_set.benchmark, INSTRUCTIONS["ceval"])
    name = choice_set.subject_names.get(question.subject, question.subject)
    examples = choice_set.dev.get(question.subject, [])[:shots]
    solved = "".join(f"{question_block(e)}{LETTERS[e.answer]}\n\n" for e in examples)
    return instruction.format(subject=name) + solved + question_block(question)


def letter_prompt_ids(choice_set: ChoiceSet, question: ChoiceQuestion, num_fewshot: int,
                      prompting: Prompting) -> tuple[list[int], int, bool]:
    """(ids, shots used, truncated): shots are dropped from the end until the prompt fits (as
    C-Eval's own code does); a prompt too long even without shots loses tokens at its start."""
    shots = min(num_fewshot, len(choice_set.dev.get(question.subject, [])))
    while True:
        ids = prompting.context_ids(letter_prompt(choice_set, question, shots))
        if len(ids) <= prompting.max_seq_len or shots == 0:
            break
        shots -= 1
    truncated = len(ids) > prompting.max_seq_len
    return ids[-prompting.max_seq_len:], shots, truncated


def letter_ids(tokenizer, count: int) -> list[int]:
    ids = []
    for letter in LETTERS[:count]:
        encoded = tokenizer(letter, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise ValueError(f"the tokenizer splits the answer letter {letter!r} into {len(encoded)} tokens")
        ids.append(encoded[0])
    return ids


def score_letters(model, choice_set: ChoiceSet, prompting: Prompting, num_fewshot: int = 0, batch_tokens: int = 8192,
                  progress: str | None = None) -> tuple[list[ChoiceScore], dict]:
    """Scores, and how many questions got fewer shots than asked (their prompt was too long)."""
    prompts = [letter_prompt_ids(choice_set, q, num_fewshot, prompting) for q in choice_set.questions]
    candidates = letter_ids(prompting.tokenizer, 4)
    scores = [None] * len(prompts)
    for index, logprobs in token_logprobs(model, [ids for ids, _, _ in prompts], batch_tokens, progress):
        question = choice_set.questions[index]
        predicted = int(logprobs[-1, candidates].argmax())
        scores[index] = ChoiceScore(question.subject, question.answer, predicted, predicted, prompts[index][2])
    fewer_shots = sum(1 for q, (_, shots, _) in zip(choice_set.questions, prompts)
                      if shots < min(num_fewshot, len(choice_set.dev.get(q.subject, []))))
    return scores, {"fewer_shots_than_asked": fewer_shots}


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------

def summarize(scores: list[ChoiceScore]) -> dict:
    """Overall accuracy and acc_norm (over questions) and the same per subject."""
    def rates(group):
        n = len(group)
        return {"accuracy": sum(s.predicted == s.answer for s in group) / n,
                "acc_norm": sum(s.predicted_norm == s.answer for s in group) / n, "n": n}
    subjects = sorted({s.subject for s in scores})
    result = {**rates(scores), "truncated": sum(s.truncated for s in scores)}
    if subjects != [""]:
        result["subjects"] = {subject: rates([s for s in scores if s.subject == subject]) for subject in subjects}
    return result
