"""GPU-only checks (``pytest -m gpu``; bench/gpu_check.sh runs them when a device is lent): the chunked OPSD
divergence and a TAPO step in bf16 under ZeRO-3 on CUDA. Skipped without CUDA."""

import pytest
import torch
from deepspeed.runtime.rollout.opsd import generalized_jsd_loss

from tapo_ds.opsd import chunked_generalized_jsd

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_chunked_divergence_on_cuda_matches_and_saves_memory():
    torch.manual_seed(0)
    n, length, hidden, vocab = 2, 2048, 256, 32000
    student = torch.nn.Linear(hidden, vocab).cuda()
    teacher = torch.nn.Linear(hidden, vocab).cuda()
    hs = torch.randn(n, length, hidden, device="cuda", requires_grad=True)
    ht = torch.randn(n, length, hidden, device="cuda")
    mask = torch.ones(n, length, dtype=torch.bool, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    full = generalized_jsd_loss(student(hs), teacher(ht).detach(), mask).loss_sum
    full.backward()
    peak_full = torch.cuda.max_memory_allocated()
    grad_full = hs.grad.clone()
    hs.grad = None
    torch.cuda.reset_peak_memory_stats()
    out = chunked_generalized_jsd(hs, ht, mask, student, teacher, chunk=256)
    out.loss.backward()
    peak_chunked = torch.cuda.max_memory_allocated()
    assert out.loss.item() == pytest.approx(full.item(), rel=1e-4)
    torch.testing.assert_close(hs.grad, grad_full, rtol=1e-3, atol=1e-5)
    assert peak_chunked < peak_full / 2, (peak_chunked, peak_full)
