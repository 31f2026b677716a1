"""The reward parts of the RL stages: rules on fixed replies, a user's function, a tiny reward
model built here, and the RLAIF prompt data they score."""
import json

import pytest
import torch

from model.command_line import UserError
from trainer.rewards import (RewardModel, Rewards, correctness_reward, format_reward, length_reward,
                             load_reward_function, parse_length_bounds, repetition_reward)


@pytest.mark.parametrize("reply, answer, expected", [
    ("5加6等于11。", "11", 1.0),
    ("5 plus 6 equals 11.0.", "11", 1.0),            # numbers as numbers
    ("5加6等于12。", "11", 0.0),
    ("11 is wrong, it is 12", "11", 0.0),            # the LAST number is the answer
    ("I do not know.", "11", 0.0),
    ("<think>\n5+6=11, no 10\n</think>\n<answer>\n10\n</answer>", "10", 1.0),  # inside <answer> only
    ("<think>\n5+6=11\n</think>\n<answer>\n等于10\n</answer>", "11", 0.0),
    ("The total is 1,250.", "1250", 1.0),
    ("The capital of France is Paris.", "Paris", 1.0),
    ("法国的首都是 巴黎。", "巴黎", 1.0),             # spaces ignored
    ("The capital of France is paris", "Paris", 1.0),  # case ignored
    ("The capital of France is Lyon.", "Paris", 0.0),
])
def test_correctness(reply, answer, expected):
    assert correctness_reward(reply, {"answer": answer}) == expected


def test_correctness_without_answer_is_zero():
    assert correctness_reward("11", {"conversations": []}) == 0.0


def test_format_only_judges_replies_that_think():
    assert format_reward("just an answer") == 0.0
    assert format_reward("<think>\nhm\n</think>\n<answer>\n3\n</answer>") == 0.5
    assert format_reward("<think>\nhm\n</think>\n3") == -0.5                         # no <answer>
    assert format_reward("<think>a</think><think>b</think><answer>3</answer>") == -0.5  # two thoughts


def test_length_and_repetition():
    assert length_reward("ok", 2, 5) == 0.0 and length_reward("x", 2, 5) == -0.5 and length_reward("123456", 2, 5) == -0.5
    assert repetition_reward("the cat sat on the mat") == 0.0
    # 10 words "a b a b ...": 8 trigrams, 2 distinct -> 6/8 repeated, capped at 0.5
    assert repetition_reward("a b " * 5) == -0.5
    # "x y z x y z w": trigrams xyz yzx zxy xyz yzw -> 1 repeated of 5
    assert repetition_reward("x y z x y z w") == pytest.approx(-0.2)
    with pytest.raises(UserError, match="MIN:MAX"):
        parse_length_bounds("800")


def test_parts_are_scored_separately():
    rewards = Rewards(rules=("correctness", "length"), length_bounds=(2, 10))
    parts = rewards.score([[{"role": "user", "content": "1+1?"}]] * 2, ["2", "it is 2, surely, yes"],
                          [{"answer": "2"}] * 2)
    assert parts["correctness"].tolist() == [1.0, 1.0] and parts["length"].tolist() == [-0.5, -0.5]
    with pytest.raises(UserError, match="unknown rule"):
        Rewards(rules=("politeness",))


def test_reward_function_from_a_file(tmp_path):
    (tmp_path / "mine.py").write_text("def reward(prompt, response, sample):\n"
                                      "    return len(response) + (10 if sample.get('tag') == prompt else 0)\n"
                                      "def bad(prompt, response, sample):\n    return 'high'\n")
    rewards = Rewards(rules=(), function=load_reward_function(f"{tmp_path}/mine.py:reward"))
    parts = rewards.score([[{"role": "user", "content": "q"}]] * 2, ["abc", "a"], [{"tag": "q"}, {}])
    assert parts["function"].tolist() == [13.0, 1.0]  # the prompt is the last user message
    for spec, message in [(f"{tmp_path}/mine.py:nothing", "defines no function nothing"),
                          (f"{tmp_path}/missing.py:reward", "no such file"), ("mine.py", "FILE.py:NAME")]:
        with pytest.raises(UserError, match=message):
            load_reward_function(spec)
    bad = Rewards(rules=(), function=load_reward_function(f"{tmp_path}/mine.py:bad"))
    with pytest.raises(UserError, match="finite number"):
        bad.score([[{"role": "user", "content": "q"}]], ["x"], [{}])


def make_tiny_reward_model(folder) -> str:
    """A real transformers sequence-classification model (random, 2 layers) with the MiniMind
    tokenizer, saved as a folder: what --reward_model_path takes."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification
    from model.checkpoint import REPO_ROOT
    tokenizer = AutoTokenizer.from_pretrained(f"{REPO_ROOT}/model")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def reward_model_folder(tmp_path_factory):
    return make_tiny_reward_model(tmp_path_factory.mktemp("reward_model"))


def test_reward_model_scores_are_its_logits(reward_model_folder):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    model = RewardModel(reward_model_folder, torch.device("cpu"), torch.float32, batch_size=2)
    messages = [[{"role": "user", "content": "1+1?"}]] * 3
    replies = ["2", "two, I think, but I am not sure", "3"]
    scores = model.score(messages, replies)
    # each score is the model's logit for that conversation alone (padding in a batch changes nothing)
    reference = AutoModelForSequenceClassification.from_pretrained(reward_model_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(reward_model_folder)
    for i, reply in enumerate(replies):
        text = tokenizer.apply_chat_template(messages[i] + [{"role": "assistant", "content": reply}], tokenize=False)
        with torch.no_grad():
            expected = reference(**tokenizer(text, return_tensors="pt")).logits[0, 0]
        assert scores[i].item() == pytest.approx(expected.item(), abs=1e-5)
    assert len(set(scores.tolist())) == 3


def test_reward_model_folder_errors(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        RewardModel(str(tmp_path / "none"), torch.device("cpu"), torch.float32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="sequence-classification folder"):
        RewardModel(str(tmp_path / "empty"), torch.device("cpu"), torch.float32)


def test_rlaif_rows_become_prompts(tmp_path):
    from dataset.lm_dataset import DataFormatError, RLAIFDataset
    from trainer.stage import load_tokenizer
    rows = [{"conversations": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": ""}], "answer": "2"},
            {"conversations": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
            {"conversations": [{"role": "user", "content": "很长" * 200}]}]
    path = tmp_path / "rlaif.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tokenizer = load_tokenizer()
    dataset = RLAIFDataset(str(path), tokenizer, max_length=64, cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == 2 and "1 of 3 prompts (33.3%) do not fit inside --max_seq_len 64" in dataset.window_report()
    first = dataset[0]
    assert tokenizer.decode(first["prompt_ids"]).endswith("<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n")
    assert first["sample"]["answer"] == "2" and first["messages"] == rows[0]["conversations"][:1]
    assert tokenizer.decode(dataset[1]["prompt_ids"]).startswith("<|im_start|>system\nBe brief.")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"conversations": [{"role": "assistant", "content": "hi"}]}) + "\n")
    with pytest.raises(DataFormatError, match=r"bad.jsonl:1: .*must end with a user turn|bad.jsonl:1: conversation"):
        RLAIFDataset(str(bad), tokenizer, cache_dir=str(tmp_path / "cache"))
