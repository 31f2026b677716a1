"""dataset/lm_dataset.py: exact masks, batching that does not change the loss, bad input."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from dataset.lm_dataset import (DataFormatError, DPODataset, PretrainDataset,
                                SFTDataset, dpo_collate, pack_collate, pad_collate)
from model.model_minimind import document_attention_mask

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SYSTEM = "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(os.path.join(REPO_ROOT, "model"))


def write_jsonl(path, rows):
    """rows: dicts (dumped as JSON) or raw strings (written as they are)."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return str(path)


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def expected_chat(tok, pieces):
    """Token ids and per-token mask from (text, trained) pieces written by hand."""
    ids, mask = [], []
    for text, trained in pieces:
        piece = encode(tok, text)
        ids += piece
        mask += [int(trained)] * len(piece)
    return ids, mask


def user(c):
    return {"role": "user", "content": c}


def assistant(c):
    return {"role": "assistant", "content": c}


# ---------------------------------------------------------------- PretrainDataset

def test_pretrain_item_is_bos_text_eos_shifted(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "你好，世界"}, {"text": "Hello MiniMind"}])
    ds = PretrainDataset(path, tok, max_length=64, cache_dir=tmp_path)
    ids = [1] + encode(tok, "Hello MiniMind") + [2]
    x, y, mask = ds[1]
    assert x.dtype == y.dtype == mask.dtype == torch.long
    assert x.tolist() == ids[:-1] and y.tolist() == ids[1:]
    assert mask.tolist() == [1] * (len(ids) - 1)


def test_pretrain_truncation_drops_tail_and_eos(tok, tmp_path):
    text = "这是一个比较长的句子，会在最大长度处被截断。"
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": text}])
    x, y, mask = PretrainDataset(path, tok, max_length=5, cache_dir=tmp_path)[0]
    ids = ([1] + encode(tok, text))[:5]
    assert x.tolist() == ids[:-1] and y.tolist() == ids[1:] and mask.tolist() == [1, 1, 1, 1]
    assert 2 not in y.tolist()


@pytest.mark.parametrize("text, added", [
    ("<|im_start|>鲁迅是中国现代文学的奠基人之一。<|im_end|>", ""),  # MiniMind2's pretrain_hq.jsonl lines
    ("<|im_start|>没有结尾标记的一行", "eos"),
    ("没有开头标记的一行<|im_end|>", "bos"),
])
def test_pretrain_markers_are_added_only_where_missing(tok, tmp_path, text, added):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": text}])
    x, y, _ = PretrainDataset(path, tok, max_length=64, cache_dir=tmp_path)[0]
    ids = [x[0].item()] + y.tolist()
    body = encode(tok, text)
    assert ids == [1] * ("bos" in added) + body + [2] * ("eos" in added)
    assert ids[0] == 1 and ids[1] != 1 and ids.count(1) == 1  # a single bos
    assert ids[-1] == 2 and ids.count(2) == 1


# ---------------------------------------------------------------- SFTDataset

def test_sft_mask_single_turn_default_system(tok, tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [user("你是谁？"), assistant("我是MiniMind。")]}])
    x, y, mask = SFTDataset(path, tok, max_length=256, cache_dir=tmp_path)[0]
    ids, token_mask = expected_chat(tok, [
        (SYSTEM + "<|im_start|>user\n你是谁？<|im_end|>\n<|im_start|>assistant\n", False),
        ("我是MiniMind。<|im_end|>", True),
        ("\n", False),
    ])
    assert x.tolist() == ids[:-1] and y.tolist() == ids[1:]
    assert mask.tolist() == token_mask[1:]
    # the trained targets decode to exactly the reply and its end marker
    assert tok.decode(y[mask.bool()].tolist()) == "我是MiniMind。<|im_end|>"


