"""OPSD pieces: the chunked divergence against DeepSpeed's unchunked loss, the privileged-information
choice, and a teacher prompt rendered exactly like the student's."""

import pytest
import torch
from deepspeed.runtime.rollout.opsd import generalized_jsd_loss

from tapo_ds.data import encode, render_prompt
from tapo_ds.modeling import build_tiny_tokenizer
from tapo_ds.opsd import (
    DEFAULT_TEACHER_TEMPLATE,
    chunked_generalized_jsd,
    pick_privileged,
    render_teacher_content,
    teacher_prompt_ids,
)

B, T, H, V = 3, 11, 8, 37


def setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.nn.Linear(H, V)
    teacher = torch.nn.Linear(H, V)
    with torch.no_grad():
        for p in (*student.parameters(), *teacher.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
    hs = torch.randn(B, T, H, generator=g, requires_grad=True)
    ht = torch.randn(B, T, H, generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 2:9] = True
    mask[1, 5:] = True
    mask[2, :1] = True  # a one-token response
    return student, teacher, hs, ht, mask


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("beta, top_k, clip", [(0.5, None, None), (0.0, None, None), (1.0, None, None),
                                               (0.3, 5, None), (0.5, None, 0.05)])
@pytest.mark.parametrize("chunk", [1, 4, 11, 64])
def test_chunked_equals_deepspeed_unchunked(beta, top_k, clip, chunk):
    student, teacher, hs, ht, mask = setup()
    opts = dict(beta=beta, temperature=0.7, teacher_top_k=top_k, pointwise_clip=clip)
    full = generalized_jsd_loss(student(hs), teacher(ht).detach(), mask, **opts)
    out = chunked_generalized_jsd(hs, ht, mask, student, teacher, chunk=chunk, **opts)
    assert out.loss.item() == pytest.approx(full.loss_sum.item(), rel=1e-5, abs=1e-6)
    assert out.jsd_sum.item() == pytest.approx(full.loss_sum.item(), rel=1e-5, abs=1e-6)
    assert int(out.tokens) == int(full.valid_token_count) == int(mask.sum())
    want = grads(full.loss_sum, hs, student.weight, student.bias)
    got = grads(out.loss, hs, student.weight, student.bias)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_sequence_weights_and_teacher_student_kl():
    student, teacher, hs, ht, mask = setup(1)
    w = torch.tensor([0.5, 2.0, 0.0])
    out = chunked_generalized_jsd(hs, ht, mask, student, teacher, w, beta=0.5, chunk=3)
    rows = [generalized_jsd_loss(student(hs[i:i + 1]), teacher(ht[i:i + 1]).detach(), mask[i:i + 1], beta=0.5).loss_sum
            for i in range(B)]
    assert out.loss.item() == pytest.approx(sum(float(wi) * r.item() for wi, r in zip(w, rows)), rel=1e-5)
    kl = generalized_jsd_loss(student(hs), teacher(ht), mask, beta=0.0).loss_sum  # forward KL(teacher || student)
    assert out.teacher_student_kl_sum.item() == pytest.approx(kl.item(), rel=1e-5)
    # the teacher gets no gradient: it is a target
    assert not ht.requires_grad and teacher.weight.grad is None


def test_chunked_needs_aligned_shapes():
    student, teacher, hs, ht, mask = setup()
    with pytest.raises(ValueError, match="do not match the mask"):
        chunked_generalized_jsd(hs[:, :-1], ht, mask, student, teacher)
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_generalized_jsd(hs, ht, mask, student, teacher, chunk=0)


def test_pick_privileged():
    texts, rewards = ["a", "b", "c"], [0.0, 1.0, 0.0]
    assert pick_privileged("solution", "REF", texts, rewards, 0) == ("REF", "solution")
    assert pick_privileged("solution", None, texts, rewards, 0) == ("b", "group")  # no reference: the group's
    assert pick_privileged("group", "REF", texts, rewards, 0) == ("b", "group")
    assert pick_privileged("group", None, ["a", "b", "c"], [1.0, 1.0, 0.0], 0) == ("b", "group")  # another one
    assert pick_privileged("group", None, texts, rewards, 1) == ("b", "group")  # itself, the only right one
    assert pick_privileged("group", None, texts, [0.0, 0.0, 0.0], 0) == (None, "none")
    with pytest.raises(ValueError, match="opsd.privileged"):
        pick_privileged("oracle", None, texts, rewards, 0)


def test_teacher_prompt_is_the_student_prompt_with_more_content():
    """The same chat template, the same kwargs: the two token sequences differ only inside the user turn
    (the OPSD reference code renders the teacher without the student's chat template)."""
    tok = build_tiny_tokenizer()
    problem = "What is 2 + 3?"
    student = encode(tok, render_prompt(tok, problem, "{problem}", {}))
    teacher = teacher_prompt_ids(tok, DEFAULT_TEACHER_TEMPLATE, problem, "2 + 3 = 5. \\boxed{5}", {})
    content = render_teacher_content(DEFAULT_TEACHER_TEMPLATE, problem, "2 + 3 = 5. \\boxed{5}")
    assert content.startswith(problem) and "\\boxed{5}" in content
    head = encode(tok, render_prompt(tok, "", "{problem}", {}))
    # the chat wrapper before and after the user content is token for token the same
    prefix = len(encode(tok, tok.apply_chat_template([{"role": "user", "content": "X"}], tokenize=False,
                                                     add_generation_prompt=True).split("X")[0]))
    suffix = len(head) - prefix
    assert teacher[:prefix] == student[:prefix] and teacher[-suffix:] == student[-suffix:]
    assert len(teacher) > len(student)
