"""From-scratch LoRA: a fresh adapter is a no-op, training touches only adapters, merge/save/load are exact."""
import pytest
import torch

from model.model_lora import (apply_lora, load_lora, lora_state_dict, mark_only_lora_trainable, merge_lora,
                              save_lora)
from tests.test_model import random_ids, tiny_model


def perturb_adapters(model, seed=0):
    """Give B non-zero values, as training would, so adapters change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora.B.weight"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def test_default_targets_are_the_square_projections():
    names = apply_lora(tiny_model(), rank=4)
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "o_proj")]
    names = apply_lora(tiny_model(), rank=4, targets=["q_proj", "v_proj", "down_proj"])
    assert len(names) == 6 and all(n.split(".")[-1] in {"q_proj", "v_proj", "down_proj"} for n in names)
    with pytest.raises(ValueError, match="no linear layer"):
        apply_lora(tiny_model(), rank=4, targets=["nonexistent"])


def test_fresh_adapter_leaves_outputs_unchanged():
    model = tiny_model()
    ids = random_ids(2, 8)
    before = model(ids).logits
    apply_lora(model, rank=8)
    assert torch.equal(model(ids).logits, before)


def test_training_step_changes_only_adapter_parameters():
    model = tiny_model().train()
    apply_lora(model, rank=4)
    trainable = mark_only_lora_trainable(model)
    assert trainable == 4 * (4 * 64 + 64 * 4)  # 4 adapted layers, A (4x64) + B (64x4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = random_ids(2, 12)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora." in k for k in changed)
    assert any(k.endswith("lora.B.weight") for k in changed)


def test_merged_model_equals_unmerged_and_drops_adapters():
    model = tiny_model()
    apply_lora(model, rank=4)
    perturb_adapters(model)
    ids = random_ids(2, 8)
    unmerged = model(ids).logits
    merge_lora(model)
    assert torch.allclose(model(ids).logits, unmerged, atol=1e-5)
    assert not lora_state_dict(model)
    assert set(model.state_dict()) == set(tiny_model().state_dict())


def test_save_load_round_trip(tmp_path):
    model = tiny_model()
    apply_lora(model, rank=4)
    perturb_adapters(model)
    path = tmp_path / "lora" / "identity_64.pth"
    save_lora(model, str(path))
    saved = torch.load(path, weights_only=True)
    assert set(saved) == set(lora_state_dict(model)) and all(v.dtype == torch.float16 for v in saved.values())

    fresh = tiny_model()
    apply_lora(fresh, rank=4)
    load_lora(fresh, str(path))
    ids = random_ids(2, 8)
    assert torch.allclose(fresh(ids).logits, model(ids).logits, atol=1e-3)  # fp16 storage


def test_mismatched_adapter_is_rejected(tmp_path):
    model = tiny_model()
    apply_lora(model, rank=4)
    path = str(tmp_path / "rank4.pth")
    save_lora(model, path)

    other_rank = tiny_model()
    apply_lora(other_rank, rank=8)
    with pytest.raises(ValueError, match=r"file rank 4.*\(4, 64\) vs model \(8, 64\)"):
        load_lora(other_rank, path)

    other_layers = tiny_model()
    apply_lora(other_layers, rank=4, targets=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="missing .*v_proj.lora"):
        load_lora(other_layers, path)

    with pytest.raises(ValueError, match="no LoRA adapters"):
        load_lora(tiny_model(), path)
