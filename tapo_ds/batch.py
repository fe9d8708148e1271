"""Training samples as token lists, and their padded micro-batches.

A sample is (prompt ids, response ids) plus what the update needs; prompts carry no padding
here, so the training forward sees exactly the tokens the rollout conditioned on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]
    group_id: str
    reward: float
    question: int = -1  # index into the step's questions on this rank
    constructed: bool = False
    advantage: float = 0.0
    in_loss: bool = True  # False: no token of it enters the loss (DAPO's masked truncation)
    prefix_tokens: int = 0  # constructed: leading response tokens re-typed from y⁻ (before the reflection)
    loss_start: int = 0  # response tokens before this one get no loss (tapo.prefix_loss: mask)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class MicroBatch:
    """Right-padded ``[n, L]`` tensors; ``response_mask`` is aligned with next-token labels."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # [n, L-1]: input_ids shifted left
    response_mask: torch.Tensor  # [n, L-1] float, 1 where the label is a response token
    advantages: torch.Tensor  # [n]
    part: torch.Tensor  # [n] long: 0 original, 1 constructed
    index: list[int] = field(default_factory=list)  # positions in the step's sample list


def collate(samples: Sequence[Sample], index: Sequence[int], pad_id: int,
            device: torch.device | str = "cpu") -> MicroBatch:
    if not samples:
        raise ValueError("collate needs at least one sample")
    length = max(s.length for s in samples)
    n = len(samples)
    ids = torch.full((n, length), pad_id, dtype=torch.long)
    attn = torch.zeros((n, length), dtype=torch.long)
    resp = torch.zeros((n, length - 1), dtype=torch.float32)
    for i, s in enumerate(samples):
        seq = s.prompt_ids + s.response_ids
        ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        attn[i, :len(seq)] = 1
        # label position t predicts token t+1: response tokens sit at labels [P-1, P+R-1)
        if s.in_loss:
            resp[i, len(s.prompt_ids) - 1 + s.loss_start:len(seq) - 1] = 1.0
    return MicroBatch(
        input_ids=ids.to(device), attention_mask=attn.to(device), labels=ids[:, 1:].to(device),
        response_mask=resp.to(device),
        advantages=torch.tensor([s.advantage for s in samples], dtype=torch.float32, device=device),
        part=torch.tensor([int(s.constructed) for s in samples], dtype=torch.long, device=device),
        index=list(index))


def dummy_batch(pad_id: int, device) -> MicroBatch:
    """A one-token batch with an empty mask: keeps ZeRO-3 collectives in step on a rank that
    has fewer micro-batches than the others, and contributes exactly zero to the loss."""
    s = Sample(prompt_ids=[pad_id], response_ids=[pad_id], group_id="", reward=0.0)
    mb = collate([s], [], pad_id, device)
    mb.response_mask.zero_()
    return mb


def plan_micro_batches(samples: Sequence[Sample], micro_batch_size: int) -> list[list[int]]:
    """Group indices into micro-batches of similar length, so padding stays small."""
    order = sorted(range(len(samples)), key=lambda i: samples[i].length)
    return [order[i:i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]


def split_mini_batches(n: int, mini_batches: int, generator: torch.Generator) -> list[list[int]]:
    """Exactly ``mini_batches`` shuffled groups (some empty when n is small): every rank must run
    the same number of optimizer steps, whatever its number of samples."""
    perm = torch.randperm(n, generator=generator)
    return [chunk.tolist() for chunk in torch.tensor_split(perm, mini_batches)]


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts for the rollout engine: real tokens at the right edge."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, length - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, length - len(s):] = 1
    return ids, mask