def test_sft_mask_multi_turn_with_system(tok, tmp_path):
    conv = [{"role": "system", "content": "你是一个助手。"}, user("1+1=?"), assistant("等于2。"),
            user("那2+2呢？"), assistant("等于4。")]
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": conv}])
    x, y, mask = SFTDataset(path, tok, max_length=256, cache_dir=tmp_path)[0]
    ids, token_mask = expected_chat(tok, [
        ("<|im_start|>system\n你是一个助手。<|im_end|>\n<|im_start|>user\n1+1=?<|im_end|>\n<|im_start|>assistant\n", False),
        ("等于2。<|im_end|>", True),
        ("\n<|im_start|>user\n那2+2呢？<|im_end|>\n<|im_start|>assistant\n", False),
        ("等于4。<|im_end|>", True),
        ("\n", False),
    ])
    assert x.tolist() == ids[:-1] and y.tolist() == ids[1:]
    assert mask.tolist() == token_mask[1:]


def test_sft_cut_reply_trains_its_visible_part(tok, tmp_path):
    conv = [user("1+1=?"), assistant("等于2。"), user("那2+2呢？"), assistant("等于4，这个答案比较长一些。")]
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": conv}])
    pieces = [
        (SYSTEM + "<|im_start|>user\n1+1=?<|im_end|>\n<|im_start|>assistant\n", False),
        ("等于2。<|im_end|>", True),
        ("\n<|im_start|>user\n那2+2呢？<|im_end|>\n<|im_start|>assistant\n", False),
        ("等于4，这个答案比较长一些。<|im_end|>", True),
        ("\n", False),
    ]
    ids, token_mask = expected_chat(tok, pieces)
    end_of_second = len(ids) - 1  # index of the final "\n"
    # cut inside the second reply: the part that fits is trained, with no <|im_end|> put at the cut
    cut = end_of_second - 3
    ds = SFTDataset(path, tok, max_length=cut, cache_dir=tmp_path)
    x, y, mask = ds[0]
    assert x.tolist() == ids[:cut - 1] and y.tolist() == ids[1:cut]
    assert mask.tolist() == token_mask[1:cut]
    trained = tok.decode(y[mask.bool()].tolist())
    assert trained.startswith("等于2。<|im_end|>等于4") and not trained.endswith("<|im_end|>")
    assert "等于4，这个答案比较长一些。".startswith(trained[len("等于2。<|im_end|>"):])
    assert (ds.window.total, ds.window.cut, ds.window.skipped) == (1, 1, 0)
    # cut right after the second <|im_end|>: both replies whole
    x, y, mask = SFTDataset(path, tok, max_length=end_of_second, cache_dir=tmp_path / "b")[0]
    assert mask.tolist() == token_mask[1:end_of_second]
    # cut inside the first user turn: nothing to train, so the sample is skipped (and counted)
    ds = SFTDataset(path, tok, max_length=12, cache_dir=tmp_path / "c")
    assert len(ds) == 0 and (ds.window.total, ds.window.cut, ds.window.skipped) == (1, 0, 1)


def test_a_reply_starting_at_the_last_position_is_trained_on_one_token(tok, tmp_path):
    conv = [user("1+1=?"), assistant("等于2。")]
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": conv}])
    prompt = encode(tok, SYSTEM + "<|im_start|>user\n1+1=?<|im_end|>\n<|im_start|>assistant\n")
    ds = SFTDataset(path, tok, max_length=len(prompt) + 1, cache_dir=tmp_path)
    x, y, mask = ds[0]
    assert mask.tolist() == [0] * (len(prompt) - 1) + [1]
    assert len(SFTDataset(path, tok, max_length=len(prompt), cache_dir=tmp_path)) == 0  # reply starts outside


def test_reasoning_data_uses_sft_dataset(tok, tmp_path):
    reply = "<think>\n1加1等于2。\n</think>\n<answer>\n2\n</answer>"
    path = write_jsonl(tmp_path / "r.jsonl", [{"conversations": [user("1+1?"), assistant(reply)]}])
    x, y, mask = SFTDataset(path, tok, max_length=256, cache_dir=tmp_path)[0]
    assert tok.decode(y[mask.bool()].tolist()) == reply + "<|im_end|>"


# ---------------------------------------------------------------- DPODataset

