"""The CUDA path, decided and checked on the CPU: dtype choice, DataLoader settings, DeepSpeed
precision, frozen models' dtype, FLOPs per token, token-weighted accumulation, torch.compile,
and bench_gpu.py's command line. (The GPU runs themselves: bench/gpu_smoke.sh, bench_gpu.py.)"""
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model import inference
from model.checkpoint import REPO_ROOT
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from trainer import accelerator
from trainer.loss_weighting import StepLossWeighting
from trainer.losses import masked_cross_entropy
from trainer.mfu import flops_per_token, table_peak_flops
from trainer.processes import deepspeed_config
from trainer.train_dpo import sequence_log_probs


def tiny(seed=0, **overrides) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return MiniMindForCausalLM(MiniMindConfig(**{**sizes, **overrides}))


# --- precision -------------------------------------------------------------------------------------

@pytest.mark.parametrize("capability, expected", [((7, 5), "float16"), ((7, 0), "float16"), ((8, 0), "bfloat16"),
                                                   ((9, 0), "bfloat16")])
def test_half_precision_follows_the_compute_capability_of_the_given_gpu(monkeypatch, capability, expected):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: pytest.fail("counts emulated bf16"))
    assert accelerator.default_dtype(torch.device("cuda", 3)) == expected
    assert inference.resolve_dtype("auto", "cuda:3") == getattr(torch, expected)
    assert asked == [torch.device("cuda", 3)] * 2  # the rank's own GPU, not cuda:0
    assert accelerator.default_dtype(torch.device("cpu")) == "float32"
    assert inference.resolve_dtype("auto", "cpu") == torch.float32


def test_dataloader_settings_for_cuda_and_cpu():
    cuda = accelerator.loader_settings(torch.device("cuda"), None, local_processes=1)
    assert cuda["num_workers"] > 0 or (torch.multiprocessing.cpu_count() < 2)
    assert cuda["pin_memory"] and cuda["prefetch_factor"] >= 2
    assert "persistent_workers" not in cuda  # each epoch has its own loader (see loader_settings)
    assert accelerator.loader_settings(torch.device("cuda"), 0) == {"num_workers": 0, "pin_memory": True}
    assert accelerator.loader_settings(torch.device("cpu"), None) == {"num_workers": 0, "pin_memory": False}
    # eight ranks on one 16-core machine do not each start 4 workers on 2 cores
    assert accelerator.loader_settings(torch.device("cuda"), None, local_processes=64)["num_workers"] == 0


def deepspeed_args(tmp_path, dtype, config):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return SimpleNamespace(deepspeed=str(path), batch_size=4, accumulation_steps=8, grad_clip=1.0,
                           learning_rate=1e-4, dtype=dtype)


@pytest.mark.parametrize("shipped", ["ds_zero2.json", "ds_zero3.json"])
def test_effective_deepspeed_config_accumulates_in_fp32(tmp_path, shipped):
    with open(f"{REPO_ROOT}/trainer/{shipped}") as f:
        file_config = json.load(f)
    config = deepspeed_config(deepspeed_args(tmp_path, "bfloat16", file_config))
    assert config["bf16"]["enabled"] and not config["fp16"]["enabled"]
    assert config["data_types"]["grad_accum_dtype"] == "fp32"
    assert config["gradient_accumulation_steps"] == 8 and config["train_micro_batch_size_per_gpu"] == 4
    fp16 = deepspeed_config(deepspeed_args(tmp_path, "float16", file_config))
    assert fp16["fp16"]["enabled"] and "data_types" not in fp16
    # DeepSpeed refuses bf16 weights with fp32 accumulation without ZeRO: stage 0 keeps its default
    assert "data_types" not in deepspeed_config(deepspeed_args(tmp_path, "bfloat16", {}))
    own = deepspeed_config(deepspeed_args(tmp_path, "bfloat16", {**file_config, "data_types": {"grad_accum_dtype": "bf16"}}))
    assert own["data_types"]["grad_accum_dtype"] == "bf16"  # the file's explicit choice is kept


