"""MiniMind2: a small decoder-only language model, written to be read top to bottom.

Architecture (the MiniMind2 / Llama family):
    tokens -> embedding -> N x [RMSNorm -> GQA attention (RoPE) -> residual,
                                RMSNorm -> SwiGLU FFN or MoE    -> residual]
           -> RMSNorm -> lm_head (tied to the embedding) -> logits

Parameter names follow transformers' modeling_llama.py, so released MiniMind2 `.pth`
checkpoints load with strict=True. The model is a transformers `PreTrainedModel` with
`GenerationMixin`, so `generate()`, `save_pretrained()` and the Auto* classes work.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig,
                          PreTrainedModel)
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

WEIGHT_INITS = ("pytorch", "normal")


class MiniMindConfig(PretrainedConfig):
    model_type = "minimind"

    def __init__(
        self,
        vocab_size: int = 6400,
        hidden_size: int = 512,
        num_hidden_layers: int = 8,
        num_attention_heads: int = 8,
        num_key_value_heads: int = 2,
        intermediate_size: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        rope_theta: float = 1e6,
        rope_scaling: dict | None = None,
        rms_norm_eps: float = 1e-5,
        dropout: float = 0.0,
        flash_attn: bool = True,
        weight_init: str = "pytorch",
        initializer_range: float = 0.02,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        pad_token_id: int = 0,
        tie_word_embeddings: bool = True,
        # Mixture of experts (used only when use_moe=True)
        use_moe: bool = False,
        num_experts_per_tok: int = 2,
        n_routed_experts: int = 4,
        n_shared_experts: int = 1,
        scoring_func: str = "softmax",
        aux_loss_alpha: float = 0.1,
        seq_aux: bool = True,
        norm_topk_prob: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        # SwiGLU keeps the FFN's parameter count close to a 4x MLP: 8/3 * hidden, rounded up to 64.
        self.intermediate_size = intermediate_size or 64 * math.ceil(8 * hidden_size / 3 / 64)
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        # transformers 5 keeps RoPE settings in `rope_parameters` (`rope_scaling` is its old name)
        # (MiniMind2 writes {"type": "yarn", ...}; the standard key is "rope_type")
        scaling = dict(rope_scaling or {})
        rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
        self.rope_parameters = {**scaling, "rope_type": rope_type, "rope_theta": rope_theta}
        self.rms_norm_eps = rms_norm_eps
        self.dropout = dropout
        self.flash_attn = flash_attn
        # How a new model's weights are drawn (loading a checkpoint is unaffected):
        #   "pytorch": PyTorch's own defaults, exactly as MiniMind2's code leaves them: every Linear
        #              kaiming-uniform (within ±1/sqrt(fan_in)), the tied embedding = the lm_head
        #              Linear's weights, the MoE router likewise, RMSNorm weights 1.
        #   "normal":  transformers' convention: Linear, embedding and router normal(0, initializer_range).
        if weight_init not in WEIGHT_INITS:
            raise ValueError(f"weight_init {weight_init!r} is not one of {', '.join(WEIGHT_INITS)}")
        self.weight_init = weight_init
        self.initializer_range = initializer_range
        self.use_moe = use_moe
        self.num_experts_per_tok = num_experts_per_tok
        self.n_routed_experts = n_routed_experts
        self.n_shared_experts = n_shared_experts
        self.scoring_func = scoring_func
        self.aux_loss_alpha = aux_loss_alpha
        self.seq_aux = seq_aux
        self.norm_topk_prob = norm_topk_prob
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs)
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}")
        if num_attention_heads % num_key_value_heads:
            raise ValueError(f"num_attention_heads {num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {num_key_value_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 so that bf16/fp16 training stays stable."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # the same formula as below, as one fused kernel: fewer passes over x when decoding
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.type_as(x)


def rope_inverse_frequencies(config: MiniMindConfig) -> tuple[torch.Tensor, float]:
    """Per-pair rotation speeds of RoPE, and the attention temperature that goes with them.

    Without `rope_scaling` this is plain RoPE. With it, positions beyond the trained length are
    reached by slowing some of the rotations down:
      - {"rope_type": "yarn", "factor": f, "original_max_position_embeddings": L,
         "beta_fast": 32, "beta_slow": 1}: YaRN as transformers defines it (`rope_type` "yarn").
        Pair i turns L / (2π · θ^(2i/d)) times over the trained length L. Pairs that turn more
        than beta_fast times keep their frequency (they never saw a new angle), pairs that turn
        fewer than beta_slow times are divided by f (interpolated), and in between a linear ramp
        over the pair index blends the two; its ends are the pair indices where the turn count
        crosses beta_fast and beta_slow, rounded outwards. cos/sin are scaled by 0.1·ln(f) + 1
        (or `attention_factor`) to keep attention entropy in check.
      - {"rope_type": "ntk", "factor": f}: the base theta is stretched so that the slowest pair
        covers f times more positions (static NTK-aware scaling; not a transformers rope type).
    MiniMind2's spelling {"type": "yarn", ...} is accepted too.
    """
    dim = config.head_dim
    theta = config.rope_theta
    scaling = config.rope_parameters or {}
    kind = scaling.get("rope_type", "default")
    factor = float(scaling.get("factor") or 1.0)
    if kind not in ("default", "ntk", "yarn"):
        raise ValueError(f"unknown rope_scaling type {kind!r}; use 'yarn' or 'ntk'")
    if kind == "ntk":
        theta = theta * factor ** (dim / (dim - 2))
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if kind != "yarn":
        return inv_freq, 1.0
    original_len = scaling.get("original_max_position_embeddings", config.max_position_embeddings)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32.0, scaling.get("beta_slow") or 1.0

    def pair_index_turning(turns: float) -> float:
        """The (fractional) pair index i at which pair i turns `turns` times over original_len."""
        return dim * math.log(original_len / (turns * 2 * math.pi)) / (2 * math.log(theta))

    first = max(math.floor(pair_index_turning(beta_fast)), 0)
    last = min(math.ceil(pair_index_turning(beta_slow)), dim - 1)
    last = last if last > first else first + 0.001  # a zero-width ramp would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - first) / (last - first)).clamp(0.0, 1.0)
    inv_freq = inv_freq * (1 - ramp) + (inv_freq / factor) * ramp  # 0 = keep, 1 = interpolate
    attention_scale = scaling.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
    return inv_freq, attention_scale


def rotary_cos_sin(inv_freq: torch.Tensor, attention_scale: float, position_ids: torch.Tensor,
                   dtype: torch.dtype):
    """cos/sin tables for the given positions, shape (batch, 1, seq, head_dim) (the 1 broadcasts
    over the heads: shaped once here, not in every layer), in `dtype`.

    The angles are computed in fp32 (positions up to 32k need its precision), then cast to the
    dtype q and k have, so that rotating them keeps them in that dtype: under bf16 autocast a
    fp32 table would silently promote q and k to fp32 in every layer.
    Computed from position_ids at each forward (not stored as a buffer), so padded batches and
    packed documents get the right angles and there is no table to keep in the checkpoint."""
    angles = position_ids[:, None, :, None].float() * inv_freq
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout: [θ0..θd/2, θ0..θd/2]
    cos, sin = angles.cos(), angles.sin()
    if attention_scale != 1.0:  # YaRN only
        cos, sin = cos * attention_scale, sin * attention_scale
    return cos.to(dtype), sin.to(dtype)


def activation_dtype(hidden_states: torch.Tensor) -> torch.dtype:
    """The dtype the linear layers produce: autocast's dtype when it is on, else the input's."""
    device_type = hidden_states.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden_states.dtype


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (i, i + d/2) pair of x by its angle. x: (batch, heads, seq, head_dim),
    cos/sin: (batch, 1, seq, head_dim) from rotary_cos_sin."""
    return x * cos + rotate_half(x) * sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """GQA: share each key/value head among n_rep query heads. (b, kv, s, d) -> (b, kv*n_rep, s, d)."""
    if n_rep == 1:
        return x
    b, kv_heads, s, d = x.shape
    return x[:, :, None].expand(b, kv_heads, n_rep, s, d).reshape(b, kv_heads * n_rep, s, d)


