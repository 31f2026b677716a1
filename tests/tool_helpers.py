"""A tool conversation and a tiny model fine-tuned on it until it really calls the calculator
(shared by tests/test_tools.py and tests/test_server.py)."""
import functools
from pathlib import Path

import torch
from transformers import AutoTokenizer

from dataset.lm_dataset import chat_ids_and_mask, shifted
from model.checkpoint import config_from_sizes
from model.model_minimind import MiniMindForCausalLM
from model.tools import builtin_registry

REPO_ROOT = Path(__file__).resolve().parent.parent
CALCULATOR = builtin_registry().schemas(["calculator"])[0]
TOOL_CHAT = {"tools": [CALCULATOR], "messages": [
    {"role": "user", "content": "What is 37 times 48?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": {"expression": "37*48"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"result": 1776}'},
    {"role": "assistant", "content": "37 × 48 = 1776."},
]}


@functools.lru_cache(maxsize=1)
def fine_tuned_tool_model(steps: int = 60, seed: int = 0) -> MiniMindForCausalLM:
    """A 64-wide, 2-layer MiniMind trained on TOOL_CHAT alone (its SFT mask) until greedy
    decoding writes the call and, given the result, the answer."""
    tokenizer = AutoTokenizer.from_pretrained(str(REPO_ROOT / "model"))
    ids, mask = chat_ids_and_mask(tokenizer, TOOL_CHAT["messages"], 1024, TOOL_CHAT["tools"])
    x, y, loss_mask = (t.unsqueeze(0) for t in shifted(ids, mask))
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(config_from_sizes(64, 2, False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), reduction="none")
        loss = (loss * loss_mask.view(-1)).sum() / loss_mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()
