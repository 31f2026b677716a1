"""LoRA, from scratch: low-rank adapters next to frozen linear layers.

A frozen weight W (out x in) gets a trainable update B·A (B: out x r, A: r x in, r small):
    y = W x + (alpha / r) · B (A x)
B starts at zero, so a fresh adapter changes nothing; only A and B are trained and saved.

The adapter hangs off the linear layer as a child module named `lora` and is added by a
forward hook, so base weight names stay exactly as they were (`...q_proj.weight`) and adapter
names are `...q_proj.lora.A.weight` / `...q_proj.lora.B.weight`, as in MiniMind2's files.
"""
import torch
from torch import nn

from model.checkpoint import atomic_torch_save, read_state_dict


class LoRA(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float | None = None):
        super().__init__()
        self.rank = rank
        # alpha = rank gives scale 1, which is what MiniMind2's adapters were trained with
        self.scale = (alpha if alpha is not None else rank) / rank
        self.A = nn.Linear(in_features, rank, bias=False)
        self.B = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.A.weight, std=0.02)
        nn.init.zeros_(self.B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x)) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """The update B·A·scale, the same shape as the base weight."""
        return (self.B.weight @ self.A.weight) * self.scale


def _add_lora_output(module: nn.Linear, inputs, output):
    return output + module.lora(inputs[0]).to(output.dtype)


def default_lora_targets(model: nn.Module) -> list[str]:
    """MiniMind2's rule: adapt the square projections (q_proj and o_proj of every layer)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.weight.shape[0] == m.weight.shape[1]]


def resolve_targets(model: nn.Module, targets) -> list[str]:
    """`targets` is None (MiniMind2's rule) or a list of name endings such as ["q_proj", "v_proj"]."""
    if targets is None:
        return default_lora_targets(model)
    names = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)]
    if not names:
        raise ValueError(f"no linear layer of the model matches LoRA targets {list(targets)}")
    return names


def apply_lora(model: nn.Module, rank: int = 8, alpha: float | None = None, targets=None) -> list[str]:
    """Attach a fresh adapter to each target linear layer; returns the adapted layer names."""
    names = resolve_targets(model, targets)
    for name in names:
        linear = model.get_submodule(name)
        if hasattr(linear, "lora"):
            raise ValueError(f"{name} already has a LoRA adapter")
        weight = linear.weight
        linear.lora = LoRA(linear.in_features, linear.out_features, rank, alpha).to(weight.device, weight.dtype)
        linear.lora_hook = linear.register_forward_hook(_add_lora_output)
    return names


def lora_state_dict(model: nn.Module) -> dict:
    model = getattr(model, "module", model)
    return {k: v for k, v in model.state_dict().items() if ".lora." in k}


def save_lora(model: nn.Module, path: str) -> None:
    """Save the adapter weights only (fp16), atomically."""
    state = {k: v.detach().to("cpu", torch.float16) for k, v in lora_state_dict(model).items()}
    atomic_torch_save(state, path)


def load_lora(model: nn.Module, path: str) -> None:
    """Load adapters saved by save_lora into a model that has matching adapters applied.

    Every adapter of the model must be in the file with the same shape (same rank, same
    layers); anything else is an error listing what differs, never a partial load."""
    saved = read_state_dict(path)
    expected = lora_state_dict(model)
    if not expected:
        raise ValueError(f"the model has no LoRA adapters; call apply_lora(model, rank=...) before loading {path}")
    problems = [f"missing {k}" for k in expected if k not in saved]
    problems += [f"unexpected {k}" for k in saved if k not in expected]
    problems += [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                 for k, v in saved.items() if k in expected and v.shape != expected[k].shape]
    if problems:
        file_rank = next((v.shape[0] for k, v in saved.items() if k.endswith("lora.A.weight")), "?")
        raise ValueError(f"LoRA file {path} does not match the model's adapters "
                         f"(file rank {file_rank}): " + "; ".join(problems[:5]))
    model = getattr(model, "module", model)
    model.load_state_dict(saved, strict=False)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += B·A·scale) and remove it, for export."""
    for name, linear in list(model.named_modules()):
        if isinstance(linear, nn.Linear) and hasattr(linear, "lora"):
            with torch.no_grad():
                linear.weight += linear.lora.delta_weight().to(linear.weight.dtype)
            linear.lora_hook.remove()
            del linear.lora, linear.lora_hook
    return model


def mark_only_lora_trainable(model: nn.Module) -> int:
    """Freeze everything but the adapters; returns the number of trainable parameters."""
    for name, param in model.named_parameters():
        param.requires_grad = ".lora." in name
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
