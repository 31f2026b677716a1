"""eval_bench.py --task judge against this project's own OpenAI-compatible server on a loopback
port (real HTTP). The judge model is built by hand to write "8" whatever it is asked: each
layer's output is zeroed and every token's embedding points the same way, the embedding of "8"
twice as far, so "8" has the highest logit after any token. One reply token is a parseable
score; three ("888") are a reply no score can be read from."""
import json

import pytest
import torch

from evaluation.judge import parse_score
from model.checkpoint import save_weights
from model.inference import load_tokenizer
from scripts.eval_bench import main as eval_bench
from test_server import running_server, tiny_model




def always_eight_model():
    model = tiny_model(seed=5)
    eight, = load_tokenizer("model")("8", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings = model.model.embed_tokens.weight
        direction = torch.randn(embeddings.shape[1])
        embeddings.copy_(direction + 0.01 * torch.randn_like(embeddings))
        embeddings[eight] = 2 * direction
    return model


@pytest.fixture(scope="module")
def judge_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("judge")
    save_weights(always_eight_model(), str(folder / "full_sft_64.pth"))
    with running_server(folder, folder / "server.log") as base_url:
        yield base_url, folder


def judged(folder, tmp_path, base_url: str, *flags) -> dict:
    data = tmp_path / "questions.jsonl"
    data.write_text('{"question": "1加1等于几？", "answer": "2"}\n{"question": "What color is snow?"}\n',
                    encoding="utf-8")
    out = tmp_path / "judge.json"
    assert eval_bench(["--task", "judge", "--data_path", str(data), "--out_dir", str(folder), "--hidden_size", "64",
                       "--num_hidden_layers", "2", "--device", "cpu", "--max_new_tokens", "4", "--progress", "0",
                       "--judge_base_url", base_url, "--judge_model", "minimind", "--out", str(out), *flags]) == 0
    return json.loads(out.read_text())["tasks"][0]["models"]["full_sft"]


@pytest.mark.slow  # starts a server
def test_scores_are_read_from_a_real_server(judge_server, tmp_path, capsys):
    base_url, folder = judge_server
    result = judged(folder, tmp_path, base_url, "--judge_max_tokens", "1")
    assert result["n"] == 2 and result["scored"] == 2 and result["score"] == 8.0
    assert [e["judge_reply"] for e in result["examples"]] == ["8", "8"]
    assert [e["answer"] for e in result["examples"]] == ["8888", "8888"]  # the model under test is the same one
    assert "| full_sft | 8.0000 | 2 | 0 | 0 | 2 |" in capsys.readouterr().out


@pytest.mark.slow
def test_unparseable_replies_are_counted_and_shown(judge_server, tmp_path, capsys):
    base_url, folder = judge_server
    result = judged(folder, tmp_path, base_url, "--judge_max_tokens", "3")
    assert result["score"] is None and result["unparseable"] == 2 and result["failed_requests"] == 0
    assert [e["judge_reply"] for e in result["unparsed_examples"]] == ["888", "888"]
    assert "judge reply without a score" in capsys.readouterr().out


@pytest.mark.slow
def test_an_unreachable_judge_is_counted_not_fatal(judge_server, tmp_path):
    _, folder = judge_server
    result = judged(folder, tmp_path, "http://127.0.0.1:9/v1")  # the discard port: nothing listens
    assert result["failed_requests"] == 2 and result["scored"] == 0
    assert "Connection" in result["unparsed_examples"][0]["error"]


@pytest.mark.parametrize("reply, score", [
    ("Score: 7", 7.0), ("**Score:** 9\nThe answer is right.", 9.0), ("评分：6", 6.0), ("I'd give it 4/10.", 4.0),
    ("8", 8.0), ("Score: 11", None), ("888", None), ("The answer is fine.", None), ("", None),
])
def test_score_parsing(reply, score):
    assert parse_score(reply) == score
