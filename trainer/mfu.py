"""Model FLOPs utilisation: how much of the GPU's matrix throughput the training run uses.

    MFU = model FLOPs per token x tokens per second / the device's peak FLOP/s for the dtype

Model FLOPs count the matrix products of one forward and backward pass (backward = 2 x
forward), whatever the implementation really executes (no recomputation, no padding), so MFU
compares runs and implementations fairly; PaLM (Chowdhery et al. 2022, appendix B) and
nanoGPT count the same way:

    6 x (matmul parameters a token passes through) + 12 x layers x hidden x seq_len

The second term is attention's scores and weighted sum (q·kᵀ and p·v, 2 x 2 x seq x hidden
FLOPs per token and layer forward), counted over the whole sequence as if not causal.
"""
import time

import torch

# Dense (no sparsity) tensor-core peaks in TFLOP/s from the vendors' datasheets, with fp32
# accumulation (what PyTorch uses). float32 runs with TF32 matmuls (trainer/accelerator.py
# turns TF32 on), so its peak is the TF32 one. More specific names come first.
PEAK_TFLOPS = [
    # name in torch.cuda.get_device_name()   bf16/fp16   tf32
    ("H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "float32": 378.0}),
    ("H100", {"bfloat16": 989.0, "float16": 989.0, "float32": 494.5}),
    ("H200", {"bfloat16": 989.0, "float16": 989.0, "float32": 494.5}),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0}),
    ("L40S", {"bfloat16": 362.0, "float16": 362.0, "float32": 183.0}),
    ("L40", {"bfloat16": 181.0, "float16": 181.0, "float32": 90.5}),
    ("4090", {"bfloat16": 165.2, "float16": 165.2, "float32": 82.6}),
    ("3090", {"bfloat16": 71.0, "float16": 71.0, "float32": 35.6}),
]


def matmul_parameters_per_token(config) -> int:
    """Weights one token is multiplied with in a forward pass: attention and FFN projections
    of every layer (for MoE: the router, the top-k routed experts and the shared ones) and
    the lm_head. The embedding is a lookup, not a product."""
    hidden, inter = config.hidden_size, config.intermediate_size
    kv_dim = config.num_key_value_heads * config.head_dim
    attention = 2 * hidden * hidden + 2 * hidden * kv_dim  # q, o and k, v
    ffn = 3 * hidden * inter
    if config.use_moe:
        experts = config.num_experts_per_tok + config.n_shared_experts
        mlp = experts * ffn + hidden * config.n_routed_experts
    else:
        mlp = ffn
    return config.num_hidden_layers * (attention + mlp) + hidden * config.vocab_size


def flops_per_token(config, seq_len: int) -> int:
    """Training FLOPs (forward + backward) per token at this sequence length."""
    attention_scores = 12 * config.num_hidden_layers * config.hidden_size * seq_len
    return 6 * matmul_parameters_per_token(config) + attention_scores


def table_peak_flops(device_name: str, dtype: str) -> float | None:
    for name, peaks in PEAK_TFLOPS:
        if name in device_name:
            return peaks[dtype] * 1e12
    return None


def measured_matmul_flops(device: torch.device, dtype: str, size: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of a large square matrix product on random data: the fallback peak for a GPU
    that is not in the table (an achievable rate, so MFU against it reads a little high)."""
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    a = torch.randn(size, size, device=device, dtype=torch_dtype)
    b = torch.randn(size, size, device=device, dtype=torch_dtype)
    for _ in range(3):  # warm-up: cuBLAS handle, kernel choice, clocks
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * size ** 3 * repeats / (time.perf_counter() - start)


def device_peak_flops(device: torch.device, dtype: str) -> tuple[float, str] | None:
    """(peak FLOP/s, where it comes from) for a CUDA device, None elsewhere (no MFU on CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = table_peak_flops(name, dtype)
    if peak is not None:
        return peak, f"{name} datasheet, {dtype}"
    return measured_matmul_flops(device, dtype), f"{name} measured 8192^3 matmul, {dtype}"


def model_flops_utilisation(flops_per_token_: float, tokens_per_s: float, peak_flops: float) -> float:
    return flops_per_token_ * tokens_per_s / peak_flops
