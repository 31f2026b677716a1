"""The commands quoted in README.md (and the docs/ pages it links) are real: the two commands are
what CI runs, every script they name exists and accepts every flag they pass, and the short
ones run as written."""
import functools
import os
import re
import shlex
import subprocess
import sys

import pytest

from trainer_helpers import REPO_ROOT, run

README = os.path.join(REPO_ROOT, "README.md")
DOCS = [os.path.join(REPO_ROOT, "docs", name) for name in ("training.md", "chat.md", "convert.md")]
LAUNCHERS = ("torchrun", "deepspeed")
OUR_SCRIPTS = re.compile(r"^(trainer|scripts|bench)/\w+\.py$|^eval_model\.py$")


def read_page(path: str = README) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def bash_lines(paths=(README,)) -> list[str]:
    """Every command line of the ```bash blocks, continuation lines joined, comments dropped."""
    lines = []
    blocks = [block for path in paths for block in re.findall(r"```bash\n(.*?)```", read_page(path), flags=re.S)]
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                lines.append(shlex.join(words))
    return lines


def bash_commands(paths=(README,)) -> list[str]:
    """The single commands of those lines (`a && b` and `a | b` are two)."""
    return [part.strip() for line in bash_lines(paths) for part in re.split(r" '(?:&&|\|)' ", line)]


def script_and_flags(command: str) -> tuple[str, list[str]] | None:
    """(the repository script a command runs, the --flags it passes), or None for other tools."""
    words = shlex.split(command)
    scripts = [i for i, w in enumerate(words) if OUR_SCRIPTS.match(w)]
    if not scripts or words[0] not in ("python", "python3", "streamlit", *LAUNCHERS):
        return None
    first = scripts[0]
    if words[0] == "streamlit":  # streamlit's own flags come before `--`, the script's after it
        passed = words[words.index("--") + 1:] if "--" in words else []
    else:
        passed = words[first + 1:]
    return words[first], [w.split("=")[0] for w in passed if w.startswith("--")]


@functools.lru_cache(maxsize=None)
def accepted_flags(script: str) -> frozenset:
    """The options a script's --help lists (the option column only, not its prose)."""
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, script), "--help"], capture_output=True,
                            text=True, cwd=REPO_ROOT, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, f"{script} --help failed:\n{result.stderr[-2000:]}"
    return frozenset(re.findall(r"^\s+(?:-\w[ ,\w]*, )?(--[a-z_0-9]+)", result.stdout, flags=re.M))


def ci_test_command() -> str:
    with open(os.path.join(REPO_ROOT, ".ci", "run")) as f:
        lines = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    return lines[-1]


def test_the_two_commands_come_first_and_ci_runs_the_second():
    lines = [line.replace("'&&'", "&&") for line in bash_lines()]
    install = "python3 -m venv .venv && . .venv/bin/activate && pip install"
    assert lines[0].startswith(install) and lines[0].endswith("&& python scripts/quickstart.py")
    assert lines[1].startswith(install) and lines[1].endswith("&& python -m pytest")
    section = read_page().split("## Two commands", 1)[1].split("\n## ", 1)[0]
    assert section.count("```bash") == 2
    blocks = re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)
    assert blocks[1] == ci_test_command()


def test_every_script_in_the_readme_and_docs_exists_and_takes_its_flags():
    checked = 0
    for command in bash_commands((README, *DOCS)):
        found = script_and_flags(command)
        if found is None:
            continue
        script, flags = found
        assert os.path.isfile(os.path.join(REPO_ROOT, script)), f"README runs {script}, which does not exist"
        if script.startswith("bench/") or not flags:
            continue
        unknown = [flag for flag in flags if flag not in accepted_flags(script)]
        assert not unknown, f"README: `{command}` passes {unknown}, which {script} does not take"
        checked += 1
    assert checked >= 40  # the pages really were read


def test_files_the_readme_points_at_exist():
    text = read_page()
    for path in re.findall(r"\]\(((?:docs|bench)/[^)#]+)\)", text) + ["trainer/ds_zero2.json", "trainer/ds_zero3.json"]:
        assert os.path.exists(os.path.join(REPO_ROOT, path)), path


def test_parameter_count_one_liner_prints_the_small_models_count():
    command = next(c for c in bash_commands() if c.startswith("python -c"))
    result = run(shlex.split(command), cwd=REPO_ROOT)
    assert result.stdout.strip() == "25829888"
    assert "25,829,888" in read_page()


@pytest.mark.slow
def test_train_tokenizer_command_runs_as_written(tmp_path):
    command = next(c for c in bash_commands() if c.startswith("python scripts/train_tokenizer.py"))
    words = shlex.split(command)
    words[words.index("--out_dir") + 1] = str(tmp_path / "my_tokenizer")  # not into the repository's out/
    run([sys.executable, *words[1:]], cwd=REPO_ROOT)
    assert (tmp_path / "my_tokenizer" / "tokenizer.json").is_file()


def download_commands() -> list[str]:
    """Every dataset download command printed anywhere: the pages' bash blocks and the one line a
    trainer prints when the data is missing."""
    from trainer.cli import DOWNLOAD_HINT
    printed = bash_commands((README, *DOCS)) + [part.strip() for quoted in re.findall(r"`([^`]+)`", DOWNLOAD_HINT)
                                                for part in quoted.split("&&")]
    return [c for c in printed if c.split()[0] in ("hf", "modelscope", "huggingface-cli", "pip") and
            ("minimind_dataset" in c or "modelscope" in c or "huggingface" in c)]


def test_download_commands_work_as_printed():
    commands = download_commands()
    hf = [c for c in commands if c.startswith("hf download")]
    modelscope = [c for c in commands if c.startswith("modelscope download")]
    assert hf and modelscope and not [c for c in commands if c.startswith("huggingface-cli")]
    for page in (README, *DOCS):
        assert "huggingface-cli" not in read_page(page) and 'huggingface_hub[cli]' not in read_page(page)
    # the hf CLI ships with the pinned huggingface_hub; click rejects an unknown option even with --help
    binary = os.path.join(os.path.dirname(sys.executable), "hf")
    for command in set(hf):
        words = shlex.split(command)
        assert words[1:4] == ["download", "jingyaogong/minimind_dataset", "--repo-type"], command
        result = subprocess.run([binary, *words[1:], "--help"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "Download files from the Hub" in result.stdout, result.stderr
    # modelscope is not a dependency: every command comes with its install step, in today's syntax
    # (`--dataset` and `--local_dir` are deprecated aliases in modelscope 1.40)
    installs = [c for c in commands if c.startswith("pip install") and "modelscope" in c]
    assert len(installs) == len(modelscope)
    assert set(modelscope) == {"modelscope download gongjy/minimind_dataset --repo-type dataset --local-dir dataset"}
