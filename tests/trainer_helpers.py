"""Running the trainers as a user does: real command lines in subprocesses, tiny model sizes."""
import os
import socket
import subprocess
import sys

import torch

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BIN = os.path.dirname(sys.executable)  # torchrun / deepspeed of the same environment
# one thread per process: tiny models gain nothing from more, and tests share 2 cores with each other
TEST_ENV = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
TINY = ["--hidden_size", "64", "--num_hidden_layers", "2", "--max_seq_len", "128", "--num_workers", "0"]


def script(name: str) -> str:
    return os.path.join(REPO_ROOT, "trainer", name)


def dirs(tmp) -> list[str]:
    return ["--out_dir", str(tmp / "out"), "--checkpoint_dir", str(tmp / "checkpoints")]


def run(command: list[str], cwd, timeout: int = 300, env: dict | None = None, check: bool = True):
    """Run a command from `cwd` (not the repo root: scripts must work from anywhere)."""
    result = subprocess.run(command, cwd=str(cwd), capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **TEST_ENV, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def train(name: str, tmp, *flags, **kwargs):
    return run([sys.executable, script(name), *TINY, *dirs(tmp), *map(str, flags)], cwd=tmp, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resume_model(tmp, name: str = "pretrain_64") -> dict:
    """The fp32 model weights of a run's resume state (exact, unlike the fp16 weights file)."""
    return torch.load(tmp / "checkpoints" / f"{name}_resume.pth", weights_only=True)["model"]


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def metrics(tmp, name: str) -> list[dict]:
    import json
    with open(tmp / "out" / f"{name}_metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def write_chat_data(path, stage: str, copies: int = 4):
    """A small chat file for `stage` (sft, reason or dpo) where, at --max_seq_len 64, some samples
    fit, some are cut inside a reply, and some have no reply inside the window at all (a long
    first question). Returns (path, number of samples, number with nothing to train)."""
    import json
    ask, long_ask = {"role": "user", "content": "你好"}, {"role": "user", "content": "请读这段话：" + "很长的文字。" * 60}

    def reply(text):
        if stage == "reason":
            text = f"<think>\n想一想。\n</think>\n<answer>\n{text}\n</answer>"
        return {"role": "assistant", "content": text}

    chats = [[ask, reply("你好！")], [ask, reply("从前有座山，山里有座庙。" * 20)], [long_ask, reply("好的。")]]
    if stage == "dpo":
        rows = [{"chosen": chat, "rejected": chat[:1] + [reply("不知道。")]} for chat in chats]
    else:
        rows = [{"conversations": chat} for chat in chats]
    rows = rows * copies
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return str(path), len(rows), copies
