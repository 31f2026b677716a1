"""Held-out evaluation during training (--eval_interval N, --eval_data FILE): bits per byte and
loss of text the run does not train on, every N optimizer steps and after the last one, written
into that step's metrics record (eval_bpb, eval_loss), so the log line, the plot and wandb show it.

    evaluation = HeldOutEvaluation(args, tokenizer, runtime)      # tokenized once
    numbers = evaluation.maybe_run(state.model, step, last_step, autocast)

Every rank takes part: the evaluation windows are cut into batches once, each rank scores every
world_size-th batch and one all-reduce adds the sums up. So no rank waits idle at a collective
while another evaluates (DDP would time out on a long evaluation done by rank 0 alone), the work
is shared, and every rank runs the same number of forward passes, which ZeRO-3 needs (each
forward gathers the sharded weights from all ranks); a rank with no batch left runs a one-token
dummy pass.
"""
import math
import os
import time

import torch
import torch.distributed as dist

from evaluation.bpb import batch_nats, text_windows
from evaluation.data import EvalDataError, read_documents
from evaluation.scoring import batch_logprobs, length_batches
from model.checkpoint import REPO_ROOT
from model.command_line import UserError
from trainer.processes import log

DEFAULT_EVAL_DATA = os.path.join(REPO_ROOT, "dataset", "demo", "eval_text.jsonl")


def add_evaluation_args(parser) -> None:
    group = parser.add_argument_group("held-out evaluation")
    group.add_argument("--eval_interval", type=int, default=0,
                       help="every N optimizer steps (and after the last), measure bits per byte and loss on "
                            "--eval_data (0 = never)")
    group.add_argument("--eval_data", default=None,
                       help="held-out jsonl ({\"text\"} lines, or chat lines rendered with the chat template) or "
                            ".txt (default: dataset/demo/eval_text.jsonl)")
    group.add_argument("--eval_documents", type=int, default=200,
                       help="evaluate the first N documents of --eval_data (0 = all)")


class HeldOutEvaluation:
    def __init__(self, args, tokenizer, runtime):
        path = args.eval_data or DEFAULT_EVAL_DATA
        try:
            documents = read_documents(path, tokenizer)
        except EvalDataError as error:
            raise UserError(f"--eval_data: {error}") from None
        if args.eval_documents:
            documents = documents[:args.eval_documents]
        self.windows, self.bytes, count = text_windows(tokenizer, documents, args.max_seq_len)
        self.interval, self.runtime = args.eval_interval, runtime
        batches = length_batches([len(w) - 1 for w in self.windows], args.batch_size * args.max_seq_len)
        self.my_batches = batches[runtime.rank::runtime.world_size]
        self.passes = -(-len(batches) // runtime.world_size)  # the same count on every rank
        self.dummy = [tokenizer.bos_token_id]
        log(f"held-out evaluation every {self.interval} steps: {count} documents of {path} "
            f"({sum(len(w) - 1 for w in self.windows)} tokens, {self.bytes} bytes) in {len(batches)} batches")

    def due(self, step: int, last_step: int) -> bool:
        return step % self.interval == 0 or step == last_step

    def maybe_run(self, model: torch.nn.Module, step: int, last_step: int, autocast) -> dict:
        """{"eval_bpb", "eval_loss", "eval_seconds"} when this step is due, else {}."""
        if not self.due(step, last_step):
            return {}
        started = time.time()
        was_training = model.training
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64)  # nats, tokens
        with autocast:
            for i in range(self.passes):
                if i < len(self.my_batches):
                    windows = [self.windows[w] for w in self.my_batches[i]]
                    sums += torch.tensor([batch_nats(model, windows), sum(len(w) - 1 for w in windows)],
                                         dtype=torch.float64)
                else:
                    batch_logprobs(model, [self.dummy])  # keeps ZeRO-3's collectives in step
        model.train(was_training)
        if self.runtime.distributed:
            sums = sums.to(self.runtime.device)
            dist.all_reduce(sums)
        nats, tokens = sums.tolist()
        return {"eval_bpb": nats / (math.log(2) * self.bytes), "eval_loss": nats / tokens,
                "eval_seconds": time.time() - started}
