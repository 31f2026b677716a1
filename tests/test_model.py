"""The decoder: shapes, loss, attention paths, padding, KV cache, MoE, configs, transformers plumbing."""
import threading

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from model import model_minimind
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM, MOEFeedForward, rope_inverse_frequencies

VOCAB = 6400


def tiny_config(**overrides) -> MiniMindConfig:
    sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return MiniMindConfig(**{**sizes, **overrides})


def tiny_model(seed=0, **overrides) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    return MiniMindForCausalLM(tiny_config(**overrides)).eval()


def random_ids(batch, seq, seed=1):
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_forward_shapes_and_tied_embedding():
    model = tiny_model()
    out = model(random_ids(3, 11))
    assert out.logits.shape == (3, 11, VOCAB)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model(random_ids(3, 11), logits_to_keep=1).logits.shape == (3, 1, VOCAB)


def test_loss_equals_manual_cross_entropy_with_ignored_positions():
    model = tiny_model()
    ids = random_ids(2, 9)
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(ids, labels=labels)
    manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, manual, atol=1e-6)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_sdpa_path_equals_manual_path(padding_side):
    sdpa, manual = tiny_model(seed=3), tiny_model(seed=3, flash_attn=False)
    ids = random_ids(2, 12)
    mask = torch.ones_like(ids)
    if padding_side == "right":
        mask[1, 8:] = 0
    else:
        mask[1, :4] = 0
    for attention_mask in (None, mask):
        a = sdpa(ids, attention_mask=attention_mask).logits
        b = manual(ids, attention_mask=attention_mask).logits
        assert torch.allclose(a, b, atol=1e-5), (padding_side, (a - b).abs().max())


def test_padded_batch_equals_unpadded_rows():
    model = tiny_model()
    short, long = random_ids(1, 5, seed=4), random_ids(1, 9, seed=5)
    alone_short, alone_long = model(short).logits, model(long).logits

    right = torch.cat([F.pad(short, (0, 4)), long])
    right_mask = torch.tensor([[1] * 5 + [0] * 4, [1] * 9])
    out = model(right, attention_mask=right_mask).logits
    assert torch.allclose(out[0, :5], alone_short[0], atol=1e-5)
    assert torch.allclose(out[1], alone_long[0], atol=1e-5)

    left = torch.cat([F.pad(short, (4, 0)), long])
    left_mask = torch.tensor([[0] * 4 + [1] * 5, [1] * 9])
    out = model(left, attention_mask=left_mask).logits
    assert torch.allclose(out[0, 4:], alone_short[0], atol=1e-5)
    assert torch.allclose(out[1], alone_long[0], atol=1e-5)
    assert torch.isfinite(out).all()  # padding rows must not produce NaN


def test_four_d_mask_keeps_packed_documents_apart():
    model = tiny_model()
    doc_a, doc_b = random_ids(1, 4, seed=6), random_ids(1, 6, seed=7)
    packed = torch.cat([doc_a, doc_b], dim=1)
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
    document = torch.tensor([0] * 4 + [1] * 6)
    causal = torch.tril(torch.ones(10, 10, dtype=torch.bool))
    mask = (causal & (document[:, None] == document[None, :]))[None, None]
    out = model(packed, attention_mask=mask, position_ids=position_ids).logits
    assert torch.allclose(out[0, :4], model(doc_a).logits[0], atol=1e-5)
    assert torch.allclose(out[0, 4:], model(doc_b).logits[0], atol=1e-5)


def greedy_without_cache(model, ids, steps):
    logits_seen = []
    for _ in range(steps):
        logits = model(ids).logits[:, -1]
        logits_seen.append(logits)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids, torch.stack(logits_seen, 1)


def greedy_with_cache(model, ids, steps):
    from transformers import DynamicCache
    cache, logits_seen, step_input = DynamicCache(), [], ids
    for _ in range(steps):
        logits = model(step_input, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        logits_seen.append(logits)
        step_input = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, step_input], dim=1)
    return ids, torch.stack(logits_seen, 1)


@pytest.mark.parametrize("use_moe", [False, True])
def test_kv_cache_decoding_equals_full_recomputation(use_moe):
    model = tiny_model(use_moe=use_moe)
    prompt = random_ids(2, 7)
    with torch.no_grad():
        full_ids, full_logits = greedy_without_cache(model, prompt, 12)
        cached_ids, cached_logits = greedy_with_cache(model, prompt, 12)
    assert torch.equal(full_ids, cached_ids)
    assert torch.allclose(full_logits, cached_logits, atol=1e-4)


