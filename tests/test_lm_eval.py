"""lm-evaluation-harness scores a model through scripts/serve_openai_api.py.

`lm_eval --model local-completions` sends /v1/completions requests with token ids, echo and
logprobs (as it does against vLLM or OpenAI); its per-choice log-likelihoods must equal the
ones computed here directly from the same weights. The task is a two-question multiple-choice
task written to a temporary folder with its data (no hub access)."""
import glob
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.inference import load_model, model_args
from test_server import running_server, tiny_model
from model.checkpoint import save_weights

REPO_ROOT = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                       reason="lm-evaluation-harness is not installed (pip install -r requirements.txt)"),
]
QUESTIONS = [
    {"question": "The capital of France is", "choices": ["Paris", "Berlin", "a large fish"], "answer": 0},
    {"question": "中国的首都是", "choices": ["北京", "上海"], "answer": 0},
]
TASK = """task: minimind_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("out")
    save_weights(tiny_model(), str(folder / "full_sft_64.pth"))
    with running_server(folder, folder / "server.log") as base_url:
        yield base_url, folder


def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """sum log P(continuation tokens | context), split as lm-eval splits: the whole text is
    tokenized and the continuation is what follows the context's own tokens."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
    targets = torch.tensor(whole[len(context_ids):])
    return logprobs[len(context_ids) - 1:-1].gather(1, targets[:, None]).sum().item()


def test_lm_eval_local_completions_gets_the_model_s_loglikelihoods(served, tmp_path):
    base_url, out_dir = served
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in QUESTIONS), encoding="utf-8")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "minimind_tiny_mc.yaml").write_text(TASK.format(data=data), encoding="utf-8")
    model_arguments = ",".join([
        "model=minimind", f"base_url={base_url}/completions", f"tokenizer={REPO_ROOT / 'model'}",
        "tokenizer_backend=huggingface", "num_concurrent=1", "max_retries=1"])
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OPENAI_API_KEY": "none"}
    result = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", model_arguments,
         "--tasks", "minimind_tiny_mc", "--include_path", str(tasks), "--output_path", str(tmp_path / "results"),
         "--log_samples", "--batch_size", "1"],
        capture_output=True, text=True, timeout=300, env=environment, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    samples_files = glob.glob(str(tmp_path / "results" / "**" / "samples_minimind_tiny_mc_*.jsonl"), recursive=True)
    assert samples_files, result.stderr[-2000:]
    samples = [json.loads(line) for line in Path(samples_files[0]).read_text(encoding="utf-8").splitlines()]
    assert len(samples) == len(QUESTIONS)

    model, tokenizer = load_model(model_args(out_dir=str(out_dir), hidden_size=64, num_hidden_layers=2, device="cpu"))
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        question = QUESTIONS[sample["doc_id"]]
        scored = [float(response[0][0]) for response in sample["resps"]]  # [[loglikelihood, is_greedy]] per choice
        expected = [direct_loglikelihood(model, tokenizer, question["question"], " " + choice)
                    for choice in question["choices"]]
        assert scored == pytest.approx(expected, abs=1e-4)
        assert len(set(round(x, 3) for x in expected)) == len(expected)  # distinct: a mix-up would show
