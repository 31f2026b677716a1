"""scripts/convert_model.py: the exported folders compute what the native model computes, the
round trips are exact, the tokenizer travels intact, and bad input fails cleanly."""
import glob
import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from model.checkpoint import config_from_sizes, load_weights, save_weights
from model.model_minimind import MiniMindForCausalLM
from scripts.convert_model import main as convert_main
from scripts.convert_model import staging_folder

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SCRIPT = os.path.join(REPO_ROOT, "scripts", "convert_model.py")
TOKENIZER_DIR = os.path.join(REPO_ROOT, "model")
HIDDEN, LAYERS = 64, 2
SIZE_FLAGS = ["--hidden_size", str(HIDDEN), "--num_hidden_layers", str(LAYERS)]
NEW_TOKENS = 8


def run_cli(*args, cwd):
    """The real command line, started from a folder other than the repository."""
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def native_from_pth(path, use_moe):
    model = MiniMindForCausalLM(config_from_sizes(HIDDEN, LAYERS, use_moe))
    load_weights(model, path)
    return model.eval()


def padded_batch():
    """Two prompts of different lengths, the short one left-padded with <|endoftext|> (id 0)."""
    ids = torch.randint(3, 6400, (2, 12), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    ids[0, :5], mask[0, :5] = 0, 0
    return ids, mask


@torch.no_grad()
def logits_and_greedy_tokens(model, ids, mask):
    logits = model(input_ids=ids, attention_mask=mask).logits
    tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                            min_new_tokens=NEW_TOKENS, pad_token_id=0)
    return logits, tokens


def max_diff_on_real_tokens(a, b, mask):
    real = mask.bool()
    return (a[real] - b[real]).abs().max().item()


def no_leftovers(folder):
    """No staging folders (.NAME.xxxx.tmp) left next to the outputs."""
    return glob.glob(os.path.join(folder, ".*.tmp*")) == []


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A small random dense and MoE model as native .pth (fp16, as the trainers write them), and
    their fp32 exports (the dense ones through the real command line), with no size flags: the
    converter reads the sizes from the .pth."""
    root = tmp_path_factory.mktemp("convert")
    paths = {}
    for name, use_moe in (("dense", 0), ("moe", 1)):
        torch.manual_seed(0)
        # a wide normal init (std 0.2) gives peaked, non-repeating greedy continuations
        model = MiniMindForCausalLM(config_from_sizes(HIDDEN, LAYERS, use_moe, weight_init="normal",
                                                      initializer_range=0.2))
        paths[f"{name}.pth"] = str(root / f"{name}.pth")
        save_weights(model, paths[f"{name}.pth"])
    def export_args(mode, source, out):
        paths[out] = str(root / out)
        return ["--mode", mode, "--in", paths[f"{source}.pth"], "--out", paths[out], "--dtype", "float32"]

    # the two command-line runs go side by side; the MoE export runs in-process meanwhile
    # (the same code as the command line, without another interpreter start)
    cli_runs = {out: subprocess.Popen([sys.executable, SCRIPT, *export_args(mode, "dense", out)], cwd=root,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for out, mode in (("llama", "torch2llama"), ("hf", "torch2hf"))}
    convert_main(export_args("torch2hf", "moe", "hf_moe"))
    for out, process in cli_runs.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        assert f"wrote {paths[out]}" in stdout
    return paths


# ----------------------------------------------------------------------------------------------
# The Llama export runs in plain transformers and computes what the native model computes
# ----------------------------------------------------------------------------------------------

def test_llama_export_loads_as_plain_llama_with_minimind_settings(exports):
    config = json.load(open(os.path.join(exports["llama"], "config.json")))
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert not os.path.exists(os.path.join(exports["llama"], "model_minimind.py"))
    assert config["tie_word_embeddings"] is True
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (8, 2, 8)
    assert config["rope_parameters"]["rope_theta"] == config["rope_theta"] == 1e6
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    generation = json.load(open(os.path.join(exports["llama"], "generation_config.json")))
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (2, 0)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(exports["llama"]).st_mode) == 0o777 & ~umask  # not mkdtemp's private 0700
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert stat.S_IMODE(os.stat(os.path.join(exports["llama"], name)).st_mode) == 0o666 & ~umask
    model = AutoModelForCausalLM.from_pretrained(exports["llama"])  # no trust_remote_code
    assert type(model) is LlamaForCausalLM
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_llama_export_matches_native_on_a_padded_batch(exports):
    native = native_from_pth(exports["dense.pth"], use_moe=0)
    llama = LlamaForCausalLM.from_pretrained(exports["llama"], dtype=torch.float32).eval()
    ids, mask = padded_batch()
    native_logits, native_tokens = logits_and_greedy_tokens(native, ids, mask)
    llama_logits, llama_tokens = logits_and_greedy_tokens(llama, ids, mask)
    assert max_diff_on_real_tokens(native_logits, llama_logits, mask) <= 1e-4
    assert torch.equal(native_tokens, llama_tokens)
    assert len(set(native_tokens[0, -NEW_TOKENS:].tolist())) > 1  # a real continuation, not one token repeated


# ----------------------------------------------------------------------------------------------
# The MiniMind-code export runs with trust_remote_code=True, from the folder alone
# ----------------------------------------------------------------------------------------------

REMOTE_CODE_RUN = """
import sys, torch
from transformers import AutoModelForCausalLM
ids, mask = torch.load(sys.argv[1], weights_only=True)
results = {}
for folder in sys.argv[3:]:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    print(type(model).__module__)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=%d, min_new_tokens=%d,
                                do_sample=False, pad_token_id=0)
    results[folder] = (logits, tokens)
