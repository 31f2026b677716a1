"""Convert MiniMind weights between the native .pth and the transformers ecosystem.

  torch2hf     native .pth -> a transformers folder that runs MiniMind's own model code
               (AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)); dense and MoE
  torch2llama  native .pth -> a plain Llama folder that needs no custom code anywhere
               (transformers, vLLM, llama.cpp / ollama, lm-evaluation-harness); dense only
  hf2torch     either kind of folder -> the native .pth again (eval_model.py, the trainers)

A dense MiniMind is a Llama with tied embeddings: the same parameter names, RMSNorm, rotate-half
RoPE, grouped key/value heads and SwiGLU. So the Llama export only writes a Llama config; the
weights are copied as they are, with no renaming and no permutation.

Every folder is built in a temporary folder next to --out and renamed into place at the end, and
every .pth is written atomically, so a run that fails leaves nothing half-written behind. The
model's size is read from the .pth itself; the size flags only override it.

    python scripts/convert_model.py --mode torch2llama --in out/full_sft_512.pth --out out/MiniMind2-Small
"""
import contextlib
import json
import os
import pickle
import shutil
import sys
import tempfile

if __package__ in (None, ""):  # run as a file: import from the repository root, not from scripts/
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from model.checkpoint import (REPO_ROOT, atomic_torch_save, config_from_sizes, load_weights,  # noqa: E402
                              read_state_dict, sizes_of_state_dict)
from model.command_line import ArgumentParser, one_line, size_flags_problem  # noqa: E402
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM  # noqa: E402

MODEL_CODE = os.path.join(REPO_ROOT, "model", "model_minimind.py")
TOKENIZER_DIR = os.path.join(REPO_ROOT, "model")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
OPTIONAL_TOKENIZER_FILES = ("special_tokens_map.json", "chat_template.jinja")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# config.json's pointer from the Auto classes to the model code copied into the folder
AUTO_MAP = {"AutoConfig": "model_minimind.MiniMindConfig",
            "AutoModelForCausalLM": "model_minimind.MiniMindForCausalLM"}


class ConversionError(Exception):
    """Something wrong with the user's input: reported as one message, without a traceback."""


# ----------------------------------------------------------------------------------------------
# Reading the inputs
# ----------------------------------------------------------------------------------------------

def load_native(path: str, hidden_size: int | None = None, num_hidden_layers: int | None = None,
                use_moe: int | None = None) -> MiniMindForCausalLM:
    """A MiniMind .pth, in the size its weights have (a size flag given overrides what is read,
    and the weights are then checked strictly against it)."""
    if os.path.isdir(path):
        raise ConversionError(f"--in {path} is a folder; this mode reads a .pth file "
                              f"(to read a folder use --mode hf2torch)")
    if not os.path.isfile(path):
        raise ConversionError(f"--in {path}: no such file (expected a MiniMind .pth, e.g. out/full_sft_512.pth)")
    try:
        sizes = sizes_of_state_dict(read_state_dict(path))
    except (RuntimeError, pickle.UnpicklingError, EOFError) as error:
        raise ConversionError(f"--in {path} is not a readable PyTorch weights file ({error})") from None
    if sizes is None:
        raise ConversionError(f"--in {path} is not a MiniMind checkpoint (no model.embed_tokens.weight)")
    given = {"hidden_size": hidden_size, "num_hidden_layers": num_hidden_layers, "use_moe": use_moe}
    sizes.update({flag: value for flag, value in given.items() if value is not None})
    problem = size_flags_problem(sizes["hidden_size"], sizes["num_hidden_layers"])
    if problem:
        raise ConversionError(problem)
    model = MiniMindForCausalLM(config_from_sizes(sizes["hidden_size"], sizes["num_hidden_layers"],
                                                  bool(sizes["use_moe"])))
    try:
        load_weights(model, path)
    except ValueError as error:  # shapes or names that do not fit the size flags
        raise ConversionError(one_line(f"--in {error}")) from None
    return model.eval()


def load_folder(folder: str) -> MiniMindForCausalLM:
    """A folder written by torch2hf (model_type "minimind") or torch2llama (model_type "llama")."""
    if not os.path.isdir(folder):
        raise ConversionError(f"--in {folder} is not a folder; --mode hf2torch reads a folder written by "
                              f"--mode torch2hf or torch2llama")
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise ConversionError(f"--in {folder} has no config.json, so it is not a transformers model folder")
    model_type = read_json(config_path).get("model_type")
    if model_type == "minimind":  # the project's own code reads it; no remote code needs trusting
        return load_pretrained(MiniMindForCausalLM, folder)
    if model_type == "llama":
        llama = load_pretrained(LlamaForCausalLM, folder)
        model = MiniMindForCausalLM(minimind_config_of_llama(llama.config, config_path))
        model.load_state_dict(llama.state_dict(), strict=True)  # same parameter names on both sides
        return model.eval()
    raise ConversionError(f"{config_path}: model_type {model_type!r}; hf2torch reads 'minimind' or 'llama' folders")


