"""A scripted policy: a ``RolloutEngine`` whose responses a function decides.

For tests and benchmarks that need every TAPO branch to fire (selection, parsing,
verification) on a model too small to produce such answers. With ``model=`` it also pays the
real decode cost: it runs the model token by token over the scripted tokens (teacher-forced,
KV-cached, no early row dropping), so step times are comparable between algorithms.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from deepspeed.runtime.rollout.base import RolloutEngine, RolloutRequest, SamplingConfig

from tapo_ds.batch import left_pad
from tapo_ds.decode_loop import FollowUpResult
from tapo_ds.growing_cache import growing_cache
from tapo_ds.rollout import RolloutResult

# (prompt text without padding, sample index k) -> response text (the stop token is appended)
Script = Callable[[str, int], str]


class ScriptedRollout(RolloutEngine):
    name = "scripted"
    takes_followups = True  # no collectives, no cache: follow-up rows are possible

    def __init__(self, tokenizer, script: Script, stop_token_id: int, pad_token_id: int, model=None):
        self.tok, self.script = tokenizer, script
        self.stop_id, self.pad_id = int(stop_token_id), int(pad_token_id)
        self.model = model
        self.calls = 0

    def sync_weights(self, step: int) -> None:
        return None

    @torch.no_grad()
    def generate(self, request: RolloutRequest, sampling: SamplingConfig) -> RolloutResult:
        self.calls += 1
        t0 = time.perf_counter()
        K, T = sampling.n_samples_per_prompt, sampling.max_new_tokens
        prompts = [self.tok.decode(ids[m.bool()].tolist(), skip_special_tokens=False)
                   for ids, m in zip(request.prompt_ids, request.prompt_attention_mask)]
        rows, truncated = [], []
        for text in prompts:
            for k in range(K):
                ids = self.tok(self.script(text, k), add_special_tokens=False)["input_ids"] + [self.stop_id]
                truncated.append(len(ids) > T)
                rows.append(ids[:T])
        N = len(rows)
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        Tr = int(lengths.max())
        response = torch.full((N, Tr), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            response[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        if self.model is not None:
            self._pay_decode_cost(request, response, K)
        mask = (torch.arange(Tr)[None, :] < lengths[:, None]).long()
        prompt_ids = request.prompt_ids.cpu().repeat_interleave(K, dim=0)
        prompt_mask = request.prompt_attention_mask.cpu().long().repeat_interleave(K, dim=0)
        wall = time.perf_counter() - t0
        return RolloutResult(
            input_ids=torch.cat([prompt_ids, response], 1), attention_mask=torch.cat([prompt_mask, mask], 1),
            response_start_idx=torch.full((N,), prompt_ids.shape[1], dtype=torch.long),
            response_ids=response, response_mask=mask, response_lengths=lengths,
            truncated=torch.tensor(truncated, dtype=torch.bool),
            prompt_index=torch.arange(len(prompts)).repeat_interleave(K),
            stats={"tokens": float(lengths.sum()), "wall_s": wall})

    @torch.no_grad()
    def generate_with_followups(self, request: RolloutRequest, sampling: SamplingConfig, follow):
        """The scripted samples; their groups are reported last to first (completion out of request order, as
        in a real decode), the follow-ups asked for after each report, then scripted in the order asked."""
        res = self.generate(request, sampling)
        K = sampling.n_samples_per_prompt
        prompts: list[list[int]] = []
        for q in reversed(range(request.prompt_ids.shape[0])):
            rows = range(q * K, (q + 1) * K)
            follow.group_done(q, [res.response_ids[i, :int(res.response_lengths[i])].tolist() for i in rows],
                              [bool(res.truncated[i]) for i in rows])
            prompts += follow.ready(block=False)
        while more := follow.ready(block=True):
            prompts += more
        extra = FollowUpResult()
        if prompts:
            ids, mask = left_pad(prompts, self.pad_id)
            one = SamplingConfig(max_new_tokens=follow.sampling.max_new_tokens, temperature=follow.sampling.temperature)
            out = self.generate(RolloutRequest(ids, mask), one)
            extra.token_ids = [out.response_ids[i, :n].tolist() for i, n in enumerate(out.response_lengths.tolist())]
            extra.truncated = [bool(t) for t in out.truncated.tolist()]
        return res, extra

    def _pay_decode_cost(self, request: RolloutRequest, response: torch.Tensor, K: int) -> None:
        model = getattr(self.model, "module", self.model)
        device = next(model.parameters()).device
        mask = request.prompt_attention_mask.to(device).long().repeat_interleave(K, dim=0)
        ids = request.prompt_ids.to(device).repeat_interleave(K, dim=0)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = growing_cache(model.config)
        model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
              logits_to_keep=1)
        next_pos = pos[:, -1] + 1
        for t in range(response.shape[1] - 1):
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
            model(input_ids=response[:, t:t + 1].to(device), attention_mask=mask, position_ids=next_pos[:, None],
                  past_key_values=cache, use_cache=True, logits_to_keep=1)
            next_pos = next_pos + 1
