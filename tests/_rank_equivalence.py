"""One optimizer step of the real update path on a fixed set of samples, sharded unevenly over the
ranks; rank 0 saves the full (gathered) weights and the step's metrics.

Run by tests/test_rank_equivalence.py, once as ``python tests/_rank_equivalence.py --out F`` (1 rank)
and once through ``deepspeed --num_gpus 2`` (ZeRO-3, gloo). Not collected by pytest (no ``test_``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tapo_ds import engine as eng
from tapo_ds.algorithms import PolicyLossParams
from tapo_ds.batch import Sample
from tapo_ds.modeling import build_tiny_model_and_tokenizer
from tapo_ds.update import LossSettings, optimizer_step, update_metrics

REPO = Path(__file__).resolve().parent.parent
N_SAMPLES = 7
MICRO_BATCH = 2
# Rank r of 2 trains on samples [CUTS[r], CUTS[r+1]): 5 and 2 samples, so 3 and 1 real micro-batches.
CUTS = (0, 5, N_SAMPLES)
# AdamW's first step moves a weight by lr * g / (|g| + eps): with eps = 1 that is ~g for small
# gradients, so a wrongly scaled gradient shows in the weights (with the default eps, ~lr * sign(g),
# it would not).
LR, EPS = 1.0, 1.0


def make_samples(vocab: int, seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(N_SAMPLES):
        prompt = torch.randint(3, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        response = torch.randint(3, vocab, (int(torch.randint(2, 13, (1,), generator=g)),), generator=g).tolist()
        out.append(Sample(prompt, response, group_id=f"q{i // 3}", reward=float(i % 2), constructed=i % 4 == 3,
                          advantage=float(torch.randn(1, generator=g))))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=None)
    args = p.parse_args()

    eng.init_distributed()
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    model, tokenizer = build_tiny_model_and_tokenizer(seed=0)
    ds_config = eng.load_ds_config(REPO / "ds_configs" / "zero3_cpu.json", micro_batch_size=MICRO_BATCH,
                                   world_size=world, grad_clip=0.0, hybrid_engine=False, dtype="float32")
    engine, info = eng.build_engine(model, ds_config, lr=LR, betas=(0.9, 0.999), eps=EPS, weight_decay=0.0,
                                    lr_fn=lambda step: 1.0, model_type=model.config.model_type)
    samples = make_samples(model.config.vocab_size)
    mine = range(len(samples)) if world == 1 else range(CUTS[rank], CUTS[rank + 1])
    settings = LossSettings(policy_loss="ppo_clip", clip=PolicyLossParams(0.2, 0.2), agg_mode="seq-mean-token-mean",
                            part_scale=(1.0, 0.5))
    update = optimizer_step(engine, samples, list(mine), settings, micro_batch_size=MICRO_BATCH,
                            pad_id=tokenizer.pad_token_id, world_size=world)
    metrics = update_metrics([update]).reduce(eng.all_reduce_, engine.device)
    state = eng.gathered_state_dict(engine)
    if rank == 0:
        torch.save({k: v.detach().float().cpu() for k, v in state.items()}, args.out)
        Path(args.out + ".json").write_text(json.dumps({"world": world, **metrics}))


if __name__ == "__main__":
    main()