def test_dpo_reference_in_the_trained_weights_dtype_starts_at_log_ratio_zero():
    """DeepSpeed's bf16 engine holds bf16 weights with autocast off; a reference left in fp32
    gives a log-ratio offset at step 0, one cast by frozen_copy gives exactly zero."""
    policy = tiny().to(torch.bfloat16)
    ids = torch.randint(3, 6400, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    dtype = accelerator.weights_dtype("bfloat16", use_deepspeed=True)
    reference = accelerator.frozen_copy(tiny(), torch.device("cpu"), dtype)
    assert next(reference.parameters()).dtype == torch.bfloat16 and not reference.training
    assert not any(p.requires_grad for p in reference.parameters())
    with torch.inference_mode():
        policy_log_probs = sequence_log_probs(policy(ids).logits, ids, mask)
        cast_ratio = policy_log_probs - sequence_log_probs(reference(ids).logits, ids, mask)
        fp32_ratio = policy_log_probs - sequence_log_probs(tiny().eval()(ids).logits, ids, mask)
    assert torch.equal(cast_ratio, torch.zeros(2))
    assert fp32_ratio.abs().max() > 1e-4  # the offset the cast removes
    assert accelerator.weights_dtype("bfloat16", use_deepspeed=False) == "float32"  # autocast covers it


# --- MFU ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_moe", [False, True])
def test_flops_per_token_equals_the_counted_matmul_flops(use_moe):
    model = tiny(use_moe=use_moe, flash_attn=False).train()  # manual attention: plain matmuls to count
    batch, seq = 2, 16
    ids = torch.randint(3, 6400, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        model(ids, labels=ids).loss.backward()
    assert counter.get_total_flops() == flops_per_token(model.config, seq) * batch * seq


def test_peak_table_matches_device_names():
    assert table_peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert table_peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert table_peak_flops("NVIDIA GeForce RTX 3090", "float16") == 71e12
    assert table_peak_flops("NVIDIA L40S", "bfloat16") == 362e12
    assert table_peak_flops("Tesla T4", "float16") is None  # measured-matmul fallback


# --- token-weighted accumulation ------------------------------------------------------------------

def lm_batch(lengths, trained, seed):
    """Right-padded rows; `trained` = how many final positions of each row carry loss."""
    generator = torch.Generator().manual_seed(seed)
    length = max(lengths)
    ids = torch.zeros(len(lengths), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (n, t) in enumerate(zip(lengths, trained)):
        ids[row, :n] = torch.randint(3, 6400, (n,), generator=generator)
        mask[row, n - 1 - t:n - 1] = 1  # targets (the next token) stay inside the row
    return ids, mask


def micro_loss(model, ids, mask):
    logits = model(ids).logits
    return masked_cross_entropy(logits, ids.roll(-1, 1), mask)


def accumulated_gradients(mode, micro_batches):
    model = tiny()
    weighting = StepLossWeighting(mode, unit=4 * 16, accumulation_steps=len(micro_batches), world_size=1)
    for ids, mask in micro_batches:
        weighting.micro_batch_loss(micro_loss(model, ids, mask), int(mask.sum())).backward()
    weighting.rescale_gradients(model.parameters(), sum(int(mask.sum()) for _, mask in micro_batches))
    return [p.grad.clone() for p in model.parameters()]


def test_token_weighting_of_uneven_micro_batches_equals_one_big_batch():
    short = lm_batch([6, 5], trained=[2, 1], seed=1)     # 3 trained tokens
    long = lm_batch([16, 14], trained=[12, 10], seed=2)  # 22 trained tokens
    big_ids = torch.cat([torch.nn.functional.pad(short[0], (0, 10)), long[0]])
    big_mask = torch.cat([torch.nn.functional.pad(short[1], (0, 10)), long[1]])
    model = tiny()
    micro_loss(model, big_ids, big_mask).backward()
    one_batch = [p.grad for p in model.parameters()]
    token = accumulated_gradients("token", [short, long])
    per_micro_batch = accumulated_gradients("micro_batch", [short, long])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(token, one_batch))
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(per_micro_batch, one_batch))


# --- torch.compile --------------------------------------------------------------------------------

@pytest.mark.slow
def test_compiled_model_gives_the_eager_loss():
    model = tiny(num_hidden_layers=1).train()
    ids = torch.randint(3, 6400, (2, 16))
    eager = model(ids, labels=ids).loss
    compiled = accelerator.compile_model(model)(ids, labels=ids).loss
    assert torch._dynamo.config.capture_scalar_outputs
    torch._dynamo.reset()
    assert torch.allclose(eager, compiled, atol=1e-4), (eager, compiled)


# --- bench_gpu.py ---------------------------------------------------------------------------------

def test_bench_gpu_help_and_refusal_without_cuda(tmp_path):
    script = f"{REPO_ROOT}/bench/bench_gpu.py"
    help_text = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert help_text.returncode == 0 and "--compile" in help_text.stdout and "--quick" in help_text.stdout
    refused = subprocess.run([sys.executable, script, "--out", str(tmp_path / "gpu.json")], capture_output=True,
                             text=True, cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert refused.returncode != 0
    assert refused.stderr.strip().splitlines() == ["bench_gpu.py needs a CUDA GPU: torch.cuda.is_available() is "
                                                   "False here, nothing was measured"]
    assert not (tmp_path / "gpu.json").exists()



# --- bench_gpu_busy.py ----------------------------------------------------------------------------

def test_bench_gpu_busy_measures_the_loader_on_cpu_and_refuses_the_busy_part(tmp_path):
    script = f"{REPO_ROOT}/bench/bench_gpu_busy.py"
    out = tmp_path / "busy.json"
    ran = subprocess.run([sys.executable, script, "--loader_only", "--stages", "sft", "--samples", "300",
                          "--loader_batches", "5", "--device", "cpu", "--out", str(out)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    (row,) = json.loads(out.read_text())["rows"]
    # the trainer's CPU default (no workers) and five batches of 16 rows x 512 positions read
    assert row["num_workers"] == 0 and row["batches"] == 5
    assert 0 < row["real_tokens_per_s"] < row["padded_tokens_per_s"]  # demo SFT rows are shorter than 512
    refused = subprocess.run([sys.executable, script, "--device", "cpu", "--out", str(tmp_path / "b.json")],
                             capture_output=True, text=True, cwd=tmp_path)
    assert refused.returncode != 0 and "needs a CUDA GPU" in refused.stderr and "--loader_only" in refused.stderr
    assert not (tmp_path / "b.json").exists()