def test_generate_matches_manual_greedy_and_streams():
    from transformers import AutoTokenizer, TextIteratorStreamer
    from tests.conftest import REPO_ROOT
    tokenizer = AutoTokenizer.from_pretrained(f"{REPO_ROOT}/model")
    model = tiny_model()
    prompt = tokenizer("你好，MiniMind! Hello", return_tensors="pt").input_ids
    with torch.no_grad():
        expected, _ = greedy_without_cache(model, prompt, 10)
    generated = model.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(generated, expected)

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    kwargs = dict(input_ids=prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0,
                  streamer=streamer)
    thread = threading.Thread(target=model.generate, kwargs=kwargs)
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed == tokenizer.decode(expected[0, prompt.shape[1]:])


def test_generate_left_padded_batch_equals_single_prompts():
    model = tiny_model()
    short, long = random_ids(1, 4, seed=8), random_ids(1, 7, seed=9)
    batch = torch.cat([F.pad(short, (3, 0)), long])
    mask = torch.tensor([[0] * 3 + [1] * 4, [1] * 7])
    out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    alone_short = model.generate(short, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    alone_long = model.generate(long, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(out[0, 3:], alone_short[0])
    assert torch.equal(out[1], alone_long[0])


# --- attention kernels and dtypes -----------------------------------------------------------------

class SdpaSpy:
    """Wraps the real F.scaled_dot_product_attention and records what each call received."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = F.scaled_dot_product_attention

        def spy(q, k, v, attn_mask=None, **kwargs):
            self.calls.append(dict(dtypes=(q.dtype, k.dtype, v.dtype), kv_heads=k.shape[1],
                                   enable_gqa=kwargs.get("enable_gqa", False), mask=attn_mask is not None))
            return real(q, k, v, attn_mask=attn_mask, **kwargs)
        monkeypatch.setattr(model_minimind.F, "scaled_dot_product_attention", spy)


def test_attention_gets_one_dtype_under_bf16_autocast(monkeypatch):
    model = tiny_model()
    spy = SdpaSpy(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(random_ids(2, 12))
    assert len(spy.calls) == 2  # one per layer
    assert all(call["dtypes"] == (torch.bfloat16,) * 3 for call in spy.calls), spy.calls


def test_gqa_kernel_only_where_flash_applies(monkeypatch):
    """Off CUDA (and on CUDA in fp32, before sm80, or with a mask) the kv heads are copied, so
    the memory-efficient kernel can run; where flash applies the kernel shares them itself.
    Both give the same logits."""
    model = tiny_model()
    ids = random_ids(2, 12)
    spy = SdpaSpy(monkeypatch)
    expanded = model(ids).logits
    assert [(c["enable_gqa"], c["kv_heads"]) for c in spy.calls] == [(False, 4)] * 2
    monkeypatch.setattr(model_minimind, "flash_kernel_applies", lambda q: True)
    spy.calls.clear()
    shared = model(ids).logits
    assert [(c["enable_gqa"], c["kv_heads"]) for c in spy.calls] == [(True, 2)] * 2
    assert torch.allclose(expanded, shared, atol=1e-5)
    spy.calls.clear()
    model(ids, document_ids=torch.zeros_like(ids))  # an explicit mask: never the GQA kernel
    assert [(c["enable_gqa"], c["mask"]) for c in spy.calls] == [(False, True)] * 2


def test_document_ids_mask_equals_the_explicit_block_diagonal_mask():
    model = tiny_model()
    ids = random_ids(2, 10)
    document_ids = torch.tensor([[0] * 4 + [1] * 6, [0] * 7 + [-1] * 3])
    position_ids = torch.tensor([list(range(4)) + list(range(6)), list(range(7)) + [0] * 3])
    mask = model_minimind.document_attention_mask(document_ids)
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    assert torch.equal(mask[0, 0], causal & (document_ids[0, :, None] == document_ids[0, None, :]))
    assert torch.equal(mask[1, 0, 7:], torch.eye(10, dtype=torch.bool)[7:])  # padding sees itself only
    a = model(ids, document_ids=document_ids, position_ids=position_ids).logits
    b = model(ids, attention_mask=mask, position_ids=position_ids).logits
    assert torch.equal(a, b)
    alone = model(ids[:1, 4:], position_ids=position_ids[:1, 4:]).logits  # the second document by itself
    assert torch.allclose(a[0, 4:], alone[0], atol=1e-5)


# --- mixture of experts ---------------------------------------------------------------------------

def moe_layer(model) -> MOEFeedForward:
    return model.model.layers[0].mlp


def boolean_index_route(layer: MOEFeedForward, tokens, topk_idx, topk_weight):
    """The route MiniMind2 trains with: a copy of each token per slot, each expert run on the
    copies a boolean mask picks. The reference for MOEFeedForward.route."""
    copies = tokens.repeat_interleave(layer.top_k, dim=0)
    expert_of_copy = topk_idx.view(-1)
    out = torch.empty_like(copies)
    for e, expert in enumerate(layer.experts):
        chosen = expert_of_copy == e
        out[chosen] = expert(copies[chosen]).to(out.dtype)
    return (out.view(-1, layer.top_k, tokens.shape[-1]) * topk_weight.unsqueeze(-1)).sum(dim=1)


def test_moe_sorted_route_equals_boolean_index_route_with_gradients():
    model = tiny_model(use_moe=True, n_routed_experts=4, num_experts_per_tok=2).train()
    layer = moe_layer(model)
    x = torch.randn(3, 10, 64)
    topk_idx, topk_weight, _ = layer.gate(x)
    topk_idx[0] = torch.tensor([3, 1])  # make sure the sort has to reorder
    results = []
    for route in (layer.route, lambda *a: boolean_index_route(layer, *a)):
        tokens = x.reshape(-1, 64).clone().requires_grad_(True)
        weights = topk_weight.detach().clone().requires_grad_(True)
        model.zero_grad()
        out = route(tokens, topk_idx, weights)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), tokens.grad, weights.grad,
                        [e.up_proj.weight.grad.clone() for e in layer.experts]))
    (out_a, tok_a, w_a, experts_a), (out_b, tok_b, w_b, experts_b) = results
    assert torch.allclose(out_a, out_b, atol=1e-6)
    assert torch.allclose(tok_a, tok_b, atol=1e-6) and torch.allclose(w_a, w_b, atol=1e-6)
    for a, b in zip(experts_a, experts_b):
        assert torch.allclose(a, b, atol=1e-6)


def test_moe_route_compiles_without_graph_breaks():
    """MiniMind2's boolean-index route breaks the compiled graph at its experts (10 breaks at 2
    layers of 4 experts, measured with torch 2.13 and the same settings); the sorted route, with
    capture_scalar_outputs as the trainers' --compile sets it, is one graph."""
    model = tiny_model(use_moe=True, n_routed_experts=4, num_experts_per_tok=2).train()
    ids = random_ids(2, 8)

    def step(ids):
        out = model(ids, labels=ids)
        return out.loss + out.aux_loss

    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        explained = torch._dynamo.explain(step)(ids)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_moe_aux_loss_positive_in_training_zero_in_eval():
    model = tiny_model(use_moe=True)
    ids = random_ids(2, 16)
    assert model(ids).aux_loss.item() == 0.0
    model.train()
    assert model(ids).aux_loss.item() > 0.0
    model.config.seq_aux = False
    for layer in model.model.layers:
        layer.mlp.gate.seq_aux = False
    assert model(ids).aux_loss.item() > 0.0


def test_moe_gradients_reach_routed_and_shared_experts():
    model = tiny_model(use_moe=True, n_routed_experts=4, num_experts_per_tok=2).train()
    layer = moe_layer(model)
    picked = []
    layer.gate.register_forward_hook(lambda module, inputs, output: picked.append(output[0]))
    ids = random_ids(4, 32)
    out = model(ids, labels=ids)
    (out.loss + out.aux_loss).backward()
    used = set(picked[0].flatten().tolist())
    assert used, "the router picked no expert"
    for e, expert in enumerate(layer.experts):
        grad = expert.gate_proj.weight.grad
        assert grad is not None  # every expert is in the graph, used or not (DDP needs this)
        assert (grad.abs().sum() > 0) == (e in used)
    assert layer.shared_experts[0].down_proj.weight.grad.abs().sum() > 0
    assert layer.gate.weight.grad.abs().sum() > 0


# --- configs and transformers plumbing ------------------------------------------------------------

@pytest.mark.parametrize("sizes, expected", [
    (dict(hidden_size=512, num_hidden_layers=8), 25_829_888),
    (dict(hidden_size=768, num_hidden_layers=16), 104_030_976),
    (dict(hidden_size=640, num_hidden_layers=8, use_moe=True), 145_029_760),
])
def test_official_parameter_counts(sizes, expected):
    with torch.device("meta"):
        model = MiniMindForCausalLM(MiniMindConfig(**sizes))
    assert sum(p.numel() for p in model.parameters()) == expected


def test_state_dict_keys_follow_minimind2():
    keys = set(tiny_model(use_moe=True).state_dict())
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                "model.layers.0.self_attn.q_proj.weight", "model.layers.0.input_layernorm.weight",
                "model.layers.0.mlp.experts.3.down_proj.weight", "model.layers.0.mlp.shared_experts.0.up_proj.weight"}
    assert expected <= keys
    assert not any("bias" in k or "rotary" in k or "freqs" in k for k in keys)
    dense = set(tiny_model().state_dict())
    assert "model.layers.0.mlp.gate_proj.weight" in dense and len(dense) == 3 + 2 * 9


