"""SFT stage: loss on response tokens only, decreasing on a repeated batch; the CLI stage runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env

from tapo_ds.algorithms import token_logprobs_and_entropy
from tapo_ds.batch import Sample, collate
from tapo_ds.config import load_config
from tapo_ds.data import DataError, EpochSampler
from tapo_ds.engine import init_distributed
from tapo_ds.sft import SFTTrainer, load_sft_rows
from tapo_ds.stages import setup_engine

REPO = Path(__file__).resolve().parent.parent
ROWS = [{"prompt": f"What is {a} + {b}?", "response": f"Step 1: {a}+{b}={a + b}\nFinal Answer: \\boxed{{{a + b}}}"}
        for a, b in [(1, 2), (3, 4), (5, 1), (2, 2)]]


def write(tmp_path, rows):
    p = tmp_path / "sft.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_rows_validated(tmp_path):
    from tapo_ds.modeling import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    with pytest.raises(DataError, match=r"sft.jsonl:2: missing or empty field 'response'"):
        load_sft_rows([str(write(tmp_path, [ROWS[0], {"prompt": "x"}]))], tok, prompt_field="prompt",
                      response_field="response", chat_template_kwargs={}, max_seq_tokens=512)
    rows, too_long = load_sft_rows([str(write(tmp_path, ROWS))], tok, prompt_field="prompt",
                                   response_field="response", chat_template_kwargs={}, max_seq_tokens=60)
    assert too_long == 0 and rows[0].response_ids[-1] == tok.eos_token_id
    assert tok.decode(rows[0].prompt_ids).endswith("<|im_start|>assistant\n")


def test_loss_is_response_only_and_decreases(tmp_path):
    init_distributed()
    data = write(tmp_path, ROWS)
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      ["stage=sft", f"sft.train_files=[{data}]", "optimizer.lr=3e-3", "optimizer.warmup_steps=0",
                       "algorithm.micro_batch_size=3"])
    torch.manual_seed(0)
    engine, info, tok, _ = setup_engine(cfg, 1, 3, total_steps=20)
    rows, _ = load_sft_rows([str(data)], tok, prompt_field="prompt", response_field="response",
                            chat_template_kwargs={}, max_seq_tokens=512)
    # the expected first loss: token-mean NLL over response tokens only, from the initial weights
    mb = collate([Sample(r.prompt_ids, r.response_ids, "", 0.0) for r in rows], range(4), tok.pad_token_id)
    with torch.no_grad():
        logp, _ = token_logprobs_and_entropy(engine(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                                                    use_cache=False).logits[:, :-1], mb.labels)
    expected = float(-(logp * mb.response_mask).sum() / mb.response_mask.sum())
    assert mb.response_mask.sum() == sum(len(r.response_ids) for r in rows)

    trainer = SFTTrainer(engine=engine, info=info, rows=rows, sampler=EpochSampler(4, 0), batch_size=4,
                         micro_batch_size=3, pad_id=tok.pad_token_id)
    losses = [trainer.step(s)["sft/loss"] for s in range(1, 16)]
    assert losses[0] == pytest.approx(expected, rel=1e-5)
    assert losses[-1] < 0.5 * losses[0]


def test_sft_stage_cli(tmp_path):
    data = write(tmp_path, ROWS)
    cmd = [sys.executable, str(REPO / "tapo_ds" / "main.py"), "--config", str(REPO / "configs" / "tiny.yaml"),
           "--set", "stage=sft", "--set", f"sft.train_files=[{data}]", "--set", "sft.batch_size=2",
           "--set", "sft.epochs=2", "--set", f"output_dir={tmp_path}", "--set", "name=cold",
           "--set", "logging.progress_bar=false", "--set", "torch_threads=1"]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = (tmp_path / "cold" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert (tmp_path / "cold" / "hf" / "model.safetensors").is_file()
