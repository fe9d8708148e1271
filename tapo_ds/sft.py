"""The SFT stage (cold start): (prompt, response) rows, loss on response tokens only.

Same engine, update path, loop, checkpoints and TensorBoard as RL: a step is one optimizer
step of the registered ``nll`` loss with token-mean aggregation over the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tapo_ds.algorithms import PolicyLossParams
from tapo_ds.batch import Sample
from tapo_ds.data import DataError, encode, jsonl_rows, render_chat, shard
from tapo_ds.metrics import StepMetrics
from tapo_ds.update import LossSettings, optimizer_step

SFT_LOSS = LossSettings(policy_loss="nll", clip=PolicyLossParams(), agg_mode="token-mean", part_scale=(1.0, 0.0))


@dataclass
class SFTRow:
    prompt_ids: list[int]
    response_ids: list[int]


def load_sft_rows(files: Sequence[str], tokenizer, *, prompt_field: str, response_field: str,
                  chat_template_kwargs: dict, max_seq_tokens: int) -> tuple[list[SFTRow], int]:
    """Rows with the chat template applied to the prompt and EOS after the response; rows over
    ``max_seq_tokens`` are dropped (and counted) rather than truncated into a wrong target."""
    rows, too_long = [], 0
    for src in files:
        for where, row in jsonl_rows(Path(src)):
            for field in (prompt_field, response_field):
                if not isinstance(row.get(field), str) or not row[field]:
                    raise DataError(f"{where}: missing or empty field {field!r}")
            prompt = encode(tokenizer, render_chat(tokenizer, row[prompt_field], chat_template_kwargs))
            response = encode(tokenizer, row[response_field]) + [tokenizer.eos_token_id]
            if len(prompt) + len(response) > max_seq_tokens:
                too_long += 1
                continue
            rows.append(SFTRow(prompt, response))
    if not rows:
        raise DataError(f"{', '.join(map(str, files))}: no rows within sft.max_seq_tokens = {max_seq_tokens}")
    return rows, too_long


class SFTTrainer:
    def __init__(self, *, engine, info, rows: Sequence[SFTRow], sampler, batch_size: int, micro_batch_size: int,
                 pad_id: int):
        self.engine, self.info, self.rows, self.sampler = engine, info, rows, sampler
        self.batch_size, self.micro_batch_size, self.pad_id = batch_size, micro_batch_size, pad_id

    def step(self, step: int) -> StepMetrics:
        indices = shard(self.sampler.next_indices(self.batch_size), self.info.rank, self.info.world_size)
        samples = [Sample(self.rows[i].prompt_ids, self.rows[i].response_ids, group_id="", reward=0.0)
                   for i in indices]
        update = optimizer_step(self.engine, samples, range(len(samples)), SFT_LOSS,
                                micro_batch_size=self.micro_batch_size, pad_id=self.pad_id,
                                world_size=self.info.world_size)
        m = StepMetrics()
        m.sum("sft/loss", update.pg_loss)
        m.local("actor/grad_norm", update.grad_norm)
        m.local("actor/lr", update.lr)
        m.local("sft/epoch", self.sampler.epoch + self.sampler.position / self.sampler.size)
        return m
