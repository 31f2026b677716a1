"""A language model as judge: any OpenAI-compatible chat endpoint scores each answer 0-10.

    judge = Judge(base_url="https://api.deepseek.com/v1", model="deepseek-chat", api_key=os.environ[...])
    verdict = judge.score(question, answer, reference)   # Verdict(score or None, reply, error)

The criteria are stated in the prompt (MicroMind's: language, knowledge and reasoning,
efficiency). A reply without a readable score, or a request that fails, is a Verdict with
score None: counted and shown in the results, never the end of the run.
"""
import re
from dataclasses import dataclass

DEFAULT_CRITERIA = ("correctness (it agrees with the reference answer when one is given), "
                    "language (fluent and in the language of the question), "
                    "efficiency (answers what was asked without needless length)")
PROMPT = """You are grading the answer a small language model gave to a question.

Question:
{question}
{reference}
The model's answer:
{answer}

Grade the answer from 0 (useless) to 10 (perfect) on: {criteria}.
Reply with one line in the form "Score: N" where N is a whole number from 0 to 10."""
SCORE_PATTERNS = [
    re.compile(r"score\s*[:：=]?\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE),  # Score: 7, **Score:** 7
    re.compile(r"(?:评分|得分|分数)\s*[:：=]?\s*(\d+(?:\.\d+)?)"),
    re.compile(r"(\d+(?:\.\d+)?)\s*/\s*10\b"),                              # 7/10
    re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[.。]?\s*$"),                          # the reply is just the number
]


@dataclass
class Verdict:
    score: float | None
    reply: str
    error: str | None = None


def parse_score(reply: str) -> float | None:
    """The 0-10 score a judge's reply gives, or None when it gives none (or one out of range)."""
    for pattern in SCORE_PATTERNS:
        match = pattern.search(reply)
        if match:
            score = float(match.group(1))
            return score if 0 <= score <= 10 else None
    return None


def judge_prompt(question: str, answer: str, reference: str | None, criteria: str = DEFAULT_CRITERIA) -> str:
    reference_part = f"\nA reference answer:\n{reference}\n" if reference else ""
    return PROMPT.format(question=question, reference=reference_part, answer=answer, criteria=criteria)


class Judge:
    def __init__(self, base_url: str, model: str, api_key: str | None = None, criteria: str = DEFAULT_CRITERIA,
                 max_tokens: int = 64, timeout: float = 120.0):
        import openai
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout, max_retries=2)
        self.model, self.criteria, self.max_tokens = model, criteria, max_tokens

    def score(self, question: str, answer: str, reference: str | None = None) -> Verdict:
        import openai
        try:
            response = self.client.chat.completions.create(
                model=self.model, temperature=0, max_tokens=self.max_tokens,
                messages=[{"role": "user", "content": judge_prompt(question, answer, reference, self.criteria)}])
        except openai.OpenAIError as error:  # the endpoint failed this one: counted, the run goes on
            return Verdict(None, "", f"{type(error).__name__}: {error}")
        reply = response.choices[0].message.content or ""
        return Verdict(parse_score(reply), reply)


def summarize(questions: list[dict], answers: list[str], verdicts: list[Verdict], shown: int = 3) -> dict:
    scores = [v.score for v in verdicts if v.score is not None]
    unparsed = [{"question": q["question"], "answer": a, "judge_reply": v.reply, "error": v.error}
                for q, a, v in zip(questions, answers, verdicts) if v.score is None]
    return {"score": sum(scores) / len(scores) if scores else None, "n": len(verdicts), "scored": len(scores),
            "unparseable": sum(1 for v in verdicts if v.score is None and v.error is None),
            "failed_requests": sum(1 for v in verdicts if v.error is not None),
            "unparsed_examples": unparsed[:shown],
            "examples": [{"question": q["question"], "answer": a, "score": v.score, "judge_reply": v.reply}
                         for q, a, v in list(zip(questions, answers, verdicts))[:shown]]}