def build_attention_mask(attention_mask: torch.Tensor | None, query_len: int, past_len: int,
                         device: torch.device, document_ids: torch.Tensor | None = None) -> torch.Tensor | None:
    """The boolean (batch, 1, query, key) mask for attention, True = may attend, or None when
    plain causal attention is enough (then SDPA's `is_causal` fast path is used).

    `attention_mask` is either a 2D padding mask (batch, past + query) with 1 on real tokens,
    or an explicit 4D boolean mask that is passed through. `document_ids` (batch, seq), from
    packed batches, keeps each document to itself (see document_attention_mask)."""
    if document_ids is not None:
        return document_attention_mask(document_ids.to(device))
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.bool()
    has_padding = attention_mask is not None and not bool(attention_mask.all())
    if not has_padding and (past_len == 0 or query_len == 1):
        return None
    key_len = past_len + query_len
    query_pos = torch.arange(past_len, key_len, device=device)[:, None]
    key_pos = torch.arange(key_len, device=device)[None, :]
    mask = (key_pos <= query_pos)[None, None]  # causal
    if has_padding:
        mask = mask & attention_mask[:, None, None, -key_len:].bool()
        # A padding query would see no key at all (softmax of nothing = NaN); let it see itself.
        mask = mask | (key_pos == query_pos)[None, None]
    return mask