def test_dpo_item_keys_and_masks(tok, tmp_path):
    row = {"chosen": [user("法国的首都？"), assistant("巴黎。")], "rejected": [user("法国的首都？"), assistant("柏林。")]}
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    item = DPODataset(path, tok, max_length=256, cache_dir=tmp_path)[0]
    assert set(item) == {"x_chosen", "y_chosen", "mask_chosen", "x_rejected", "y_rejected", "mask_rejected"}
    for side, reply in (("chosen", "巴黎。"), ("rejected", "柏林。")):
        ids, token_mask = expected_chat(tok, [
            (SYSTEM + "<|im_start|>user\n法国的首都？<|im_end|>\n<|im_start|>assistant\n", False),
            (reply + "<|im_end|>", True), ("\n", False)])
        assert item[f"x_{side}"].tolist() == ids[:-1] and item[f"y_{side}"].tolist() == ids[1:]
        assert item[f"mask_{side}"].tolist() == token_mask[1:]


def test_dpo_cut_pairs_train_the_visible_part_of_both_sides(tok, tmp_path):
    question = [user("法国的首都？")]
    long_chosen, long_rejected = "巴黎是法国的首都，也是最大的城市。" * 3, "柏林是法国的首都，这是错的。" * 3
    row = {"chosen": question + [assistant(long_chosen)], "rejected": question + [assistant(long_rejected)]}
    prompt = SYSTEM + "<|im_start|>user\n法国的首都？<|im_end|>\n<|im_start|>assistant\n"
    cut = len(encode(tok, prompt)) + 5  # both replies are cut after their first 5 tokens
    ds = DPODataset(write_jsonl(tmp_path / "d.jsonl", [row]), tok, max_length=cut, cache_dir=tmp_path)
    item = ds[0]
    for side, reply in (("chosen", long_chosen), ("rejected", long_rejected)):
        ids, token_mask = expected_chat(tok, [(prompt, False), (reply + "<|im_end|>", True), ("\n", False)])
        assert item[f"y_{side}"].tolist() == ids[1:cut] and item[f"mask_{side}"].tolist() == token_mask[1:cut]
        assert item[f"mask_{side}"].sum() == 5
    assert (ds.window.total, ds.window.cut, ds.window.skipped) == (1, 1, 0)


def test_dpo_pair_with_one_untrainable_side_is_skipped(tok, tmp_path):
    short, long = [user("q"), assistant("好")], [user("长" * 200), assistant("好")]
    rows = [{"chosen": short, "rejected": short}, {"chosen": short, "rejected": long},
            {"chosen": long, "rejected": short}, {"chosen": short, "rejected": [user("q"), assistant("好" * 200)]}]
    ds = DPODataset(write_jsonl(tmp_path / "d.jsonl", rows), tok, max_length=64, cache_dir=tmp_path)
    assert [int(r["line"]) for r in ds.lines.index] == [1, 4]
    assert (ds.window.total, ds.window.cut, ds.window.skipped) == (4, 1, 2)
    assert ds.window_report() == ("2 of 4 pairs (50.0%) have a side with no reply inside --max_seq_len 64 and are "
                                  "skipped; 1 (25.0%) are cut (trained on the part that fits)")
    assert all(ds[i][f"mask_{side}"].sum() > 0 for i in range(len(ds)) for side in ("chosen", "rejected"))


def test_dpo_collate_pads_both_sides_to_one_length(tok, tmp_path):
    rows = [{"chosen": [user("q"), assistant("a" * n)], "rejected": [user("q"), assistant("好")]} for n in (1, 30)]
    ds = DPODataset(write_jsonl(tmp_path / "d.jsonl", rows), tok, max_length=256, cache_dir=tmp_path)
    items = [ds[0], ds[1]]
    batch = dpo_collate(items)
    length = max(len(it[k]) for it in items for k in ("x_chosen", "x_rejected"))
    for key in ("x_chosen", "y_chosen", "mask_chosen", "x_rejected", "y_rejected", "mask_rejected"):
        assert batch[key].shape == (2, length)
    n = len(items[0]["x_rejected"])
    assert batch["mask_rejected"][0, n:].sum() == 0 and (batch["x_rejected"][0, n:] == 0).all()


# ---------------------------------------------------------------- collate: padding and packing

