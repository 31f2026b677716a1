"""What every command line of the project shares: user mistakes end in one line and exit code 2,
--help shows each real default once, and the size flags are checked before a model is built.

    parser = ArgumentParser(description=...)     # argparse, with one-line errors
    check_size_flags(parser, args)               # hidden_size / num_hidden_layers a model can have
"""
import argparse

import torch

NUM_ATTENTION_HEADS = 8  # MiniMind2's head count; the size flags only set the width and depth


class UserError(Exception):
    """A mistake the user can fix (a flag, a file): reported as one line, exit code 2, no traceback."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends `(default: X)` to a flag's help, except where there is nothing to show (None) or
    the help text already says it."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or "default" in help_text:
            return help_text
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a mistake prints one line (`prog: error: ...`) instead of the usage block."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def one_line(message: str) -> str:
    """A multi-line message (a heading, then indented details) as one line."""
    first, *details = message.splitlines()
    return " ".join([first, "; ".join(line.strip() for line in details)]) if details else first


def size_flags_problem(hidden_size: int, num_hidden_layers: int) -> str | None:
    """Why a model of this width and depth cannot be built, or None when it can.

    The width is split into NUM_ATTENTION_HEADS heads, and RoPE rotates each head's dimensions in
    pairs, so hidden_size must be a multiple of 2 * NUM_ATTENTION_HEADS."""
    step = 2 * NUM_ATTENTION_HEADS
    if num_hidden_layers < 1:
        return f"--num_hidden_layers {num_hidden_layers}: a model needs at least 1 layer"
    if hidden_size >= step and hidden_size % step == 0:
        return None
    lower, upper = max(step, hidden_size // step * step), (hidden_size // step + 1) * step
    nearest = f"{lower} or {upper}" if lower < upper and lower != hidden_size else f"{upper}"
    if hidden_size > 0 and hidden_size % NUM_ATTENTION_HEADS == 0:
        why = (f"its {NUM_ATTENTION_HEADS} attention heads would have {hidden_size // NUM_ATTENTION_HEADS} "
               f"dimensions each, and RoPE needs an even number")
    else:
        why = f"it must split evenly into {NUM_ATTENTION_HEADS} attention heads"
    return f"--hidden_size {hidden_size}: {why}; use a multiple of {step}, e.g. {nearest}"


def check_size_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """parser.error (one line, exit 2) when --hidden_size / --num_hidden_layers cannot make a model."""
    problem = size_flags_problem(args.hidden_size, args.num_hidden_layers)
    if problem:
        parser.error(problem)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
