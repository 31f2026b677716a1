"""lm-evaluation-harness and this project agree.

`lm_eval --model local-completions` scores a model through scripts/serve_openai_api.py: it sends
/v1/completions requests with token ids, echo and logprobs (as it does against vLLM or OpenAI);
its per-choice log-likelihoods must equal the ones computed here directly from the same weights.

`lm_eval --model hf` on the Llama export of a model (scripts/convert_model.py --mode torch2llama,
run by transformers' own Llama code) gives the same accuracy, acc_norm and per-question choices
as `scripts/eval_bench.py --task mc` on the same questions.

The tasks are multiple-choice tasks written to a temporary folder with their data (no hub access)."""
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
from scripts.convert_model import main as convert_main
from scripts.eval_bench import main as eval_bench
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


def task_yaml(name: str, data, extra: str = "") -> str:
    """A multiple-choice task over a local jsonl file ({question, choices, answer}), no hub."""
    return f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
{extra}metric_list:
  - metric: acc
  - metric: acc_norm
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
    (tasks / "minimind_tiny_mc.yaml").write_text(task_yaml("minimind_tiny_mc", data), encoding="utf-8")
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




def test_lm_eval_hf_on_the_llama_export_agrees_with_eval_bench(tmp_path):
    """The first 16 questions of the demo mc set (Chinese and English, 4 choices; the English
    choices carry their own leading space, so both sides put nothing between question and
    choice). eval_bench --add_bos 0 scores as lm-evaluation-harness does (no <bos> in front)."""
    save_weights(tiny_model(seed=2), str(tmp_path / "full_sft_64.pth"))
    export = tmp_path / "llama"
    convert_main(["--mode", "torch2llama", "--in", str(tmp_path / "full_sft_64.pth"), "--out", str(export),
                  "--dtype", "float32"])
    lines = (REPO_ROOT / "dataset" / "demo" / "eval_mc.jsonl").read_text(encoding="utf-8").splitlines()[:16]
    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "minimind_demo_mc.yaml").write_text(
        task_yaml("minimind_demo_mc", data, extra='target_delimiter: ""\n'), encoding="utf-8")
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={export},dtype=float32",
         "--tasks", "minimind_demo_mc", "--include_path", str(tasks), "--device", "cpu", "--batch_size", "8",
         "--output_path", str(tmp_path / "results"), "--log_samples"],
        capture_output=True, text=True, timeout=300, env=environment, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results_file, = glob.glob(str(tmp_path / "results" / "**" / "results_*.json"), recursive=True)
    harness = json.loads(Path(results_file).read_text())["results"]["minimind_demo_mc"]
    samples_file, = glob.glob(str(tmp_path / "results" / "**" / "samples_minimind_demo_mc_*.jsonl"), recursive=True)
    samples = sorted((json.loads(line) for line in Path(samples_file).read_text(encoding="utf-8").splitlines()),
                     key=lambda s: s["doc_id"])
    harness_choices = [max(range(len(s["resps"])), key=lambda i: float(s["resps"][i][0][0])) for s in samples]

    out = tmp_path / "eval_bench.json"
    assert eval_bench(["--task", "mc", "--data_path", str(data), "--load", "1", "--hf_path", str(export),
                       "--device", "cpu", "--add_bos", "0", "--out", str(out), "--progress", "0"]) == 0
    ours = json.loads(out.read_text())["tasks"][0]["models"]["llama"]
    assert ours["predictions"] == harness_choices
    assert ours["accuracy"] == pytest.approx(harness["acc,none"])
    assert ours["acc_norm"] == pytest.approx(harness["acc_norm,none"])
    assert len(set(harness_choices)) > 1  # a model that always picks one position would prove little
