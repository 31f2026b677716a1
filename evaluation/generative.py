"""Generative tasks: the model writes an answer (greedy, through the batched generation engine)
and it is checked against the reference.

Numbers are compared as numbers: "11", "11.0", "1,100" and "共11个" all hold a number, and
the prediction's number is the one after its last "####" (GSM8K's answer marker) if it has one,
else the last number in its answer (after any <think>…</think> part). A reference that holds
no number is compared as text (case, spaces and punctuation at the ends ignored).
"""
import math
import re

from tqdm import tqdm

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
ANSWER_MARKER = "####"


def last_number(text: str) -> float | None:
    """The last number written in the text (thousands commas allowed), or None."""
    for match in reversed(NUMBER.findall(text)):
        try:
            return float(match.replace(",", ""))
        except ValueError:
            continue
    return None


def final_answer(text: str) -> str:
    """What an answer says in the end: the part after GSM8K's last "####" if there is one, and
    without a reasoning model's <think>…</think>."""
    from model.inference import split_reasoning
    _, answer = split_reasoning(text)
    return answer.rsplit(ANSWER_MARKER, 1)[-1] if ANSWER_MARKER in answer else answer


def normalize_text(text: str) -> str:
    return text.strip().strip("。.!！?？,，:：;；\"'“”").strip().casefold()


def answers_match(prediction: str, reference: str) -> bool:
    expected = last_number(final_answer(reference))
    if expected is None:
        return normalize_text(final_answer(prediction)) == normalize_text(final_answer(reference))
    got = last_number(final_answer(prediction))
    return got is not None and math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-9)


def generate_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 256, batch_size: int = 32,
                     progress: str | None = None) -> list[str]:
    """Greedy replies to the prompts (token ids), decoded together by the engine."""
    from model.engine import Engine, SamplingParams
    context = model.config.max_position_embeddings
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise ValueError(f"a prompt has {longest} tokens; the model's context is {context}")
    engine = Engine(model, tokenizer, max_batch_size=min(batch_size, len(prompts)),
                    max_seq_len=min(context, longest + max_new_tokens))
    sequences = [engine.add(p, SamplingParams(max_tokens=max_new_tokens, temperature=0.0)) for p in prompts]
    with tqdm(total=len(prompts), desc=progress, unit="answer", disable=progress is None, leave=False) as bar:
        while engine.has_work():
            bar.update(sum(1 for output in engine.step() if output.finish_reason is not None))
    return [sequence.text for sequence in sequences]


def summarize(questions: list[dict], answers: list[str], shown: int = 3) -> dict:
    correct = [answers_match(answer, q["answer"]) for q, answer in zip(questions, answers)]
    examples = [{"question": q["question"], "answer": answer, "reference": q["answer"], "correct": ok}
                for q, answer, ok in zip(questions, answers, correct)]
    # a few shown: right and wrong ones, so the table's number has faces
    shown_examples = [e for e in examples if e["correct"]][:1] + [e for e in examples if not e["correct"]][:shown - 1]
    return {"accuracy": sum(correct) / len(correct), "n": len(correct), "examples": shown_examples[:shown]}
