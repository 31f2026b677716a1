"""How the micro-batches of one optimizer step are weighted against each other.

A stage's loss is a mean over its trained tokens (the assistant tokens in SFT). With gradient
accumulation and several ranks, MiniMind averages those means: every micro-batch weighs the
same, so a token in a short SFT micro-batch (few assistant tokens) counts more than one in a
long micro-batch. `token` mode (the default) gives the exact mean over the whole optimizer
step instead: the sum of all token losses of all micro-batches on all ranks, divided by the
number of those tokens, as if the step were one big batch.

The step's token count is known only after its last micro-batch, so each micro-batch
backpropagates its token-loss sum divided by a fixed unit (batch_size x max_seq_len, the same
on every rank, so the values stay near 1 and fp16's GradScaler sees the usual range); at the
end of the step the gradients are multiplied by unit x world_size / (tokens of the step on all
ranks). DDP has averaged over the ranks by then, hence the world_size.
"""
import torch

MODES = ("token", "micro_batch")


def loss_terms(batch: dict) -> int:
    """How many terms the stage's loss averages over: trained tokens, or preference pairs (DPO).
    RL batches are prompts: their terms (reply tokens) exist only after the rollout, so the
    stage's loss function sets batch["num_loss_terms"] itself; 0 until then."""
    if "prompt_ids" in batch:
        return 0
    if "loss_mask" in batch:
        return int(batch["loss_mask"].sum())
    return int(batch["x_chosen"].shape[0])


def step_loss_weighting(args, runtime) -> "StepLossWeighting":
    """The weighting --loss_weighting asks for; DeepSpeed divides each micro-batch's loss by the
    accumulation steps itself, so under DeepSpeed it is always micro_batch."""
    mode = "micro_batch" if runtime.use_deepspeed else args.loss_weighting
    return StepLossWeighting(mode, args.batch_size * args.max_seq_len, args.accumulation_steps, runtime.world_size)


class StepLossWeighting:
    def __init__(self, mode: str, unit: int, accumulation_steps: int, world_size: int):
        if mode not in MODES:
            raise ValueError(f"loss weighting {mode!r}: use one of {MODES}")
        self.mode = mode
        self.unit = float(unit)
        self.accumulation_steps = accumulation_steps
        self.world_size = world_size

    def micro_batch_loss(self, mean_loss: torch.Tensor, loss_tokens: int) -> torch.Tensor:
        """What one micro-batch backpropagates."""
        if self.mode == "token":
            return mean_loss * (loss_tokens / self.unit)
        return mean_loss / self.accumulation_steps

    def reported_part(self, mean_loss: torch.Tensor, loss_tokens: int) -> torch.Tensor:
        """This micro-batch's share of the step's loss numerator (summed over ranks later)."""
        return mean_loss * loss_tokens if self.mode == "token" else mean_loss

    def step_loss(self, numerator: float, micro_batches: float, loss_tokens: float) -> float:
        """The step's loss from the all-reduced sums."""
        return numerator / max(loss_tokens, 1.0) if self.mode == "token" else numerator / max(micro_batches, 1.0)

    def rescale_gradients(self, parameters, step_loss_tokens: float) -> None:
        """Turn the accumulated gradients into those of the step's token mean (token mode)."""
        if self.mode != "token":
            return
        grads = [p.grad for p in parameters if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, self.unit * self.world_size / max(step_loss_tokens, 1.0))
