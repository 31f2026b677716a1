"""What depends on the device: precision, fast kernels and feeding the GPU.

Each choice is one small function, so the CUDA path can be read (and tested on CPU) in one place:

  default_dtype ........ bf16 only where the GPU has bf16 tensor cores (sm80+), else fp16 + GradScaler
  enable_fast_matmul ... TF32 matrix products on CUDA (fp32 runs use tensor cores)
  make_optimizer ....... AdamW, fused into one kernel on CUDA
  compile_model ........ torch.compile, with the settings the MoE route needs to stay one graph
  loader_settings ...... DataLoader workers and pinned memory on CUDA
  deepspeed_precision .. bf16/fp16 sections of a DeepSpeed config, gradients accumulated in fp32
  frozen_copy .......... a reference/teacher model in the trained model's dtype, without gradients
"""
import os

import torch

from model.model_minimind import fast_half_dtype

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
MAX_LOADER_WORKERS = 4  # per process: tokenizing one micro-batch of 512-token samples is ~10 ms a worker


def default_dtype(device: torch.device) -> str:
    """float32 on the CPU (bf16 autocast works there but is slower on most CPUs); on CUDA the
    half precision this GPU runs on tensor cores. Call it after torch.cuda.set_device, with the
    rank's own device, so that no rank creates a context on cuda:0."""
    if device.type != "cuda":
        return "float32"
    return DTYPE_NAMES[fast_half_dtype(device)]


def enable_fast_matmul(device: torch.device) -> None:
    """fp32 matrix products in TF32 on CUDA (10 mantissa bits, as the tensor cores take them):
    8x the fp32 rate on A100/H100 for what autocast leaves in fp32. CPU math is left alone."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def make_optimizer(params, learning_rate: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; on CUDA the fused kernel (one launch for all parameters instead of several per
    tensor), which can also skip a step on the GPU when told of a non-finite gradient."""
    return torch.optim.AdamW(params, lr=learning_rate, fused=device.type == "cuda")


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile. capture_scalar_outputs lets the MoE route's per-expert token counts
    (one .tolist() per layer) stay inside the graph instead of breaking it in two."""
    torch._dynamo.config.capture_scalar_outputs = True
    return torch.compile(model)


def loader_settings(device: torch.device, num_workers: int | None, local_processes: int = 1) -> dict:
    """DataLoader keyword arguments. On CUDA the GPU must never wait for the tokenizer: worker
    processes tokenize ahead (default: up to 4 per process, within this machine's cores) and
    pinned memory lets the host-to-GPU copy run asynchronously (with non_blocking=True). On the
    CPU the workers would take cores from the model, so the default is none (--num_workers says
    otherwise).

    Workers are not persistent: every epoch has its own loader (its own order), so they would
    not be reused, and a persistent loader held by a crashed run's traceback keeps the process
    from exiting (the workers ignore SIGTERM, see processes.ignore_stop_signals)."""
    on_cuda = device.type == "cuda"
    if num_workers is None:
        cores = (os.cpu_count() or 1) // max(local_processes, 1)
        num_workers = min(MAX_LOADER_WORKERS, max(cores - 1, 0)) if on_cuda else 0
    settings = {"num_workers": num_workers, "pin_memory": on_cuda}
    if on_cuda and num_workers > 0:
        settings["prefetch_factor"] = 4  # micro-batches each worker keeps ready (default 2)
    return settings


def deepspeed_precision(dtype: str, zero_stage: int) -> dict:
    """The precision sections of a DeepSpeed config for --dtype.

    DeepSpeed accumulates gradients in the model's dtype unless told otherwise; with bf16 and
    8 accumulation steps (the pretraining default) that sums eight numbers of 8 mantissa bits.
    `data_types.grad_accum_dtype = fp32` keeps the running sum in fp32. DeepSpeed offers that
    only with ZeRO (stage 1, 2 or 3); without ZeRO it refuses the mix, so stage 0 keeps bf16."""
    config = {"bf16": {"enabled": dtype == "bfloat16"}, "fp16": {"enabled": dtype == "float16"}}
    if dtype == "bfloat16" and zero_stage >= 1:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def weights_dtype(dtype: str, use_deepspeed: bool) -> str:
    """The dtype the trained model's weights have: DeepSpeed's bf16/fp16 engine keeps them in
    half precision (fp32 master copies live in its optimizer); otherwise they stay fp32 and
    autocast runs the products in --dtype."""
    return dtype if use_deepspeed else "float32"


def frozen_copy(model: torch.nn.Module, device: torch.device, dtype: str) -> torch.nn.Module:
    """A model that only runs forward (DPO reference, distillation teacher), set up exactly as
    the trained model runs: on its device, with weights in `dtype` (weights_dtype) and, as the
    loss functions call it, inside the same autocast. So at step 0 the DPO reference computes
    the policy's very numbers (log-ratio 0, not an offset from fp32-vs-bf16 rounding), and
    both use the tensor cores. Eval mode, no gradients; call it under torch.inference_mode()."""
    return model.to(device=device, dtype=TORCH_DTYPES[dtype]).eval().requires_grad_(False)