def document_attention_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Causal attention inside each packed document: (batch, seq) ids -> (batch, 1, seq, seq).

    Built where the ids are (on the GPU in training), so the collate function ships B x T ids
    instead of a B x T x T mask. Padding (id -1) attends only to itself, so no row is empty."""
    seq = document_ids.shape[1]
    position = torch.arange(seq, device=document_ids.device)
    causal = position[None, :] <= position[:, None]
    same_document = (document_ids[:, :, None] == document_ids[:, None, :]) & (document_ids[:, :, None] >= 0)
    itself = position[None, :] == position[:, None]
    return ((same_document & causal) | itself)[:, None]


# ----------------------------------------------------------------------------------------------
# Attention, feed-forward and mixture of experts
# ----------------------------------------------------------------------------------------------

FLASH_DTYPES = (torch.float16, torch.bfloat16)


def flash_kernel_applies(q: torch.Tensor) -> bool:
    """Whether SDPA's flash kernel can take this query: CUDA, half precision, sm80 or newer."""
    return q.is_cuda and q.dtype in FLASH_DTYPES and cuda_capability(q.device) >= (8, 0)


@torch.compiler.assume_constant_result  # a fixed fact of the machine: torch.compile folds it in
def cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def fast_half_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the GPU computes it on tensor cores (compute capability 8.0+: A100, RTX 30xx
    and newer), else fp16. torch.cuda.is_bf16_supported() also counts emulated bf16 (T4, V100,
    RTX 20xx), which runs without tensor cores or flash attention."""
    return torch.bfloat16 if cuda_capability(device) >= (8, 0) else torch.float16


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads (GQA) and rotary positions."""

    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.flash_attn = config.flash_attn

    def forward(self, hidden_states, cos, sin, mask, past_key_values=None):
        batch, seq, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)  # returns all keys/values so far
        n_rep = self.num_heads // self.num_kv_heads
        dropout = self.dropout if self.training else 0.0
        if not self.flash_attn:
            out = self.manual_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), mask, dropout)
        elif mask is None and flash_kernel_applies(q):
            # the flash kernel shares each kv head among its query heads itself, without a copy
            is_causal = seq > 1 and k.shape[2] == seq
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=is_causal, enable_gqa=True)
        elif seq == 1 and n_rep > 1:
            # Decoding, one query per row: the n_rep query heads that share a kv head become n_rep
            # queries of that head, so the cached keys and values are read in place, not copied
            grouped = q.reshape(batch, self.num_kv_heads, n_rep, self.head_dim)
            out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask, dropout_p=dropout)
            out = out.reshape(batch, self.num_heads, 1, self.head_dim)
        else:
            # Elsewhere enable_gqa would leave only the O(T²)-memory math kernel (fp32, GPUs before
            # sm80, explicit masks); with copied kv heads the memory-efficient kernel can run.
            is_causal = mask is None and seq > 1 and k.shape[2] == seq
            out = F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask,
                                                 dropout_p=dropout, is_causal=is_causal)
        out = out.transpose(1, 2).reshape(batch, seq, -1)
        return self.resid_dropout(self.o_proj(out))

    @staticmethod
    def manual_attention(q, k, v, mask, dropout):
        """softmax(q·kᵀ/√d + mask)·v written out, the reference for the SDPA path."""
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        if mask is None:
            query_len, key_len = q.shape[2], k.shape[2]
            key_pos = torch.arange(key_len, device=q.device)
            query_pos = torch.arange(key_len - query_len, key_len, device=q.device)
            mask = key_pos[None, :] <= query_pos[:, None]
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = F.dropout(scores.float().softmax(dim=-1).type_as(q), p=dropout)
        return probs @ v


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        # built in MiniMind2's order (gate, down, up), so one seed draws the same initial weights
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class MoEGate(nn.Module):
    """Scores every routed expert for every token and picks the top-k.

    Returns (expert index, routing weight) per token and slot, and the load-balancing loss that
    pushes the router to spread tokens evenly (only while training)."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_routed_experts = config.n_routed_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.alpha = config.aux_loss_alpha
        self.seq_aux = config.seq_aux
        if config.scoring_func != "softmax":
            raise ValueError(f"unsupported scoring_func {config.scoring_func!r}; MiniMind uses 'softmax'")
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The router starts like an nn.Linear of the same shape (as in MiniMind2)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, hidden_states: torch.Tensor):
        batch, seq, hidden = hidden_states.shape
        scores = F.linear(hidden_states.reshape(-1, hidden), self.weight).softmax(dim=-1)
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        if self.training and self.alpha > 0.0:
            aux_loss = self.load_balancing_loss(scores, topk_idx, batch, seq)
        else:
            aux_loss = scores.new_zeros(())
        return topk_idx, topk_weight, aux_loss

    def load_balancing_loss(self, scores, topk_idx, batch, seq):
        """alpha * sum_e (fraction of picks going to e, scaled so uniform = 1) * (mean score of e).

        Minimal when picks and scores are uniform over experts. `seq_aux` measures the balance
        inside each sequence and averages over the batch; otherwise over all tokens at once."""
        n_experts = self.n_routed_experts
        if self.seq_aux:
            picks = topk_idx.view(batch, -1)
            load = torch.zeros(batch, n_experts, device=scores.device, dtype=scores.dtype)
            load.scatter_add_(1, picks, torch.ones_like(picks, dtype=scores.dtype))
            load = load / (seq * self.top_k / n_experts)
            mean_scores = scores.view(batch, seq, n_experts).mean(dim=1)
            return (load * mean_scores).sum(dim=1).mean() * self.alpha
        picked_share = F.one_hot(topk_idx.view(-1), num_classes=n_experts).float().mean(0)
        return (scores.mean(0) * picked_share * n_experts).sum() * self.alpha


class MOEFeedForward(nn.Module):
    """Mixture of experts: each token goes through its top-k routed experts (weighted by the
    router) plus every shared expert."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.experts = nn.ModuleList([FeedForward(config) for _ in range(config.n_routed_experts)])
        self.gate = MoEGate(config)
        self.shared_experts = nn.ModuleList([FeedForward(config) for _ in range(config.n_shared_experts)])
        self.aux_loss = None  # set by every forward, summed by MiniMindModel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        topk_idx, topk_weight, self.aux_loss = self.gate(x)
        y = self.route(x.reshape(-1, hidden), topk_idx, topk_weight).view(batch, seq, hidden)
        for expert in self.shared_experts:
            y = y + expert(x)
        return y

    def route(self, tokens, topk_idx, topk_weight):
        """Run each routed expert once, on all the tokens routed to it, and add its weighted
        outputs back at those tokens.

        The (token, slot) pairs are sorted by expert, so each expert's tokens are one contiguous
        slice: the only thing that crosses to the host is the n_routed expert sizes, once per
        layer (no per-expert boolean indexing, whose hidden nonzero() syncs on every expert;
        torch.compile traces it whole with capture_scalar_outputs). Every expert runs, on zero
        tokens if none chose it, so each one is in the autograd graph and DDP sees all gradients."""
        n_experts = len(self.experts)
        expert_of_slot = topk_idx.reshape(-1)
        order = expert_of_slot.argsort(stable=True)
        token_of_slot = order // self.top_k
        # a scatter, not bincount: its output has a fixed shape, which torch.compile can trace
        sizes = torch.zeros(n_experts, dtype=torch.long, device=tokens.device).scatter_add_(
            0, expert_of_slot, torch.ones_like(expert_of_slot)).tolist()
        expert_inputs = tokens[token_of_slot].split(sizes)
        expert_outputs = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, expert_inputs)])
        weight_of_slot = topk_weight.reshape(-1)[order].unsqueeze(-1).to(tokens.dtype)
        return torch.zeros_like(tokens).index_add(0, token_of_slot, expert_outputs.to(tokens.dtype) * weight_of_slot)