def test_save_pretrained_round_trip_through_auto_classes(tmp_path):
    model = tiny_model(use_moe=True)
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "minimind"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MiniMindForCausalLM)
    ids = random_ids(2, 6)
    assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-6)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_rope_scaling_stretches_only_slow_frequencies():
    plain, _ = rope_inverse_frequencies(tiny_config())
    yarn, scale = rope_inverse_frequencies(tiny_config(rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048, "beta_fast": 32, "beta_slow": 1}))
    assert torch.allclose(yarn[0], plain[0])  # the fastest pair turns many times in 2048 positions: kept
    assert torch.allclose(yarn[-1], plain[-1] / 4)  # the slowest pair is interpolated
    assert scale > 1.0
    ntk, _ = rope_inverse_frequencies(tiny_config(rope_scaling={"type": "ntk", "factor": 4.0}))
    assert ntk[0] == plain[0] and ntk[-1] < plain[-1]
    with pytest.raises(ValueError, match="rope_scaling"):
        rope_inverse_frequencies(tiny_config(rope_scaling={"type": "bogus", "factor": 2.0}))


@pytest.mark.parametrize("hidden, scaling", [
    (512, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}),  # MiniMind2's spelling
    (768, {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 32768, "beta_fast": 32,
           "beta_slow": 1}),
    (64, {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 512, "beta_fast": 16,
          "beta_slow": 2, "attention_factor": 1.5}),
])
def test_yarn_is_transformers_yarn(hidden, scaling):
    """The config says rope_type "yarn" (what an exported config.json claims), and the frequencies and
    attention factor are those of transformers' own YaRN init for the same settings."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config = MiniMindConfig(hidden_size=hidden, rope_scaling=scaling)
    assert config.rope_parameters["rope_type"] == "yarn" and "type" not in config.rope_parameters
    ours, our_scale = rope_inverse_frequencies(config)
    llama = LlamaConfig(hidden_size=hidden, num_attention_heads=config.num_attention_heads,
                        max_position_embeddings=config.max_position_embeddings,
                        rope_parameters=dict(config.rope_parameters))
    reference, reference_scale = ROPE_INIT_FUNCTIONS["yarn"](llama, "cpu")
    assert (ours - reference).abs().max().item() < 1e-6
    assert our_scale == pytest.approx(reference_scale, abs=1e-6)
    assert not torch.allclose(ours, rope_inverse_frequencies(MiniMindConfig(hidden_size=hidden))[0])


def test_bad_head_configuration_is_a_clear_error():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        MiniMindConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=3)


# -- initialisation ----------------------------------------------------------------------------

def assert_kaiming_uniform(weight: torch.Tensor, name: str):
    """PyTorch's nn.Linear default, kaiming_uniform_(a=sqrt(5)): uniform in ±1/sqrt(fan_in),
    so mean 0 and std bound/sqrt(3)."""
    bound = 1 / weight.shape[1] ** 0.5
    w = weight.detach().double()
    assert w.abs().max() <= bound, name
    assert w.abs().max() > 0.99 * bound, name  # fills the interval (a narrower draw would fail)
    assert abs(w.mean()) < 0.05 * bound, name
    assert w.std() == pytest.approx(bound / 3 ** 0.5, rel=0.05), name


@pytest.mark.parametrize("use_moe", [False, True])
def test_default_init_is_pytorchs_per_module_type(use_moe):
    """As MiniMind2's code leaves a new model: every Linear (and the MoE router) kaiming-uniform,
    the embedding is the lm_head Linear's matrix, RMSNorm weights 1."""
    model = tiny_model(hidden_size=128, use_moe=use_moe, n_routed_experts=3)
    linears = {name: m.weight for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    routers = {name: m.weight for name, m in model.named_modules() if type(m).__name__ == "MoEGate"}
    assert len(routers) == (2 if use_moe else 0)
    for name, weight in {**linears, **routers}.items():
        assert_kaiming_uniform(weight, name)
    assert model.model.embed_tokens.weight is model.lm_head.weight
    embedding = model.model.embed_tokens.weight.detach()
    assert embedding.std() == pytest.approx(1 / (3 * 128) ** 0.5, rel=0.02)  # 0.051, not N(0,1)'s 1
    norms = [m.weight for m in model.modules() if type(m).__name__ == "RMSNorm"]
    assert len(norms) == 2 * 2 + 1 and all(bool((w == 1).all()) for w in norms)


def test_default_init_draws_each_weight_once_in_construction_order():
    """The weights are what PyTorch's constructors drew, in MiniMind2's module order (embedding,
    then per layer q/k/v/o, gate/down/up, then lm_head): transformers' post_init draws nothing
    more. So one seed gives MiniMind2's initial weights."""
    config = tiny_config()
    torch.manual_seed(3)
    model = MiniMindForCausalLM(config)
    torch.manual_seed(3)
    torch.nn.Embedding(VOCAB, config.hidden_size)  # drawn first, then replaced by the tied lm_head
    expected = {}
    for i in range(config.num_hidden_layers):
        shapes = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (64, 32), "self_attn.v_proj": (64, 32),
                  "self_attn.o_proj": (64, 64), "mlp.gate_proj": (64, 192), "mlp.down_proj": (192, 64),
                  "mlp.up_proj": (64, 192)}
        for name, (fan_in, fan_out) in shapes.items():
            expected[f"model.layers.{i}.{name}.weight"] = torch.nn.Linear(fan_in, fan_out, bias=False).weight
    expected["lm_head.weight"] = torch.nn.Linear(config.hidden_size, VOCAB, bias=False).weight
    state = model.state_dict()
    for name, weight in expected.items():
        assert torch.equal(state[name], weight), name
    assert torch.equal(state["model.embed_tokens.weight"], expected["lm_head.weight"])


