"""The rollout engine: DeepSpeed's ``RolloutEngine`` interface with a decode loop that does
no work for finished sequences.

Why not DeepSpeed's ``HybridEngineRollout``: under ZeRO-3 it calls HF ``generate`` with
``eos_token_id=None`` so that every rank runs the same number of forwards (each forward
all-gathers parameters), i.e. every batch decodes to ``max_new_tokens``. Measured on
SmolLM2-135M, gathering once and stopping early alone gain ~1.0-1.1x, because one of ~32
samples almost always runs to the limit. What pays is dropping finished rows from the batch
and the KV cache as they end: compute then follows the *mean* response length, not the max
(ceiling ~ max length / mean length).

Two ways to get weights under ZeRO-3 (``gather=``):

* ``"once"`` (default): ``sync_weights`` all-gathers the parameters once per rollout phase
  and copies them into a plain, un-hooked copy of the model (built once by
  ``module_factory`` and reused). Decoding is then rank-local with no collectives, so each
  rank stops as soon as *its own* sequences have ended; ranks meet again at the next
  collective (the training step). Costs one full model copy of memory per rank.
* ``"per_step"``: decode with the engine's module; ZeRO-3's hooks gather each submodule's
  parameters at every forward, so all ranks must run the same number of forwards. A
  "still running" flag is all-reduced (MAX) every step; a rank whose sequences have all
  ended keeps one dummy row alive until every rank is done.

Without ZeRO-3 (stage <= 2 or a plain module) the module is used directly in both modes.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import transformers
from deepspeed.runtime.rollout.base import RolloutBatch, RolloutEngine, RolloutRequest, SamplingConfig

from tapo_ds.decode_loop import FollowUpResult, FollowUps, _DecodeLoop, sample_next_token
from tapo_ds.lookup_draft import LookupDraft
from tapo_ds.plain_linear import plain_linear

__all__ = ["FollowUpResult", "FollowUps", "RolloutResult", "TapoRollout", "sample_next_token"]


@dataclass
class RolloutResult(RolloutBatch):
    """``RolloutBatch`` plus the response view the trainer needs.

    Row ``i`` is sample ``i % K`` of request row ``prompt_index[i]`` (``repeat_interleave``
    order, as DeepSpeed). ``input_ids = [left-padded prompt | response]``, right-padded
    with the pad id; ``response_start_idx`` is ``T_p`` for every row.
    """

    response_ids: torch.Tensor  # [B', T_r] right-padded with pad_token_id
    response_mask: torch.Tensor  # [B', T_r] 1 on generated tokens up to and including the stop token
    response_lengths: torch.Tensor  # [B'] number of 1s in response_mask
    truncated: torch.Tensor  # [B'] bool: no stop token within max_new_tokens
    prompt_index: torch.Tensor  # [B'] request row each sample came from
    stats: dict = field(default_factory=dict)  # tokens, decode_steps, wall_s, useful_tokens_per_s, ...


def _dist():
    """deepspeed.comm when a process group exists, else None (plain single-process use)."""
    import deepspeed.comm as dist
    return dist if dist.is_initialized() else None


class TapoRollout(RolloutEngine):
    """K samples per prompt with a row-dropping KV-cache decode loop.

    Args:
        engine: a DeepSpeed engine (its ``.module`` is used) or a plain ``nn.Module``.
        tokenizer: kept for callers (decode); ids come from the arguments below.
        stop_token_ids: every id that ends a response (Qwen has two).
        pad_token_id: fills the prompt's left padding and the response's right padding.
        seed: sampling seed; each call seeds a fresh generator from (seed, rank, step, call).
        gather: ``"once"`` or ``"per_step"`` (see the module docstring; ZeRO-3 only).
        module_factory: builds an empty, un-hooked model of the same architecture; needed
            for ZeRO-3 with ``gather="once"``.
        compact_fraction: drop finished rows once at least this fraction of the batch rows
            has finished (0 -> drop at every finish). Dropping copies the KV cache, so
            waiting for a few rows amortises the copy; at 0.1-0.25 the copy is noise.
        gather_bucket_numel: ZeRO-3 parameters are gathered in buckets of about this many
            elements, to bound the transient memory on top of the inference copy.
    """

    name = "tapo"

    def __init__(self, engine, tokenizer, stop_token_ids: list[int], pad_token_id: int, seed: int = 0,
                 gather: str = "once", module_factory: Optional[Callable[[], torch.nn.Module]] = None,
                 compact_fraction: float = 0.125, gather_bucket_numel: int = 1 << 28):
        if gather not in ("once", "per_step"):
            raise ValueError(f"gather must be 'once' or 'per_step', got {gather!r}")
        if not stop_token_ids:
            raise ValueError("stop_token_ids must name at least one token")
        self.engine = engine
        self.tokenizer = tokenizer
        self.stop_token_ids = [int(t) for t in stop_token_ids]
        self.pad_token_id = int(pad_token_id)
        self.seed = int(seed)
        self.gather = gather
        self.module_factory = module_factory
        self.compact_fraction = float(compact_fraction)
        self.gather_bucket_numel = int(gather_bucket_numel)
        self.module = engine.module if isinstance(getattr(engine, "module", None), torch.nn.Module) else engine
        self.zero3 = any(hasattr(p, "ds_id") for p in self.module.parameters())
        if self.zero3 and gather == "once" and module_factory is None:
            raise ValueError("ZeRO-3 with gather='once' needs module_factory to build the inference copy")
        self._copy: Optional[torch.nn.Module] = None  # plain inference model (ZeRO-3, "once")
        self._synced_version = None  # engine.global_steps when the copy was last filled
        self._step = 0
        self._calls = 0
        self.last_sync_s = 0.0

    @property
    def takes_followups(self) -> bool:
        """Whether ``generate_with_followups`` can run: decoding without collectives (ranks may then run
        different numbers of forwards) and a model whose layers all attend fully (a sliding-window cache
        cannot take rows of another length)."""
        dist = _dist()
        if self.zero3 and self.gather == "per_step" and dist is not None and dist.get_world_size() > 1:
            return False
        return self.takes_lookup

    @property
    def takes_lookup(self) -> bool:
        """Whether ``generate`` can verify prompt-lookup drafts: a model whose layers all attend fully (the
        positions a row did not keep stay in its cache, masked, which a sliding window would count)."""
        config = self.module.config
        return not getattr(config, "use_sliding_window", False) and all(
            t == "full_attention" for t in (getattr(config, "layer_types", None) or ["full_attention"]))

    # ------------------------------------------------------------------ weights

    def sync_weights(self, step: int) -> None:
        """Start the rollout phase of training step ``step`` (``step`` also keys the sampling
        seed, so a resumed run draws the same samples). Under ZeRO-3 with gather="once" this
        is a collective: every rank must call it (it all-gathers the parameters)."""
        self._step, self._calls = int(step), 0
        if self.zero3 and self.gather == "once":
            self._fill_copy()

    def _fill_copy(self) -> None:
        import deepspeed
        t0 = time.perf_counter()
        src = dict(self.module.named_parameters())
        if self._copy is None:
            self._copy = self._build_copy(next(iter(src.values())))
        dst = dict(self._copy.named_parameters())
        if dst.keys() != src.keys():
            raise ValueError("module_factory built a model whose parameter names differ from the engine's: "
                             f"{sorted(set(dst) ^ set(src))[:5]}")
        # Buckets: one all-gather round per bucket, every rank in the same (name) order.
        names, numel = [], 0
        for name, p in list(src.items()) + [(None, None)]:
            if name is not None:
                names.append(name)
                numel += p.ds_numel if hasattr(p, "ds_numel") else p.numel()
            if names and (name is None or numel >= self.gather_bucket_numel):
                with deepspeed.zero.GatheredParameters([src[n] for n in names], modifier_rank=None):
                    for n in names:
                        dst[n].data.copy_(src[n].data)
                names, numel = [], 0
        # Buffers are not partitioned by ZeRO-3 (e.g. rotary inv_freq): copy as they are.
        dst_buffers = dict(self._copy.named_buffers())
        for name, b in self.module.named_buffers():
            if name in dst_buffers and dst_buffers[name].shape == b.shape:
                dst_buffers[name].copy_(b)
        self._synced_version = getattr(self.engine, "global_steps", None)
        self.last_sync_s = time.perf_counter() - t0

    def _build_copy(self, ref_param: torch.nn.Parameter) -> torch.nn.Module:
        # transformers wraps from_config in zero.Init while an HfDeepSpeedConfig is alive
        # (set for partitioned loading); the copy must be a plain full model, so hide it.
        ds_integration = transformers.integrations.deepspeed
        saved = ds_integration._hf_deepspeed_config_weak_ref
        ds_integration._hf_deepspeed_config_weak_ref = None
        try:
            copy = self.module_factory()
        finally:
            ds_integration._hf_deepspeed_config_weak_ref = saved
        if any(hasattr(p, "ds_id") for p in copy.parameters()):
            raise ValueError("module_factory returned a ZeRO-3 partitioned model; it must build a plain one")
        # The engine's compute device, not the partition's (offload_param keeps that on CPU).
        device = getattr(self.engine, "device", None) or ref_param.device
        copy.to(device=device, dtype=ref_param.dtype)
        copy.eval().requires_grad_(False)
        return copy

    # ------------------------------------------------------------------ generate

    @torch.no_grad()
    def generate(self, request: RolloutRequest, sampling: SamplingConfig,
                 lookup: Optional[LookupDraft] = None) -> RolloutResult:
        """K = ``sampling.n_samples_per_prompt`` samples per request row (see RolloutResult); ``lookup``:
        verify drafts copied from each row's prompt (:mod:`tapo_ds.lookup_draft`: the same distribution in
        fewer forwards, for text that copies its prompt).

        Collectives under ZeRO-3: with "per_step" every call is one (all ranks must call it
        together); with "once" a call is rank-local unless the copy is stale (never filled,
        or ``engine.global_steps`` moved since the last gather), in which case it re-gathers
        first, so call ``sync_weights`` on every rank at the start of each phase."""
        result, _ = self._run(request, sampling, None, lookup)
        return result

    @torch.no_grad()
    def generate_with_followups(self, request: RolloutRequest, sampling: SamplingConfig,
                                follow: "FollowUps") -> tuple[RolloutResult, "FollowUpResult"]:
        """``generate`` plus rows that join the running batch while it decodes: when the K samples of a
        request row have all ended, ``follow.group_done`` gets them; the prompts ``follow.ready`` returns
        are prefilled and decoded (with ``follow.sampling``) in the slots finished rows freed. The call
        returns once nothing runs and ``follow.ready(block=True)`` has nothing more. Rank-local only
        (not with ``gather="per_step"`` on several ranks: their forward counts would differ). The follow-up
        rows verify prompt-lookup drafts when ``follow`` has a ``lookup`` (see ``generate``)."""
        return self._run(request, sampling, follow, getattr(follow, "lookup", None), lookup_kinds=(1,))

    def _run(self, request: RolloutRequest, sampling: SamplingConfig, follow, lookup=None, lookup_kinds=(0,)):
        if sampling.max_new_tokens <= 0 or sampling.n_samples_per_prompt <= 0:
            raise ValueError("sampling.max_new_tokens and n_samples_per_prompt must be positive")
        if request.prompt_ids.shape[0] == 0:
            raise ValueError("empty request: under ZeRO-3 every rank must bring at least one prompt")
        if sampling.continuous_batch_size is not None:
            raise NotImplementedError("TapoRollout drops finished rows and refills them with follow-up rows "
                                      "(generate_with_followups); leave SamplingConfig.continuous_batch_size unset")
        if self.zero3 and self.gather == "once":
            # A stale copy would silently sample from old weights: refill after any update.
            if self._copy is None or self._synced_version != getattr(self.engine, "global_steps", None):
                self._fill_copy()
            module = self._copy
        else:
            module = self.module
        dist = _dist()
        rank = dist.get_rank() if dist is not None else 0
        # Per-step ZeRO-3 gathers are collectives: ranks must agree on when to stop.
        lockstep = dist if (self.zero3 and self.gather == "per_step" and dist is not None
                            and dist.get_world_size() > 1) else None
        if follow is not None and lockstep is not None:
            raise ValueError("follow-up rows need rank-local decoding: use gather='once' (or one rank)")

        device = next(module.parameters()).device
        request = RolloutRequest(request.prompt_ids.to(device), request.prompt_attention_mask.to(device))
        generator = None
        if sampling.temperature > 0 or (follow is not None and follow.sampling.temperature > 0):
            key = f"{self.seed}:{rank}:{self._step}:{self._calls}".encode()
            generator = torch.Generator(device=device)
            generator.manual_seed(int(hashlib.sha256(key).hexdigest()[:15], 16))
        self._calls += 1

        was_training = module.training
        module.eval()
        t0 = time.perf_counter()
        try:
            with plain_linear():
                loop = _DecodeLoop(module, self.stop_token_ids, self.pad_token_id, self.compact_fraction,
                                   sampling, follow, generator, lockstep, lookup, lookup_kinds)
                loop.run(request)
        finally:
            module.train(was_training)
        wall = time.perf_counter() - t0
        n = request.prompt_ids.shape[0] * sampling.n_samples_per_prompt
        result = self._assemble(request, sampling, loop.out[:n], loop.gen[:n], ~loop.stopped[:n], loop.counters,
                                wall)
        return result, loop.followup_result()

    def _assemble(self, request, sampling, out, lengths, truncated, counters, wall) -> RolloutResult:
        K = sampling.n_samples_per_prompt
        device = out.device
        N, Tp = out.shape[0], request.prompt_ids.shape[1]
        Tr = max(int(lengths.max()), 1)
        response_ids = out[:, :Tr].contiguous()
        response_mask = (torch.arange(Tr, device=device)[None, :] < lengths[:, None]).long()
        prompt_ids = request.prompt_ids.repeat_interleave(K, dim=0)
        prompt_mask = request.prompt_attention_mask.long().repeat_interleave(K, dim=0)
        tokens = int(lengths.sum())
        stats = {
            "tokens": float(tokens),
            "decode_steps": float(counters["decode_steps"]),
            "row_steps": float(counters["row_steps"]),  # rows x forwards actually computed
            "compactions": float(counters["compactions"]),
            "draft_tokens": float(counters["draft_tokens"]),  # proposed by prompt lookup (0 without it)
            "draft_accepted": float(counters["draft_accepted"]),
            "wall_s": wall,
            "useful_tokens_per_s": tokens / wall if wall > 0 else 0.0,
            "mean_length": tokens / N,
            "truncated_frac": float(truncated.float().mean()),
            "sync_s": self.last_sync_s,
        }
        return RolloutResult(
            input_ids=torch.cat([prompt_ids, response_ids], dim=1),
            attention_mask=torch.cat([prompt_mask, response_mask], dim=1),
            response_start_idx=torch.full((N,), Tp, dtype=torch.long, device=device),
            response_ids=response_ids,
            response_mask=response_mask,
            response_lengths=lengths,
            truncated=truncated,
            prompt_index=torch.arange(request.prompt_ids.shape[0], device=device).repeat_interleave(K),
            stats=stats,
        )
