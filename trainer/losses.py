"""Losses shared by several stages. A stage's loss function has the signature

    loss_fn(model, batch) -> (loss, extras)

where `extras` are scalars to log (aux_loss, reward_margin, ...). Stage-specific losses (DPO,
distillation, reasoning tags) live in their stage scripts and build on these.
"""
import torch
import torch.nn.functional as F

from model.checkpoint import unwrap_model


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor,
                         token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross entropy (in fp32) averaged over the positions where loss_mask is 1.

    token_weights, when given, scales each position's term (distill-reason weighs its tags);
    the denominator stays the number of masked positions, as in MiniMind."""
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    mask = loss_mask.float().reshape(-1)
    weights = mask if token_weights is None else token_weights.float().reshape(-1)
    return (ce * weights).sum() / mask.sum().clamp(min=1.0)


def forward_batch(model, batch: dict):
    """Run the model on a collated batch; packed batches bring their own positions and documents."""
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                 position_ids=batch.get("position_ids"), document_ids=batch.get("document_ids"))


def language_model_loss(model, batch: dict):
    """Next-token loss on the masked targets, plus the MoE load-balancing loss when use_moe."""
    out = forward_batch(model, batch)
    loss = masked_cross_entropy(out.logits, batch["labels"], batch["loss_mask"])
    return with_aux_loss(model, loss, out)


def with_aux_loss(model, loss: torch.Tensor, out):
    """Add the MoE load-balancing loss (and report it); dense models have none."""
    if not unwrap_model(model).config.use_moe:
        return loss, {}
    return loss + out.aux_loss, {"aux_loss": out.aux_loss.detach()}
