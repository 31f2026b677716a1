"""A random 64-wide, 2-layer MiniMind for the front-end tests (eval_model, server, web demo)."""
import torch

from model.checkpoint import config_from_sizes
from model.model_minimind import MiniMindForCausalLM


def tiny_model(seed: int = 0) -> MiniMindForCausalLM:
    """Random weights with a wide spread, so greedy replies are not one repeated token and
    differ from prompt to prompt."""
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(config_from_sizes(64, 2, False))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model.eval()
