"""Where MiniMind weights live on disk and how they are written and read.

One place for the file names of DESIGN.md (`{out_dir}/{stage}_{hidden}{_moe}.pth`), atomic
writes (a crash never leaves a half-written file under the real name) and safe loading
(`weights_only=True`, strict keys, a message naming the size flags on a shape mismatch).
"""
import os
import tempfile

import torch

from model.model_minimind import MiniMindConfig

# Every script resolves its default paths (out/, checkpoints/, dataset/, model/) against this
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --model_mode of eval_model.py -> the stage whose weights it loads
STAGE_OF_MODEL_MODE = {0: "pretrain", 1: "full_sft", 2: "rlhf", 3: "reason", 4: "full_dist", 5: "grpo", 6: "ppo_actor"}
# which script writes each stage's weights (for "file not found" messages)
SCRIPT_OF_STAGE = {
    "pretrain": "trainer/train_pretrain.py",
    "full_sft": "trainer/train_full_sft.py",
    "rlhf": "trainer/train_dpo.py",
    "reason": "trainer/train_distill_reason.py",
    "full_dist": "trainer/train_distillation.py",
    "grpo": "trainer/train_grpo.py",
    "ppo_actor": "trainer/train_ppo.py",
}


def config_from_sizes(hidden_size: int = 512, num_hidden_layers: int = 8, use_moe: bool = False,
                      **overrides) -> MiniMindConfig:
    """The MiniMind2 config with the size flags every script takes."""
    return MiniMindConfig(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, use_moe=bool(use_moe),
                          **overrides)


def run_name(name: str, hidden_size: int, use_moe: bool = False) -> str:
    """`pretrain_512`, `full_sft_640_moe`, `lora_identity_512`: the stem of every file a run writes
    (the `_moe` suffix keeps a dense and an MoE model of one width apart)."""
    return f"{name}_{hidden_size}{'_moe' if use_moe else ''}"


def weight_path(out_dir: str, stage: str, hidden_size: int, use_moe: bool = False) -> str:
    return os.path.join(out_dir, run_name(stage, hidden_size, use_moe) + ".pth")


def lora_path(out_dir: str, lora_name: str, hidden_size: int, use_moe: bool = False) -> str:
    return os.path.join(out_dir, "lora", run_name(lora_name, hidden_size, use_moe) + ".pth")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare MiniMind inside DDP or DeepSpeed (.module) and torch.compile (._orig_mod)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (the tied embedding / lm_head matrix counts once)."""
    return sum(p.numel() for p in model.parameters())


def atomic_torch_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename over `path`.

    os.replace is atomic on one file system, so readers see the old file or the new one,
    never a torn write."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def atomic_write_text(text: str, path: str) -> None:
    """Write a small text file atomically (temporary file in the same folder, then rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp_path, path)


def half_precision_state_dict(model: torch.nn.Module) -> dict:
    """Weights as MiniMind releases them: fp16 on the CPU, no wrapper prefixes."""
    return {k: v.detach().to("cpu", torch.float16) for k, v in unwrap_model(model).state_dict().items()}


def save_weights(model: torch.nn.Module, path: str) -> None:
    atomic_torch_save(half_precision_state_dict(model), path)


def read_state_dict(path: str) -> dict:
    """torch.load with weights_only=True: a .pth cannot run code when it is opened."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weights file at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_weights(model: torch.nn.Module, path: str, strict: bool = True) -> None:
    """Load a MiniMind .pth into `model`; shape mismatches name the size flags to set."""
    state_dict = read_state_dict(path)
    check_shapes(model, state_dict, path)
    model.load_state_dict(state_dict, strict=strict)


def check_shapes(model: torch.nn.Module, state_dict: dict, path: str) -> None:
    expected = model.state_dict()
    mismatched = [(k, tuple(v.shape), tuple(expected[k].shape))
                  for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if not (mismatched or missing or unexpected):
        return
    lines = [f"{path} does not fit a model built with these size flags:"]
    lines += [f"  {k}: file {f} vs model {m}" for k, f, m in mismatched[:5]]
    if missing:
        lines.append(f"  {len(missing)} weights missing from the file, e.g. {missing[0]}")
    if unexpected:
        lines.append(f"  {len(unexpected)} weights in the file the model lacks, e.g. {unexpected[0]}")
    lines.append("  " + guess_size_flags(state_dict))
    raise ValueError("\n".join(lines))


def sizes_of_state_dict(state_dict: dict) -> dict | None:
    """The size flags a MiniMind state dict was saved with, read off its weight names and shapes
    (None when it is not a MiniMind state dict)."""
    if "model.embed_tokens.weight" not in state_dict:
        return None
    return {
        "hidden_size": state_dict["model.embed_tokens.weight"].shape[1],
        "num_hidden_layers": len({k.split(".")[2] for k in state_dict if k.startswith("model.layers.")}),
        "use_moe": int(any(".mlp.experts." in k for k in state_dict)),
    }


def guess_size_flags(state_dict: dict) -> str:
    """The size flags of a state dict as a hint for the user."""
    sizes = sizes_of_state_dict(state_dict)
    if sizes is None:
        return "the file does not look like a MiniMind checkpoint (no model.embed_tokens.weight)"
    return "the file was saved with " + " ".join(f"--{flag} {value}" for flag, value in sizes.items())
