"""2 ZeRO-3 ranks with uneven micro-batch counts give the same weights after a step as 1 rank with
all the samples: the caller-managed gradient accumulation sums correctly across ranks."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from conftest import subprocess_env

REPO = Path(__file__).resolve().parent.parent
SCRIPT = str(REPO / "tests" / "_rank_equivalence.py")
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step(cmd, out: Path):
    proc = subprocess.run(cmd + ["--out", str(out)], cwd=REPO, env=subprocess_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(out), json.loads(Path(str(out) + ".json").read_text())


def test_two_ranks_match_one_rank(tmp_path):
    before = dict(build_initial())
    one, m1 = step([sys.executable, SCRIPT], tmp_path / "one.pt")
    two, m2 = step([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), SCRIPT], tmp_path / "two.pt")
    assert (m1["world"], m2["world"]) == (1, 2)
    assert one.keys() == two.keys() == before.keys()
    moved = sum(float((one[k] - before[k]).abs().sum()) for k in one)
    assert moved > 1e-3  # the step did something to compare
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-7, msg=key)
    for key in ("actor/pg_loss", "actor/grad_norm", "actor/clip_frac", "actor/entropy"):
        assert abs(m2[key] - m1[key]) <= 1e-5 * max(1.0, abs(m1[key])), (key, m1[key], m2[key])


def build_initial():
    from tapo_ds.modeling import build_tiny_model_and_tokenizer

    model, _ = build_tiny_model_and_tokenizer(seed=0)
    return {k: v.detach().float().clone() for k, v in model.state_dict().items()}