def test_pad_collate_pads_to_longest_with_zero_mask(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "短"}, {"text": "一个长一点的句子，有更多的词。"}])
    ds = PretrainDataset(path, tok, max_length=512, cache_dir=tmp_path)
    batch = pad_collate([ds[0], ds[1]])
    n0, n1 = len(ds[0][0]), len(ds[1][0])
    assert set(batch) == {"input_ids", "labels", "loss_mask"}
    assert batch["input_ids"].shape == (2, max(n0, n1))
    assert batch["loss_mask"][0].tolist() == [1] * n0 + [0] * (n1 - n0)
    assert (batch["input_ids"][0, n0:] == 0).all() and (batch["labels"][0, n0:] == 0).all()


def test_pack_collate_layout(tok, tmp_path):
    texts = ["一", "二三四五六七八九十", "abc def", "你好"]
    ds = PretrainDataset(write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in texts]), tok,
                         max_length=512, cache_dir=tmp_path)
    items = [ds[i] for i in range(len(ds))]
    batch = pack_collate(items)
    rows, length = batch["input_ids"].shape
    assert length == max(len(x) for x, _, _ in items) and rows < len(items)
    assert batch["document_ids"].shape == (rows, length) and "attention_mask" not in batch  # no T x T mask
    assert batch["loss_mask"].sum() == sum(len(x) for x, _, _ in items)  # every real token, no padding
    # position ids restart at 0 at each document start (each document begins with bos = 1)
    starts = batch["input_ids"] == 1
    assert (batch["position_ids"][starts] == 0).all()
    assert int(starts.sum()) == len(items)
    # a token never attends to a token of another document or to the future
    mask = document_attention_mask(batch["document_ids"])[:, 0]
    assert not mask.triu(1).any()
    for r in range(rows):
        doc = torch.cumsum(starts[r].long(), 0)
        real = batch["loss_mask"][r].bool()
        allowed = (doc[:, None] == doc[None, :]) & real[:, None] & real[None, :]
        assert not (mask[r] & ~allowed & real[:, None]).any()


def tiny_model():
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    torch.manual_seed(0)
    config = MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=6400)
    return MiniMindForCausalLM(config).eval()


def summed_loss(model, batch):
    """Sum of the masked per-token cross entropy of a collated batch."""
    out = model(batch["input_ids"], position_ids=batch.get("position_ids"), document_ids=batch.get("document_ids"))
    ce = F.cross_entropy(out.logits.flatten(0, 1).float(), batch["labels"].flatten(), reduction="none")
    return (ce * batch["loss_mask"].flatten()).sum()


def unpadded_loss(model, items):
    """The reference: every item alone, no padding, no packing."""
    return sum(summed_loss(model, {"input_ids": x[None], "labels": y[None], "loss_mask": m[None]})
               for x, y, m in items)


def test_padding_and_packing_do_not_change_the_loss(tok, tmp_path):
    model = tiny_model()
    texts = ["MiniMind是一个小型语言模型。" * 4, "你好", "The capital of France is Paris.", "一周有七天。一年有十二个月。", "猫会喵喵叫。", "2加3等于5。"]
    pretrain = PretrainDataset(write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in texts]), tok, max_length=64)
    sft = SFTDataset(os.path.join(REPO_ROOT, "dataset/demo/sft.jsonl"), tok, max_length=64)
    with torch.no_grad():
        items = [pretrain[i] for i in range(6)]
        assert len({len(x) for x, _, _ in items}) > 1  # lengths really differ
        reference = unpadded_loss(model, items)
        torch.testing.assert_close(summed_loss(model, pad_collate(items)), reference, rtol=1e-4, atol=1e-4)
        packed = pack_collate(items)
        assert packed["input_ids"].shape[0] < len(items)  # documents really share rows
        torch.testing.assert_close(summed_loss(model, packed), reference, rtol=1e-4, atol=1e-4)

        items = [sft[i] for i in range(6)]
        torch.testing.assert_close(summed_loss(model, pad_collate(items)), unpadded_loss(model, items),
                                   rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- bad input

GOOD_SFT = {"conversations": [user("hi"), assistant("hello")]}


@pytest.mark.parametrize("bad,problem", [
    ('{"conversations": [', "not valid JSON"),
    ('{"chat": []}', 'missing key "conversations"'),
    ('{"messages": []}', "non-empty list"),
    (json.dumps({"conversations": [assistant("a"), user("q")]}), "roles out of order"),
    (json.dumps({"conversations": [user("q"), user("q2"), assistant("a")]}), "roles out of order"),
    (json.dumps({"conversations": [user("q"), assistant("  ")]}), "empty assistant turn"),
    (json.dumps({"conversations": [user("q")]}), "end with an assistant turn"),
])
def test_sft_bad_line_is_an_error_naming_file_and_line(tok, tmp_path, bad, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD_SFT, GOOD_SFT, bad, GOOD_SFT])
    with pytest.raises(DataFormatError, match=rf"bad\.jsonl:3: .*{problem}"):
        SFTDataset(path, tok, cache_dir=tmp_path)


