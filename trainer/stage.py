"""What a stage script calls around the loop: the model and tokenizer it trains, and the way its
main() is run from the command line.

    model = build_model(args, args.from_weight)   # random init or a stage's weights
    reference = build_frozen_model(args, runtime)  # the same weights, frozen (DPO, GRPO, PPO)
    tokenizer = load_tokenizer()
    run_stage(main)                               # user errors: one line, exit 2; Ctrl-C: exit 130
"""
import os
import sys

from tqdm import tqdm

from model.checkpoint import REPO_ROOT, SCRIPT_OF_STAGE, config_from_sizes, load_weights, weight_path
from model.command_line import UserError, one_line
from model.model_minimind import MiniMindForCausalLM
from trainer.accelerator import frozen_copy, weights_dtype
from trainer.checkpoints import TrainingDiverged
from trainer.processes import Interrupted, log, seed_everything

EXIT_USER_ERROR = 2    # as argparse
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


def load_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.join(REPO_ROOT, "model"))


def build_model(args, from_weight: str, hidden_size: int | None = None, num_hidden_layers: int | None = None,
                use_moe: bool | None = None, role: str = "") -> MiniMindForCausalLM:
    """A MiniMind of the flags' sizes (or the ones given), from random init or a stage's weights;
    `role` names it in the log when a stage loads several models (DPO's policy and reference).

    Every rank builds the same random init (seeded with --seed), so one process, DDP and
    DeepSpeed all start from identical weights."""
    hidden_size = hidden_size or args.hidden_size
    num_hidden_layers = num_hidden_layers or args.num_hidden_layers
    use_moe = bool(args.use_moe if use_moe is None else use_moe)
    seed_everything(args.seed)
    model = MiniMindForCausalLM(config_from_sizes(hidden_size, num_hidden_layers, use_moe,
                                                  weight_init=args.weight_init))
    if from_weight != "none":
        path = weight_path(args.out_dir, from_weight, hidden_size, use_moe)
        require_weights(path, from_weight, hidden_size, num_hidden_layers, use_moe)
        try:
            load_weights(model, path)
        except ValueError as error:  # shapes that do not fit the size flags: the message names the right ones
            raise UserError(one_line(f"--from_weight {from_weight}: {error}")) from None
        log(f"loaded {from_weight} weights from {path}" + (f" as {role}" if role else ""))
    return model


def build_frozen_model(args, runtime, from_weight: str | None = None, role: str = "the frozen reference",
                       **sizes) -> MiniMindForCausalLM:
    """A stage's weights that only run forward (DPO's and RL's reference, distillation's teacher),
    set up exactly as the trained model runs (accelerator.frozen_copy). `sizes` as build_model's."""
    model = build_model(args, from_weight or args.from_weight, role=role, **sizes)
    return frozen_copy(model, runtime.device, weights_dtype(args.dtype, runtime.use_deepspeed))


def require_weights(path: str, stage: str, hidden_size: int, num_hidden_layers: int, use_moe: bool) -> None:
    if os.path.isfile(path):
        return
    script = SCRIPT_OF_STAGE.get(stage, f"the script that trains the '{stage}' stage")
    folder = os.path.dirname(path)
    others = sorted(f for f in os.listdir(folder) if f.startswith(stage + "_") and f.endswith(".pth")) \
        if os.path.isdir(folder) else []
    raise UserError(
        f"--from_weight {stage}: {path} not found. It is written by "
        f"`python {script} --hidden_size {hidden_size} --num_hidden_layers {num_hidden_layers} "
        f"--use_moe {int(use_moe)}` (run that stage first, with the same --out_dir), "
        f"or pass --from_weight none to start from random weights."
        + (f" Files of that stage in {folder}: {', '.join(others)}" if others else ""))


def run_stage(main_fn) -> None:
    """Run a stage's main() from the command line. Errors a user can fix (flags, files, bad data
    lines, a diverged run) end with their message and exit code 2 instead of a traceback; Ctrl-C
    or SIGTERM end with one line and exit code 130. Real bugs keep their traceback."""
    from dataset.lm_dataset import DataFormatError
    try:
        main_fn()
    except (UserError, TrainingDiverged, DataFormatError) as error:
        tqdm.write(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except Interrupted as interrupted:
        log(str(interrupted))  # the resume state and the weights are saved
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        log("interrupted before the first optimizer step or by a second Ctrl-C: nothing new was saved")
        sys.exit(EXIT_INTERRUPTED)