@pytest.mark.parametrize("use_moe", [False, True])
def test_normal_init_option(use_moe):
    std = 0.05
    model = tiny_model(hidden_size=128, use_moe=use_moe, weight_init="normal", initializer_range=std)
    matrices = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "MoEGate"]
    for weight in matrices:
        w = weight.detach().double()
        assert abs(w.mean()) < 0.1 * std and w.std() == pytest.approx(std, rel=0.1)
        assert w.abs().max() > 2.5 * std  # a normal's tails, not a uniform's hard bound
    assert model.model.embed_tokens.weight is model.lm_head.weight
    assert all(bool((m.weight == 1).all()) for m in model.modules() if type(m).__name__ == "RMSNorm")
    with pytest.raises(ValueError, match="weight_init 'xavier'"):
        tiny_config(weight_init="xavier")


def test_loading_keeps_the_saved_weights_and_fills_a_missing_one_with_the_default(tmp_path):
    saved = tiny_model(seed=5, weight_init="normal")
    saved.save_pretrained(tmp_path)
    loaded = MiniMindForCausalLM.from_pretrained(tmp_path)
    for name, weight in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], weight), name
    # a checkpoint without one layer's weight: that weight gets PyTorch's default, not garbage
    from safetensors.torch import load_file, save_file
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    patched = MiniMindForCausalLM.from_pretrained(tmp_path, weight_init="pytorch")
    assert_kaiming_uniform(patched.model.layers[1].mlp.up_proj.weight, "filled in")
    assert torch.equal(patched.model.layers[0].mlp.up_proj.weight, saved.model.layers[0].mlp.up_proj.weight)