@pytest.mark.parametrize("cls,good,bad", [
    (PretrainDataset, {"text": "x"}, '{"content": "x"}'),
    (DPODataset, {"chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("b")]},
     json.dumps({"chosen": [user("q"), assistant("a")]})),
])
def test_pretrain_and_dpo_bad_line_errors(tok, tmp_path, cls, good, bad):
    path = write_jsonl(tmp_path / "bad.jsonl", [good, bad])
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: "):
        cls(path, tok, cache_dir=tmp_path)


def test_skip_bad_lines_counts_and_reports(tok, tmp_path, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD_SFT, "oops", GOOD_SFT, '{"x": 1}', "", GOOD_SFT])
    ds = SFTDataset(path, tok, skip_bad_lines=True, cache_dir=tmp_path)
    assert len(ds) == 3  # the blank line is not data, the two bad lines are skipped
    assert "skipped 2 malformed line(s) (line 2, 4)" in capsys.readouterr().out


def test_big_files_are_validated_lazily_still_naming_the_line(tok, tmp_path):
    path = write_jsonl(tmp_path / "big.jsonl", [{"text": "a"}, {"text": "b"}, "not json"])
    ds = PretrainDataset(path, tok, cache_dir=tmp_path, validate_max_bytes=0)  # treat as a huge file
    assert len(ds) == 3 and len(ds[0][0]) > 0
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=pad_collate)
    with pytest.raises(DataFormatError, match=r"big\.jsonl:3: not valid JSON"):
        next(iter(loader))


def test_chat_data_is_checked_completely_when_its_samples_are_counted(tok, tmp_path):
    # counting what fits reads every line, so even a huge chat file reports a bad line at once
    path = write_jsonl(tmp_path / "big.jsonl", [GOOD_SFT, GOOD_SFT, "not json"])
    with pytest.raises(DataFormatError, match=r"big\.jsonl:3: not valid JSON"):
        SFTDataset(path, tok, cache_dir=tmp_path, validate_max_bytes=0)


# ---------------------------------------------------------------- samples that do not fit

def mixed_sft_rows():
    """Fits / cut but trainable / nothing to train inside 64 tokens, in a known pattern."""
    fits = {"conversations": [user("你好"), assistant("你好！")]}
    cut = {"conversations": [user("讲个故事"), assistant("从前有座山，山里有座庙。" * 20)]}
    dead = {"conversations": [user("请读这段话：" + "很长的文字。" * 60), assistant("好的。")]}
    dead_multi = {"conversations": [user("长" * 200), assistant("一"), user("再来"), assistant("二")]}
    return [fits, cut, dead, fits, dead_multi, cut, fits]


