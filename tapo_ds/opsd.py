"""On-policy self-distillation (OPSD): the student's own responses, scored against the same model
given privileged information (the question plus a correct solution).

The loss is DeepSpeed's ``generalized_jsd_loss`` between the student's and the teacher's next-token
distributions on the student's response tokens. Full-vocabulary logits of both models over a long
response do not fit (8k tokens x 151k vocabulary x 4 bytes is 5 GB per sequence and model), so the
divergence runs over chunks of positions: the student's logits of a chunk are recomputed in the
backward pass (activation checkpointing of the output projection), the teacher's are made under
no_grad chunk by chunk, and peak memory is one chunk's logits instead of the whole sequence's.

Privileged information (``opsd.privileged``): ``solution`` takes the row's reference solution
(``data.solution_field``) where it has one, else falls back to ``group``; ``group`` takes a correct
response from the same group (another one than the sample itself where there is one). A sample
with neither gives no distillation signal this step: it is masked out and counted.

The teacher prompt is rendered with the tokenizer's chat template exactly as the student's (one
user turn, the same ``chat_template_kwargs``); only the user content differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from deepspeed.runtime.rollout.opsd import generalized_jsd_loss
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .data import encode, render_chat

DEFAULT_TEACHER_TEMPLATE = (
    "{problem}\n\nA correct solution, for reference:\n{solution}\n\n"
    "Now solve the problem in your own words, step by step."
)
PRIVILEGED_MODES = ("solution", "group")


def render_teacher_content(template: str, problem: str, solution: str) -> str:
    """The teacher's user turn; the template must hold ``{problem}`` and ``{solution}``."""
    return template.replace("{problem}", problem).replace("{solution}", solution)


def teacher_prompt_ids(tokenizer, template: str, problem: str, solution: str, chat_template_kwargs: dict) -> list[int]:
    return encode(tokenizer, render_chat(tokenizer, render_teacher_content(template, problem, solution),
                                         chat_template_kwargs))


def pick_privileged(mode: str, reference: Optional[str], texts: Sequence[str], rewards: Sequence[float],
                    index: int) -> tuple[Optional[str], str]:
    """The privileged solution for sample ``index`` of its group, and where it came from.

    ``texts``/``rewards``: the group's responses and rewards. Returns ``(None, "none")`` when the
    sample gets no teacher this step."""
    if mode not in PRIVILEGED_MODES:
        raise ValueError(f"opsd.privileged: expected one of {list(PRIVILEGED_MODES)}, got {mode!r}")
    if mode == "solution" and reference:
        return reference, "solution"
    correct = [i for i, r in enumerate(rewards) if r > 0]
    others = [i for i in correct if i != index]
    if others:
        return texts[others[0]], "group"
    if correct:
        return texts[correct[0]], "group"
    return None, "none"


@dataclass
class ChunkedJSD:
    """The weighted divergence over the response tokens, and the plain sums behind the metrics."""

    loss: Tensor  # sum over sequences of seq_weight x (sum of the per-token divergence): what backward sees
    jsd_sum: Tensor  # unweighted sum over the masked tokens (no grad)
    teacher_student_kl_sum: Tensor  # forward KL(teacher || student) summed over the masked tokens (no grad)
    tokens: Tensor


def chunked_generalized_jsd(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor,
                            student_head: Callable[[Tensor], Tensor], teacher_head: Callable[[Tensor], Tensor],
                            seq_weights: Optional[Tensor] = None, *, beta: float = 0.5, temperature: float = 1.0,
                            teacher_top_k: Optional[int] = None, pointwise_clip: Optional[float] = None,
                            chunk: int = 512) -> ChunkedJSD:
    """DeepSpeed's ``generalized_jsd_loss`` over ``mask``, ``chunk`` positions at a time.

    ``student_hidden``/``teacher_hidden``: [B, T, H] final hidden states, aligned so that position t
    of both predicts the same response token; ``mask``: [B, T] bool; ``*_head``: the output
    projections; ``seq_weights`` ([B], default 1) multiply each sequence's summed divergence (the
    aggregation's per-sequence coefficients). With one chunk of the whole length and unit weights,
    ``loss`` is DeepSpeed's ``loss_sum`` on the full logits."""
    if student_hidden.shape[:2] != mask.shape or teacher_hidden.shape[:2] != mask.shape:
        raise ValueError(f"hidden states {tuple(student_hidden.shape)} / {tuple(teacher_hidden.shape)} do not "
                         f"match the mask {tuple(mask.shape)}")
    if chunk < 1:
        raise ValueError(f"opsd.chunk_tokens must be >= 1, got {chunk}")
    mask = mask.bool()
    rows = [i for i in range(mask.shape[0]) if bool(mask[i].any())]
    weights = torch.ones(mask.shape[0]) if seq_weights is None else seq_weights.detach().float().cpu()
    options = dict(temperature=temperature, teacher_top_k=teacher_top_k, pointwise_clip=pointwise_clip)

    def row_sums(s_logits: Tensor, t_logits: Tensor, m: Tensor, b: float) -> Tensor:
        return torch.stack([generalized_jsd_loss(s_logits[i:i + 1], t_logits[i:i + 1], m[i:i + 1], beta=b,
                                                 **options).loss_sum for i in range(m.shape[0])])

    def piece(h: Tensor, t_logits: Tensor, m: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s_logits = student_head(h).float()
        rows_jsd = row_sums(s_logits, t_logits, m, beta)
        with torch.no_grad():
            kl = row_sums(s_logits.detach(), t_logits, m, 0.0).sum()
        return (rows_jsd * w).sum(), rows_jsd.detach().sum(), kl

    device = student_hidden.device
    loss = torch.zeros((), dtype=torch.float32, device=device)
    jsd_sum = torch.zeros((), dtype=torch.float32, device=device)
    kl_sum = torch.zeros((), dtype=torch.float32, device=device)
    for start in range(0, mask.shape[1], chunk):
        sl = slice(start, start + chunk)
        live = [i for i in rows if bool(mask[i, sl].any())]
        if not live:
            continue
        idx = torch.tensor(live, device=device)
        h, m, w = student_hidden[idx, sl], mask[idx, sl], weights[live].to(device)
        with torch.no_grad():
            t_logits = teacher_head(teacher_hidden[idx, sl]).float()
        if torch.is_grad_enabled() and h.requires_grad:
            # the chunk's student logits are freed after the forward and recomputed in the backward
            part, j, k = checkpoint(piece, h, t_logits, m, w, use_reentrant=False)
        else:
            part, j, k = piece(h, t_logits, m, w)
        loss, jsd_sum, kl_sum = loss + part, jsd_sum + j, kl_sum + k
    return ChunkedJSD(loss=loss, jsd_sum=jsd_sum, teacher_student_kl_sum=kl_sum, tokens=mask.sum())