# ----------------------------------------------------------------------------------------------
# The decoder
# ----------------------------------------------------------------------------------------------

class MiniMindBlock(nn.Module):
    """One pre-norm transformer layer: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, layer_idx: int, config: MiniMindConfig):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MOEFeedForward(config) if config.use_moe else FeedForward(config)

    def forward(self, hidden_states, cos, sin, mask, past_key_values=None):
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), cos, sin, mask,
                                                       past_key_values)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class MiniMindPreTrainedModel(PreTrainedModel):
    config_class = MiniMindConfig
    config: MiniMindConfig
    base_model_prefix = "model"
    _no_split_modules = ["MiniMindBlock"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        """Draws one module's weights as config.weight_init says. transformers calls it for every
        module of a new model and for the weights a checkpoint lacks."""
        if self.config.weight_init == "normal":
            super()._init_weights(module)  # normal(0, initializer_range) for Linear/Embedding, 1 for norms
            if isinstance(module, MoEGate):
                nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, (nn.Linear, nn.Embedding, MoEGate)):
            module.reset_parameters()  # PyTorch's default for the module type

    def keep_constructor_weights(self):
        """With weight_init="pytorch", the layers' constructors have already drawn PyTorch's
        defaults: mark them done, so that post_init does not draw them a second time. Drawing
        once keeps the random stream MiniMind2's: the same seed gives the same initial weights.
        (from_pretrained builds on the meta device, where nothing is drawn: not marked there.)"""
        if self.config.weight_init == "pytorch" and self.device.type != "meta":
            for module in self.modules():
                module._is_hf_initialized = True


class MiniMindModel(MiniMindPreTrainedModel):
    def __init__(self, config: MiniMindConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([MiniMindBlock(i, config) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self._rope = None
        self.keep_constructor_weights()
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, inputs_embeds=None, document_ids=None, **kwargs):
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        query_len = hidden_states.shape[1]
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = self.default_position_ids(attention_mask, query_len, past_len, hidden_states.device)
        inv_freq, attention_scale = self.rope_frequencies(hidden_states.device)
        cos, sin = rotary_cos_sin(inv_freq, attention_scale, position_ids, activation_dtype(hidden_states))
        mask = build_attention_mask(attention_mask, query_len, past_len, hidden_states.device, document_ids)

        hidden_states = self.dropout(hidden_states)
        for layer in self.layers:
            hidden_states = layer(hidden_states, cos, sin, mask, past_key_values)
        aux_loss = sum((layer.mlp.aux_loss for layer in self.layers if isinstance(layer.mlp, MOEFeedForward)),
                       hidden_states.new_zeros(()))
        return self.norm(hidden_states), past_key_values, aux_loss

    def rope_frequencies(self, device):
        """RoPE frequencies, computed once per device (lazily: the model may be built on 'meta')."""
        if self._rope is None or self._rope[0].device != device:
            inv_freq, attention_scale = rope_inverse_frequencies(self.config)
            self._rope = (inv_freq.to(device), attention_scale)
        return self._rope

    @staticmethod
    def default_position_ids(attention_mask, query_len, past_len, device):
        """0, 1, 2, ... counted over real tokens only, so a left-padded prompt starts at 0."""
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            return positions[:, -query_len:]
        return torch.arange(past_len, past_len + query_len, device=device)[None, :]


class MiniMindForCausalLM(MiniMindPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MiniMindConfig | None = None):
        config = config or MiniMindConfig()
        super().__init__(config)
        self.model = MiniMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.model.embed_tokens.weight = self.lm_head.weight  # tied: one matrix reads and writes tokens
        self.keep_constructor_weights()
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, labels=None, logits_to_keep: int = 0, inputs_embeds=None, document_ids=None,
                **kwargs):
        """`document_ids` (batch, seq), -1 on padding: packed rows, attention kept inside each document."""
        hidden_states, past_key_values, aux_loss = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, use_cache=use_cache, inputs_embeds=inputs_embeds,
            document_ids=document_ids)
        if logits_to_keep:  # generation only needs the last position's logits
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            # token t predicts token t+1 (shift the labels, not the big logits tensor); -100 = no target
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=logits,
                                         past_key_values=past_key_values if use_cache else None)


AutoConfig.register(MiniMindConfig.model_type, MiniMindConfig, exist_ok=True)
AutoModelForCausalLM.register(MiniMindConfig, MiniMindForCausalLM, exist_ok=True)