def load_pretrained(model_class, folder: str):
    """from_pretrained in fp32 (exact for fp16/bf16 files), refusing folders with missing or extra weights:
    from_pretrained alone would quietly start the missing ones from random values."""
    try:
        model, info = model_class.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError) as error:
        raise ConversionError(f"--in {folder}: transformers cannot load it ({error})") from None
    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
    if problems:
        details = "; ".join(f"{k.replace('_', ' ')}: {sorted(v)[:3]}" for k, v in problems.items())
        raise ConversionError(f"--in {folder}: the weights do not match config.json ({details})")
    return model.eval()


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path}, line {error.lineno}: not valid JSON ({error.msg})") from None


# ----------------------------------------------------------------------------------------------
# MiniMind config <-> Llama config
# ----------------------------------------------------------------------------------------------

def llama_config_of(config: MiniMindConfig) -> LlamaConfig:
    """The Llama config that computes exactly what this dense MiniMind computes."""
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        tie_word_embeddings=True,  # lm_head shares the embedding matrix
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


def minimind_config_of_llama(llama: LlamaConfig, config_path: str) -> MiniMindConfig:
    """The way back; refuses Llama features MiniMind does not have rather than dropping them."""
    rope = llama.rope_parameters or {}
    unsupported = {
        "tie_word_embeddings must be true": not llama.tie_word_embeddings,
        "attention_bias must be false": llama.attention_bias,
        "mlp_bias must be false": llama.mlp_bias,
        "hidden_act must be silu": llama.hidden_act != "silu",
        "head_dim must be hidden_size / num_attention_heads":
            llama.head_dim != llama.hidden_size // llama.num_attention_heads,
        "rope_type must be default (no rope scaling)": rope.get("rope_type", "default") != "default",
    }
    reasons = [reason for reason, failed in unsupported.items() if failed]
    if reasons:
        raise ConversionError(f"{config_path}: this Llama is not MiniMind-shaped: " + "; ".join(reasons))
    return MiniMindConfig(
        vocab_size=llama.vocab_size, hidden_size=llama.hidden_size, intermediate_size=llama.intermediate_size,
        num_hidden_layers=llama.num_hidden_layers, num_attention_heads=llama.num_attention_heads,
        num_key_value_heads=llama.num_key_value_heads, max_position_embeddings=llama.max_position_embeddings,
        rms_norm_eps=llama.rms_norm_eps, rope_theta=rope.get("rope_theta", 1e6),
        bos_token_id=llama.bos_token_id, eos_token_id=llama.eos_token_id, pad_token_id=llama.pad_token_id,
    )


# ----------------------------------------------------------------------------------------------
# Writing the outputs
# ----------------------------------------------------------------------------------------------

def write_minimind_folder(model: MiniMindForCausalLM, folder: str, dtype: torch.dtype) -> None:
    """config.json with auto_map + model.safetensors + the model code it points to."""
    model.config.auto_map = AUTO_MAP
    model.to(dtype).save_pretrained(folder)  # stores the tied embedding once, as safetensors wants
    shutil.copy(MODEL_CODE, folder)  # imports only torch and transformers, so it runs on its own


def write_llama_folder(model: MiniMindForCausalLM, folder: str, dtype: torch.dtype) -> None:
    llama = LlamaForCausalLM(llama_config_of(model.config))
    llama.load_state_dict(model.state_dict(), strict=True)  # same names, same layouts
    llama.to(dtype).save_pretrained(folder)
    add_transformers4_config_names(os.path.join(folder, "config.json"), dtype)


def add_transformers4_config_names(config_path: str, dtype: torch.dtype) -> None:
    """transformers 5 writes rope_theta inside rope_parameters and the dtype as "dtype"; tools that
    read config.json themselves with the older names (older llama.cpp converters, vLLM releases
    on transformers 4) would fall back to rope_theta 10000 and get every position wrong."""
    config = read_json(config_path)
    config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def write_generation_config(folder: str, config: MiniMindConfig) -> None:
    """Generation stops at <|im_end|> (end of a chat turn) and pads with <|endoftext|>."""
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(folder)


def copy_tokenizer(folder: str) -> None:
    """The project's tokenizer and chat template, so AutoTokenizer works from the folder alone."""
    for name in TOKENIZER_FILES + OPTIONAL_TOKENIZER_FILES:
        source = os.path.join(TOKENIZER_DIR, name)
        if os.path.isfile(source):
            shutil.copy(source, folder)


def check_tokenizer_files() -> None:
    missing = [name for name in TOKENIZER_FILES if not os.path.isfile(os.path.join(TOKENIZER_DIR, name))]
    if missing:
        raise ConversionError(f"the tokenizer file(s) {', '.join(missing)} are missing from {TOKENIZER_DIR}; "
                              f"they ship with the repository (or rebuild them with scripts/train_tokenizer.py)")