def test_untrainable_samples_are_skipped_and_counted(tok, tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", mixed_sft_rows())
    ds = SFTDataset(path, tok, max_length=64, cache_dir=tmp_path)
    assert [int(r["line"]) for r in ds.lines.index] == [1, 2, 4, 6, 7]
    assert ds.window_report() == ("2 of 7 samples (28.6%) have no reply inside --max_seq_len 64 and are skipped; "
                                  "2 (28.6%) are cut (trained on the part that fits)")
    for i in range(len(ds)):
        x, y, mask = ds[i]
        assert len(x) <= 63 and mask.sum() > 0
    batch = pad_collate([ds[i] for i in range(len(ds))])
    assert (batch["loss_mask"].sum(1) > 0).all()  # no all-masked row reaches a loss
    # the counts are cached with the index; another window is another index
    again = SFTDataset(path, tok, max_length=64, cache_dir=tmp_path)
    assert again.window == ds.window and len(again) == 5
    wide = SFTDataset(path, tok, max_length=4096, cache_dir=tmp_path)
    assert (len(wide), wide.window.cut, wide.window.skipped) == (7, 0, 0)


def test_skipped_samples_leave_no_stale_index_rows_after_pickling(tok, tmp_path):
    import pickle
    ds = SFTDataset(write_jsonl(tmp_path / "s.jsonl", mixed_sft_rows()), tok, max_length=64, cache_dir=tmp_path)
    copy = pickle.loads(pickle.dumps(ds))  # as a DataLoader worker receives it
    assert len(copy) == 5 and all(torch.equal(copy[i][2], ds[i][2]) for i in range(5))


def test_forked_counting_gives_the_same_rows_as_one_process(tok, tmp_path):
    import functools
    from dataset.lm_dataset import chunked_fits, sft_fits
    rows = mixed_sft_rows() * 5
    ds = SFTDataset(write_jsonl(tmp_path / "s.jsonl", rows), tok, max_length=4096, cache_dir=tmp_path)
    fits = functools.partial(sft_fits, tok, 64)
    one = [(s, c.tolist(), t.tolist()) for s, c, t in chunked_fits(ds.lines, fits, chunk=6, workers=1)]
    forked = [(s, c.tolist(), t.tolist()) for s, c, t in chunked_fits(ds.lines, fits, chunk=6, workers=2)]
    assert one == forked and [s for s, _, _ in one] == list(range(0, 35, 6))
    assert sum(sum(t) for _, _, t in one) == 25


def test_reasoning_tags_keep_their_weight_in_a_cut_reply(tok, tmp_path):
    from trainer.train_distill_reason import reasoning_token_weights, tag_token_ids
    reply = "<think>\n先想一想：" + "一步一步地推理。" * 30 + "\n</think>\n<answer>\n2\n</answer>"
    path = write_jsonl(tmp_path / "r.jsonl", [{"conversations": [user("1+1?"), assistant(reply)]}])
    prompt = encode(tok, SYSTEM + "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n")
    ds = SFTDataset(path, tok, max_length=len(prompt) + 20, cache_dir=tmp_path)  # cut inside the thinking
    batch = pad_collate([ds[0]])
    weights = reasoning_token_weights(batch["labels"], batch["loss_mask"], tag_token_ids(tok), 10.0)[0]
    think = encode(tok, "<think>")
    trained = batch["loss_mask"][0].bool()
    assert trained.sum() == 20  # the visible part of the reply is trained
    assert weights[trained][:len(think)].tolist() == [10.0] * len(think)  # the opening tag, weighted
    assert weights[trained][len(think):].tolist() == [1.0] * (20 - len(think))  # no closing tag fits
    assert weights[~trained].sum() == 0


# ---------------------------------------------------------------- index cache

def test_index_is_cached_and_rebuilt_when_the_file_changes(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "一"}, {"text": "二"}])
    cache = tmp_path / "cache"
    assert not PretrainDataset(path, tok, cache_dir=cache).lines.reused_index
    again = PretrainDataset(path, tok, cache_dir=cache)
    assert again.lines.reused_index and len(again) == 2
    write_jsonl(tmp_path / "p.jsonl", [{"text": "一"}, {"text": "二"}, {"text": "三"}])
    changed = PretrainDataset(path, tok, cache_dir=cache)
    assert not changed.lines.reused_index and len(changed) == 3
    assert list(cache.glob("*.tmp")) == [] and len(list(cache.glob("*.idx"))) == 2  # atomic, no leftovers