torch.save(results, sys.argv[2])
""" % (NEW_TOKENS, NEW_TOKENS)


@pytest.fixture(scope="module")
def remote_code_results(exports, tmp_path_factory):
    """Load both torch2hf folders in a fresh interpreter that cannot import the repository, so the
    model code that runs is the copy inside the folder (the test process has the project's own
    MiniMind registered with the Auto classes, which transformers would prefer)."""
    work = tmp_path_factory.mktemp("remote_code")
    inputs, outputs = work / "inputs.pt", work / "outputs.pt"
    torch.save(padded_batch(), inputs)
    env = {**os.environ, "HF_MODULES_CACHE": str(work / "modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, "-c", REMOTE_CODE_RUN, str(inputs), str(outputs),
                             exports["hf"], exports["hf_moe"]], cwd=work, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    modules = result.stdout.split()
    assert len(modules) == 2 and all(m.startswith("transformers_modules.") for m in modules), modules
    return torch.load(outputs, weights_only=True)


@pytest.mark.parametrize("name,use_moe", [("hf", 0), ("hf_moe", 1)])
def test_hf_export_with_remote_code_matches_native(exports, remote_code_results, name, use_moe):
    config = json.load(open(os.path.join(exports[name], "config.json")))
    assert config["model_type"] == "minimind" and config["use_moe"] is bool(use_moe)
    assert config["auto_map"]["AutoModelForCausalLM"] == "model_minimind.MiniMindForCausalLM"
    native = native_from_pth(exports[f"{'moe' if use_moe else 'dense'}.pth"], use_moe)
    ids, mask = padded_batch()
    native_logits, native_tokens = logits_and_greedy_tokens(native, ids, mask)
    remote_logits, remote_tokens = remote_code_results[exports[name]]
    assert max_diff_on_real_tokens(native_logits, remote_logits, mask) <= 1e-4
    assert torch.equal(native_tokens, remote_tokens)


def test_tied_embedding_is_stored_once_in_safetensors(exports):
    with safe_open(os.path.join(exports["hf"], "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32  # --dtype float32
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names


# ----------------------------------------------------------------------------------------------
# Round trips are exact
# ----------------------------------------------------------------------------------------------

def assert_same_state_dict(path_a, path_b):
    a, b = torch.load(path_a, weights_only=True), torch.load(path_b, weights_only=True)
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("folder,source", [("llama", "dense"), ("hf", "dense"), ("hf_moe", "moe")])
def test_round_trip_back_to_torch_is_identical(exports, folder, source, tmp_path):
    back = str(tmp_path / f"back_{folder}.pth")
    if folder == "llama":  # once through the command line, the others in-process (same code, faster)
        result = run_cli("--mode", "hf2torch", "--in", exports[folder], "--out", back, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert f"--hidden_size {HIDDEN} --num_hidden_layers {LAYERS} --use_moe 0" in result.stdout
    else:
        convert_main(["--mode", "hf2torch", "--in", exports[folder], "--out", back])
    assert_same_state_dict(exports[f"{source}.pth"], back)  # fp16 -> fp32 folder -> fp16 is exact


def test_default_float16_export_round_trips(exports, tmp_path):
    out, back = str(tmp_path / "hf16"), str(tmp_path / "back.pth")
    convert_main(["--mode", "torch2hf", "--in", exports["dense.pth"], "--out", out, *SIZE_FLAGS])
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.float16
    convert_main(["--mode", "hf2torch", "--in", out, "--out", back])
    assert_same_state_dict(exports["dense.pth"], back)


# ----------------------------------------------------------------------------------------------
# The tokenizer travels with the folder
# ----------------------------------------------------------------------------------------------

CHATS = [
    [{"role": "user", "content": "你好，请介绍一下你自己。"}],
    [{"role": "system", "content": "You are MiniMind."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
]
TEXTS = ["Hello, world! 你好世界。", "<|im_start|>user\nhi<|im_end|>\n", "  spaces\tand\nnewlines  🙂"]


@pytest.mark.parametrize("folder", ["llama", "hf"])
def test_exported_tokenizer_matches_the_repository_tokenizer(exports, folder):
    original = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    exported = AutoTokenizer.from_pretrained(exports[folder])
    assert len(exported) == len(original) == 6400
    assert (exported.pad_token_id, exported.bos_token_id, exported.eos_token_id) == (0, 1, 2)
    for text in TEXTS:
        assert exported(text)["input_ids"] == original(text)["input_ids"]
    for chat in CHATS:
        for add_prompt in (True, False):
            expected = original.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_prompt)
            assert exported.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_prompt) == expected
    assert "<|im_start|>assistant\n" in exported.apply_chat_template(CHATS[0], tokenize=False,
                                                                      add_generation_prompt=True)


# ----------------------------------------------------------------------------------------------
# Wrong input: a clear message, a non-zero exit, and nothing half-written
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def convert_error(capsys):
    """Run the converter in-process on bad input: exit code 2 and one line on stderr, returned."""
    def run(args):
        with pytest.raises(SystemExit) as exit_info:
            convert_main(args)
        assert exit_info.value.code == 2
        message = capsys.readouterr().err
        assert message.startswith("convert_model.py: error: ") and message.count("\n") == 1, message
        return message
    return run


def test_missing_input_file(tmp_path, convert_error):
    out = tmp_path / "out"
    message = convert_error(["--mode", "torch2hf", "--in", str(tmp_path / "nope.pth"), "--out", str(out)])
    assert "nope.pth: no such file" in message
    assert not out.exists() and no_leftovers(tmp_path)


def test_shapes_that_do_not_fit_the_size_flags_name_the_right_flags(exports, tmp_path, convert_error):
    out = tmp_path / "out"
    message = convert_error(["--mode", "torch2llama", "--in", exports["dense.pth"], "--out", str(out),
                             "--hidden_size", "128", "--num_hidden_layers", str(LAYERS)])
    assert "does not fit a model built with these size flags" in message
    assert f"--hidden_size {HIDDEN} --num_hidden_layers {LAYERS} --use_moe 0" in message
    assert not out.exists() and no_leftovers(tmp_path)


def test_moe_to_llama_is_refused(exports, tmp_path, convert_error):
    out = tmp_path / "out"
    message = convert_error(["--mode", "torch2llama", "--in", exports["moe.pth"], "--out", str(out)])
    assert "cannot export an MoE model" in message and "--mode torch2hf" in message
    assert not out.exists() and no_leftovers(tmp_path)


def test_existing_output_needs_overwrite(exports, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli("--mode", "torch2llama", "--in", exports["dense.pth"], "--out", str(out), *SIZE_FLAGS,
                     cwd=tmp_path)
    assert result.returncode != 0
    assert "already exists; pass --overwrite" in result.stderr
    assert os.listdir(out) == ["keep.txt"] and no_leftovers(tmp_path)

    convert_main(["--mode", "torch2llama", "--in", exports["dense.pth"], "--out", str(out), *SIZE_FLAGS,
                  "--overwrite"])
    assert "keep.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)
    assert no_leftovers(tmp_path) and sorted(os.listdir(tmp_path)) == ["out"]


def test_size_flags_no_model_can_have_are_one_line_errors(exports, tmp_path, convert_error):
    out = str(tmp_path / "out")
    assert "--hidden_size 520" in convert_error(["--mode", "torch2hf", "--in", exports["dense.pth"], "--out", out,
                                                  "--hidden_size", "520"])
    assert "invalid choice" in convert_error(["--mode", "torch2onnx", "--in", exports["dense.pth"], "--out", out])


def test_hf2torch_refuses_folders_it_cannot_read(exports, tmp_path, convert_error):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "back.pth"
    assert "has no config.json" in convert_error(["--mode", "hf2torch", "--in", str(empty), "--out", str(out)])
    assert "is not a folder" in convert_error(["--mode", "hf2torch", "--in", exports["dense.pth"], "--out", str(out)])
    assert not out.exists()


def test_a_failure_while_writing_leaves_no_folder(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staging_folder(str(out)) as folder:
            open(os.path.join(folder, "config.json"), "w").write("{}")
            raise RuntimeError("disk full")
    assert not out.exists() and os.listdir(tmp_path) == []