def save_native(model: MiniMindForCausalLM, path: str, dtype: torch.dtype) -> None:
    """The .pth the trainers write: a plain state dict (lm_head.weight included), fp16 by default."""
    state_dict = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
    atomic_torch_save(state_dict, path)


@contextlib.contextmanager
def staging_folder(out: str):
    """An empty temporary folder next to `out`; on success it is renamed to `out` (replacing an
    older one, which --overwrite allowed), on any failure it is removed."""
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=parent)
    try:
        yield staging
        make_shareable(staging)
        replace_path(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def make_shareable(folder: str) -> None:
    """Give the folder and its files the usual permissions (umask applied). mkdtemp makes the folder
    private (0700) and transformers writes model.safetensors through a private temp file (0600),
    which a server running as another user could not read."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def replace_path(new: str, out: str) -> None:
    """Move `new` to `out`. A folder cannot be renamed over a non-empty one, so an old `out` is
    first moved aside and deleted only once the new one is in place."""
    if not os.path.lexists(out):
        os.rename(new, out)
        return
    old = new + ".old"
    os.rename(out, old)
    try:
        os.rename(new, out)
    except OSError:
        os.rename(old, out)  # put the old one back rather than leave nothing
        raise
    shutil.rmtree(old) if os.path.isdir(old) and not os.path.islink(old) else os.remove(old)


def check_output_free(out: str, overwrite: bool) -> None:
    if os.path.lexists(out) and not overwrite:
        raise ConversionError(f"--out {out} already exists; pass --overwrite to replace it")


# ----------------------------------------------------------------------------------------------
# The three modes
# ----------------------------------------------------------------------------------------------

def size_flags(config: MiniMindConfig) -> str:
    return (f"--hidden_size {config.hidden_size} --num_hidden_layers {config.num_hidden_layers} "
            f"--use_moe {int(config.use_moe)}")


def torch_to_folder(args) -> None:
    check_tokenizer_files()
    model = load_native(args.in_path, args.hidden_size, args.num_hidden_layers, args.use_moe)
    if args.mode == "torch2llama" and model.config.use_moe:
        raise ConversionError(f"--mode torch2llama cannot export an MoE model ({args.in_path}): a Llama has no "
                              f"mixture-of-experts layers. Use --mode torch2hf, which keeps MiniMind's own code")
    n_params = sum(p.numel() for p in model.parameters())
    write_weights = write_llama_folder if args.mode == "torch2llama" else write_minimind_folder
    with staging_folder(args.out) as folder:
        write_weights(model, folder, DTYPES[args.dtype])
        write_generation_config(folder, model.config)
        copy_tokenizer(folder)
    remote = "" if args.mode == "torch2llama" else ", trust_remote_code=True"
    print(f"wrote {args.out} ({n_params / 1e6:.2f}M parameters, {args.dtype}); "
          f"load it with AutoModelForCausalLM.from_pretrained({args.out!r}{remote})")


def folder_to_torch(args) -> None:
    if os.path.isdir(args.out):
        raise ConversionError(f"--out {args.out} is a folder; --mode hf2torch writes a .pth file, "
                              f"e.g. out/full_sft_512.pth")
    model = load_folder(args.in_path)
    save_native(model, args.out, DTYPES[args.dtype])
    print(f"wrote {args.out} ({args.dtype}); use it with {size_flags(model.config)}")


def convert(args) -> None:
    check_output_free(args.out, args.overwrite)
    if args.mode == "hf2torch":
        folder_to_torch(args)
    else:
        torch_to_folder(args)


def parse_args(argv=None):
    parser = ArgumentParser(prog="convert_model.py", description="Convert MiniMind weights: native .pth <-> transformers folders")
    parser.add_argument("--mode", required=True, choices=["torch2hf", "torch2llama", "hf2torch"])
    parser.add_argument("--in", dest="in_path", required=True,
                        help="torch2*: a MiniMind .pth; hf2torch: a folder written by torch2hf or torch2llama")
    parser.add_argument("--out", required=True, help="torch2*: the folder to write; hf2torch: the .pth to write")
    sizes = parser.add_argument_group("size flags (optional: the sizes are read from the .pth or config.json)")
    sizes.add_argument("--hidden_size", type=int, default=None, help="override the width read from the .pth")
    sizes.add_argument("--num_hidden_layers", type=int, default=None, help="override the depth read from the .pth")
    sizes.add_argument("--use_moe", type=int, default=None, choices=[0, 1], help="override the MoE-ness read from the .pth")
    parser.add_argument("--dtype", default="float16", choices=list(DTYPES),
                        help="precision of the written weights (default float16, as MiniMind releases them: "
                             "exact for a .pth the trainers wrote)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        convert(args)
    except ConversionError as error:
        sys.stderr.write(f"convert_model.py: error: {error}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
