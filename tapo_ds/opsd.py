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
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from deepspeed.runtime.rollout.opsd import generalized_jsd_loss
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .algorithms import GlobalCounts, local_counts, token_coefficients
from .batch import Sample, collate, dummy_batch
from .data import encode, render_chat
from .engine import all_reduce_
from .metrics import StepMetrics
from .plain_linear import plain_linear
from .update import grad_norm, micro_batches

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


# ----------------------------------------------------------------------------- the step


@dataclass(frozen=True)
class OpsdSettings:
    privileged: str  # solution | group
    template: str  # the teacher's user turn, with {problem} and {solution}
    chat_template_kwargs: dict
    beta: float
    temperature: float
    teacher_top_k: Optional[int]
    pointwise_clip: Optional[float]
    chunk_tokens: int
    agg_mode: str


def load_teacher_template(path: str) -> str:
    """The file's text, or the built-in template for an empty path."""
    if not path:
        return DEFAULT_TEACHER_TEMPLATE
    return Path(path).read_text(encoding="utf-8")


class Teacher:
    """OPSD's teacher prompts for a step's samples and its optimizer step.

    ``frozen``: a frozen copy of the initial policy (a DeepSpeed inference engine) scores the
    responses; None: the live policy does, under no_grad."""

    def __init__(self, settings: OpsdSettings, tokenizer, frozen=None):
        self.s, self.tok, self.frozen = settings, tokenizer, frozen

    def prompts(self, samples: Sequence, problems: Sequence[str], references: Sequence[Optional[str]],
                texts: Sequence[str]) -> tuple[list[Optional[list[int]]], StepMetrics]:
        """Teacher prompt ids per sample (None: no privileged information for it this step).

        ``problems``/``references``: per question of the step; ``samples[i].question`` indexes them;
        ``texts``: the decoded responses, aligned with ``samples``."""
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(samples):
            groups.setdefault(s.group_id, []).append(i)
        out: list[Optional[list[int]]] = []
        source = {"solution": 0, "group": 0, "none": 0}
        rendered: dict[tuple[int, str], list[int]] = {}  # the K samples of a question mostly share one teacher
        for i, s in enumerate(samples):
            members = groups[s.group_id]
            solution, where = pick_privileged(self.s.privileged, references[s.question],
                                              [texts[j] for j in members], [samples[j].reward for j in members],
                                              members.index(i))
            source[where] += 1
            if solution is not None and (s.question, solution) not in rendered:
                rendered[s.question, solution] = teacher_prompt_ids(
                    self.tok, self.s.template, problems[s.question], solution, self.s.chat_template_kwargs)
            out.append(None if solution is None else rendered[s.question, solution])
        m = StepMetrics()
        m.mean("opsd/privileged_frac", len(samples) - source["none"], len(samples))
        m.mean("opsd/reference_frac", source["solution"], len(samples))
        return out, m

    def update(self, engine, samples: Sequence, teacher_prompts: Sequence[Optional[list[int]]], *,
               micro_batch_size: int, pad_id: int, world_size: int) -> StepMetrics:
        """One optimizer step on the divergence over the samples that have a teacher prompt."""
        device = engine.device
        chosen = [i for i, p in enumerate(teacher_prompts) if p is not None]
        mbs = micro_batches(samples, chosen, micro_batch_size, pad_id, device, at_least=1)
        counts = sum((local_counts(mb.response_mask, mb.part) for mb in mbs), GlobalCounts.zeros(device=device))
        counts = GlobalCounts.from_tensor(all_reduce_(counts.as_tensor(), "sum"))
        scale = torch.ones(2, dtype=torch.float32, device=device)
        teacher = engine if self.frozen is None else self.frozen
        student_head = engine.module.get_output_embeddings()
        teacher_head = teacher.module.get_output_embeddings()
        options = dict(beta=self.s.beta, temperature=self.s.temperature, teacher_top_k=self.s.teacher_top_k,
                       pointwise_clip=self.s.pointwise_clip, chunk=self.s.chunk_tokens)
        loss_sum = jsd_sum = kl_sum = 0.0
        for mb in mbs:
            if mb.index:
                t_mb = collate([Sample(prompt_ids=teacher_prompts[i], response_ids=samples[i].response_ids,
                                       group_id="", reward=0.0) for i in mb.index], mb.index, pad_id, device)
            else:
                t_mb = dummy_batch(pad_id, device)
            s_hidden = final_hidden(engine, mb)
            with torch.no_grad(), plain_linear():
                t_hidden = final_hidden(teacher, t_mb)
            s_al, mask = aligned(s_hidden[:, :-1], mb.response_mask)
            t_al, t_mask = aligned(t_hidden[:, :-1], t_mb.response_mask)
            if mb.index and not torch.equal(mask, t_mask):
                raise RuntimeError("teacher and student response tokens do not line up")
            coef = token_coefficients(mb.response_mask, mb.part, scale, counts, self.s.agg_mode, "pooled")
            seq_w = coef.max(dim=1).values
            out = chunked_generalized_jsd(s_al, t_al, mask, student_head, teacher_head, seq_w, **options)
            # Every rank runs the output projection in its graph, also on an empty micro-batch: ZeRO-3's
            # gradient hooks must fire for the same parameters on all ranks.
            loss = out.loss + 0.0 * student_head(s_hidden[:, :1]).sum()
            engine.backward(loss * world_size, scale_wrt_gas=False)
            loss_sum += float(out.loss.detach())
            jsd_sum += float(out.jsd_sum)
            kl_sum += float(out.teacher_student_kl_sum)
        engine.step()
        tokens = float(counts.tokens.sum())
        m = StepMetrics()
        m.sum("actor/pg_loss", loss_sum)
        m.mean("opsd/jsd", jsd_sum, tokens)
        m.mean("opsd/teacher_student_kl", kl_sum, tokens)
        m.local("actor/grad_norm", grad_norm(engine))
        m.local("actor/lr", engine.get_lr()[0])
        return m


def final_hidden(module, mb) -> Tensor:
    """The last layer's hidden states [n, L, H] (after the final norm): no full-vocabulary logits."""
    out = module(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False,
                 output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1]


def aligned(hidden: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor]:
    """The rows' response positions packed to the left: ``[n, R, H]`` and a ``[n, R]`` mask."""
    keep = response_mask.bool()
    lengths = keep.sum(1)
    width = max(int(lengths.max()) if lengths.numel() else 0, 1)
    out = hidden.new_zeros(hidden.shape[0], width, hidden.shape[-1])
    mask = torch.zeros(hidden.shape[0], width, dtype=torch.bool, device=hidden.device)
    for row in range(hidden.shape[0]):
        n = int(lengths[row])
        if n:
            out[row, :n] = hidden[row][keep[row]]
            mask[row, :n] = True
    return out, mask