def test_index_goes_next_to_the_data_by_default(tok, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    path = write_jsonl(data / "s.jsonl", [GOOD_SFT])
    ds = SFTDataset(path, tok, max_length=64)
    assert ds.lines.index_path.parent == data / ".minimind_cache"
    assert len(list((data / ".minimind_cache").glob("s.jsonl.*.idx"))) == 2  # lines, and the trainable ones


def test_index_falls_back_to_the_user_cache_when_the_data_folder_is_not_writable(tok, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    path = write_jsonl(data / "p.jsonl", [{"text": "一"}])
    (data / ".minimind_cache").write_text("a file in the way: no cache folder can be made here")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    ds = PretrainDataset(path, tok)
    assert ds.lines.index_path.parent == tmp_path / "xdg" / "minimind" / "index" and len(ds) == 1


@pytest.mark.skipif(not (hasattr(os, "geteuid") and os.geteuid() == 0 and os.path.exists("/usr/bin/setpriv")),
                    reason="needs root and setpriv to run as an unprivileged user")
def test_read_only_data_folder_as_another_user_uses_the_home_cache(tmp_path):
    import subprocess
    import sys
    data, home = tmp_path / "data", tmp_path / "home"
    data.mkdir()
    home.mkdir()
    write_jsonl(data / "p.jsonl", [{"text": "一"}])
    os.chmod(data, 0o555)
    os.chmod(home, 0o777)
    os.chmod(tmp_path, 0o755)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from dataset.lm_dataset import default_cache_dir; "
            "print(default_cache_dir(sys.argv[2]))")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home)}
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code,
                          REPO_ROOT, str(data / "p.jsonl")], capture_output=True, text=True, env=env, timeout=120)
    if out.returncode != 0 and "Permission denied" in out.stderr:
        pytest.skip("the Python environment is not readable by an unprivileged user")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(home / ".cache" / "minimind" / "index")
    assert not (data / ".minimind_cache").exists()


def test_git_lfs_pointer_gets_a_clear_message(tok, tmp_path):
    pointer = tmp_path / "sft_mini_512.jsonl"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\n"
                       "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
                       "size 1227154221\n")
    for cls in (SFTDataset, PretrainDataset, DPODataset):
        with pytest.raises(DataFormatError, match=r"sft_mini_512\.jsonl: this is a Git LFS pointer, not the data: "
                                                  r"run `git lfs pull`.*1227154221 bytes"):
            cls(str(pointer), tok, cache_dir=tmp_path)


def test_lines_without_final_newline_and_crlf(tok, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes('{"text": "一"}\r\n\r\n{"text": "二"}'.encode())
    ds = PretrainDataset(str(path), tok, cache_dir=tmp_path)
    assert len(ds) == 2
    assert ds[1][1].tolist() == encode(tok, "二") + [2]


# ---------------------------------------------------------------- length-grouped sampler

def test_dataset_pickles_without_copying_the_index(tok, tmp_path):
    import pickle
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": str(i)} for i in range(1000)])
    ds = PretrainDataset(path, tok, cache_dir=tmp_path)
    ds[0]  # opens the file handle
    blob = pickle.dumps(ds.lines)
    assert len(blob) < 1000 * 8  # the 1000-row index (24 KB) is not inside
    copy = pickle.loads(blob)
    assert len(copy) == 1000 and copy[999] == {"text": "999"}


def test_index_is_the_same_for_any_chunk_size(tmp_path):
    from dataset.lm_dataset import INDEX_ROW, build_index, check_pretrain
    lines = ['{"text": "一二三四五六七八九十"}', "", '{"text": "a"}', '{"text": "' + "长" * 50 + '"}']
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")  # no final newline
    indexes = []
    for chunk in (7, 64, 1 << 20):
        target = tmp_path / f"i{chunk}.idx"
        build_index(str(path), check_pretrain, True, False, target, chunk_bytes=chunk)
        indexes.append(np.fromfile(target, dtype=INDEX_ROW).tolist())
    assert indexes[0] == indexes[1] == indexes[2]
    data = path.read_bytes()
    assert [json.loads(data[o:o + n]) for o, n, _ in indexes[0]] == [json.loads(lines[i]) for i in (0, 2, 3)]
    assert [line for _, _, line in indexes[0]] == [1, 3, 4]
