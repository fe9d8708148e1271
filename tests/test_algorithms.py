"""Tests for tapo_ds.algorithms: hand-computed values, registry behaviour, and the proof
that loss aggregation does not depend on micro-batching or data parallelism."""

import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tapo_ds.algorithms import (
    AdvantageParams,
    GlobalCounts,
    PolicyLossParams,
    combination_names,
    get_advantage_estimator,
    get_kl_estimator,
    get_policy_loss,
    local_counts,
    micro_batch_loss,
    register_advantage,
    token_coefficients,
    token_logprobs_and_entropy,
)
from tapo_ds.metrics import StepMetrics

EPS = 1e-6
MODES = ["seq-mean-token-mean", "token-mean"]
COMBINATIONS = ["pooled", "separate"]


def _adv(name, rewards, group_ids, constructed=None, **params):
    rewards = torch.tensor(rewards, dtype=torch.float32)
    if constructed is None:
        constructed = [False] * len(group_ids)
    return get_advantage_estimator(name)(
        rewards, group_ids, torch.tensor(constructed, dtype=torch.bool), AdvantageParams(**params)
    )


def _metrics(out):
    """An estimator's statistics on one rank, as the trainer logs them."""
    m = StepMetrics()
    out.add_to(m)
    return m.reduce()


def _close(actual, expected, atol=1e-5):
    torch.testing.assert_close(
        actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0
    )


# ---------------------------------------------------------------- advantages


def test_grpo_mixed_and_all_equal_groups():
    # a: [1,0,0,1] mean .5 std .5;  b: [1,1] constant;  c: [1,0,0] mean 1/3 std sqrt(2)/3
    out = _adv("grpo", [1, 0, 0, 1, 1, 1, 1, 0, 0], ["a"] * 4 + ["b"] * 2 + ["c"] * 3)
    sa, sc = 0.5 + EPS, math.sqrt(2) / 3 + EPS
    expected = [0.5 / sa, -0.5 / sa, -0.5 / sa, 0.5 / sa, 0.0, 0.0,
                (2 / 3) / sc, -(1 / 3) / sc, -(1 / 3) / sc]
    _close(out.advantages, expected)
    assert out.advantages[4].item() == 0.0 and out.advantages[5].item() == 0.0
    assert _metrics(out)["adv/zero_std_group_frac"] == pytest.approx(1 / 3)
    assert out.group_ids == ["a"] * 4 + ["b"] * 2 + ["c"] * 3


def test_grpo_constant_group_is_exactly_zero_despite_rounding():
    # mean(0.1, 0.1, 0.1) != 0.1 in floating point; /eps would amplify the ulp.
    out = _adv("grpo", [0.1, 0.1, 0.1], ["a"] * 3)
    assert out.advantages.tolist() == [0.0, 0.0, 0.0]


def test_grpo_singleton_group_gets_zero():
    out = _adv("grpo", [1.0], ["a"])
    assert out.advantages.tolist() == [0.0]


def test_tapo_decoupled_mixed_reflected_group():
    # Interleaved on purpose: the estimator must not rely on sample order.
    rewards = [1, 1, 0, 0, 0, 0, 1]
    ids = ["q"] * 7
    constructed = [False, True, False, True, False, False, True]
    out = _adv("tapo", rewards, ids, constructed)
    # originals [1,0,0,0]: mean .25 std sqrt(3)/4;  reflected [1,0,1]: mean 2/3 std sqrt(2)/3
    so, sr = math.sqrt(3) / 4 + EPS, math.sqrt(2) / 3 + EPS
    expected = [0.75 / so, (1 / 3) / sr, -0.25 / so, -(2 / 3) / sr,
                -0.25 / so, -0.25 / so, (1 / 3) / sr]
    _close(out.advantages, expected)
    assert out.group_ids == ["q", "q_reflected", "q", "q_reflected", "q", "q", "q_reflected"]
    assert _metrics(out)["tapo/reflected_groups"] == 1
    assert _metrics(out)["tapo/reflected_singletons"] == 0
    assert _metrics(out)["tapo/reflected_zero_std_groups"] == 0


def test_tapo_singleton_and_all_equal_reflected_groups():
    rewards = [1, 0, 1,   1, 0, 0,   1, 0, 0, 0]
    ids = ["s"] * 3 + ["z"] * 3 + ["u"] * 4
    constructed = [False, False, True,   False, True, True,   False, False, True, False]
    out = _adv("tapo", rewards, ids, constructed)
    adv = out.advantages.tolist()
    assert adv[2] == 1.0  # singleton reflected, r = 1 -> A = r
    assert adv[8] == 0.0  # singleton reflected, r = 0 -> A = r = 0
    assert adv[4] == 0.0 and adv[5] == 0.0  # reflected [0, 0]: constant -> 0
    s = 0.5 + EPS
    _close(out.advantages[[0, 1, 3]], [0.5 / s, -0.5 / s, 0.0])  # "z" originals: singleton [1]
    assert _metrics(out)["tapo/reflected_groups"] == 3
    assert _metrics(out)["tapo/reflected_singletons"] == 2
    assert _metrics(out)["tapo/reflected_zero_std_groups"] == 1


def test_tapo_equal_reward_groups_reward_gives_r_to_every_constant_reflected_group():
    rewards = [1, 0, 1, 1,   0, 1, 0, 0,   0, 0, 0, 1, 1]
    ids = ["a"] * 4 + ["b"] * 4 + ["c"] * 5
    constructed = [False, False, True, True,   False, True, False, True,   False, False, True, False, True]
    # a: originals [1, 0], reflected [1, 1];  b: originals [0, 0], reflected [1, 0];
    # c: originals [0, 0, 1], reflected [0, 1].
    zero = _adv("tapo", rewards, ids, constructed)
    reward = _adv("tapo", rewards, ids, constructed, equal_reward_groups="reward")
    # a_reflected [1, 1]: A = 0 under the paper's rule, A = r = 1 under "reward".
    assert zero.advantages[[2, 3]].tolist() == [0.0, 0.0]
    assert reward.advantages[[2, 3]].tolist() == [1.0, 1.0]
    # Mixed groups, and constant groups that are not reflected (b's originals), are unchanged.
    unchanged = [0, 1, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    assert torch.equal(zero.advantages[unchanged], reward.advantages[unchanged])
    assert reward.advantages[[4, 6]].tolist() == [0.0, 0.0]
    assert (zero.sums, zero.means) == (reward.sums, reward.means)


def test_tapo_equal_reward_groups_reward_on_all_wrong_and_singletons():
    # An all-wrong reflected group gets A = r = 0 under both rules; a singleton gets r under both.
    rewards = [1, 0, 0, 0, 1]
    ids = ["q", "q", "q", "q", "p"]
    constructed = [False, False, True, True, False]
    for rule in ("zero", "reward"):
        out = _adv("tapo", rewards, ids, constructed, equal_reward_groups=rule)
        assert out.advantages[[2, 3]].tolist() == [0.0, 0.0]
        single = _adv("tapo", [1, 0, 1], ["q"] * 3, [False, False, True], equal_reward_groups=rule)
        assert single.advantages[2].item() == 1.0
    with pytest.raises(ValueError, match="reward.*zero"):
        _adv("tapo", rewards, ids, constructed, equal_reward_groups="one")


def test_tapo_reflected_mixed_frac_counts_groups_of_two_or_more():
    # Reflected groups: m [1, 0] mixed, z [0, 0] and y [1, 1, 1] equal, s [1] a singleton (left out).
    rewards = [1, 0,   1, 0,   1, 0,   0, 0,   0, 1,   1, 1, 1,   1, 0,   1]
    ids = ["m"] * 4 + ["z"] * 4 + ["y"] * 5 + ["s"] * 3
    constructed = [False, False, True, True,   False, False, True, True,
                   False, False, True, True, True,   False, False, True]
    out = _adv("tapo", rewards, ids, constructed)
    assert _metrics(out)["tapo/reflected_groups"] == 4
    assert _metrics(out)["tapo/reflected_singletons"] == 1
    assert _metrics(out)["tapo/reflected_multi_groups"] == 3
    assert _metrics(out)["tapo/reflected_mixed_groups"] == 1
    assert _metrics(out)["tapo/reflected_zero_std_groups"] == 2
    assert _metrics(out)["tapo/reflected_mixed_frac"] == pytest.approx(1 / 3)
    # Only singletons (or nothing constructed): no denominator, reported as 0.
    lonely = _adv("tapo", [1, 0, 1], ["q"] * 3, [False, False, True])
    assert _metrics(lonely)["tapo/reflected_mixed_frac"] == 0.0


def _phase_samples(prefix, questions):
    """Samples of one rank: per question, (original rewards, reflected rewards)."""
    from tapo_ds.batch import Sample

    out = []
    for q, (originals, reflected) in enumerate(questions):
        gid = f"{prefix}q{q}"
        out += [Sample([1], [2], gid, float(r)) for r in originals]
        out += [Sample([1], [2], gid, float(r), constructed=True) for r in reflected]
    return out


def test_advantage_phase_reduces_reflected_mixed_frac_over_its_own_denominator():
    # The trainer's reduction over 2 simulated ranks: rank A holds one mixed reflected group
    # (2 groups in all), rank B three all-wrong reflected groups and a question without
    # constructions (7 groups). Right: 1 mixed / 4 reflected groups of size >= 2 = 0.25;
    # weighting the per-rank fractions by group count would give 2/9.
    from tapo_ds.trainer import RLTrainer

    fake = SimpleNamespace(estimator=get_advantage_estimator("tapo"),
                           s=SimpleNamespace(advantage_params=AdvantageParams()))
    rank_a = _phase_samples("a", [([1, 0, 0, 0], [1, 0])])
    rank_b = _phase_samples("b", [([1, 0, 0, 0], [0, 0])] * 3 + [([1, 0, 0, 0], [])])
    sent = []
    RLTrainer.advantage_phase(fake, rank_b).reduce(lambda t, op="sum": sent.append(t.clone()) or t)
    reduced = RLTrainer.advantage_phase(fake, rank_a).reduce(lambda t, op="sum": t.add_(sent.pop(0)))
    assert reduced["tapo/reflected_mixed_frac"] == pytest.approx(0.25)
    assert reduced["tapo/reflected_multi_groups"] == 4

    single = RLTrainer.advantage_phase(fake, rank_a + rank_b).reduce()
    assert reduced == pytest.approx(single)


def test_tapo_not_decoupled_joins_original_group():
    rewards = [1, 0, 0, 0, 1, 0, 1]
    constructed = [False] * 4 + [True] * 3
    out = _adv("tapo", rewards, ["q"] * 7, constructed, decoupled=False)
    # one group of 7 with 3 ones: mean 3/7, std sqrt(12)/7
    s = math.sqrt(12) / 7 + EPS
    pos, neg = (4 / 7) / s, -(3 / 7) / s
    _close(out.advantages, [pos, neg, neg, neg, pos, neg, pos])
    assert out.group_ids == ["q"] * 7
    assert _metrics(out)["tapo/reflected_groups"] == 0


def test_tapo_equals_grpo_without_constructed_samples():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 2, (40,), generator=g).float()
    ids = [f"q{i % 7}" for i in range(40)] + ["lonely"]
    rewards = torch.cat([rewards, torch.tensor([1.0])])
    none = torch.zeros(41, dtype=torch.bool)
    params = AdvantageParams()
    grpo = get_advantage_estimator("grpo")(rewards, ids, none, params)
    tapo = get_advantage_estimator("tapo")(rewards, ids, none, params)
    assert torch.equal(grpo.advantages, tapo.advantages)
    assert grpo.group_ids == tapo.group_ids
    assert grpo.means["adv/zero_std_group_frac"] == tapo.means["adv/zero_std_group_frac"]


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="grpo.*tapo"):
        get_advantage_estimator("ppo")
    with pytest.raises(ValueError, match="ppo_clip"):
        get_policy_loss("dpo")
    with pytest.raises(ValueError, match="k1.*k3"):
        get_kl_estimator("k9")
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        token_coefficients(torch.ones(1, 1), torch.zeros(1, dtype=torch.long),
                           torch.ones(2), GlobalCounts.zeros(), mode="sum")


def test_duplicate_registration_is_rejected():
    with pytest.raises(ValueError, match="already registered"):
        register_advantage("grpo")(lambda *a: None)


def test_mismatched_advantage_inputs_are_rejected():
    with pytest.raises(ValueError):
        _adv("grpo", [1.0, 0.0], ["a"])


# ---------------------------------------------------------------- policy loss

# Two samples, T = 3. Sample 0: A = +1, weights 1, log ratios [0, ln 1.5, ln 0.9].
# Sample 1: A = -1, weights [2, .5, 7], log ratios [ln .5, ln 1.1, junk], last token padding.
LOG_RATIO = [[0.0, math.log(1.5), math.log(0.9)], [math.log(0.5), math.log(1.1), 100.0]]
MASK = [[1, 1, 1], [1, 1, 0]]
WEIGHTS = [[1.0, 1.0, 1.0], [2.0, 0.5, 7.0]]
# -min(rho A, clip(rho) A) * w:  sample 0: -1, -1.2 (clipped), -0.9
#                                sample 1: 0.8 * 2 (clipped), 1.1 * 0.5, padding 0
EXPECTED_TOKEN_LOSS = [[-1.0, -1.2, -0.9], [1.6, 0.55, 0.0]]


def _two_sample_loss():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -1.3, -2.0]], dtype=torch.float64)
    logp = (old + torch.tensor(LOG_RATIO, dtype=torch.float64)).requires_grad_()
    out = get_policy_loss("ppo_clip")(
        logp, old, torch.tensor([1.0, -1.0], dtype=torch.float64),
        torch.tensor(MASK), torch.tensor(WEIGHTS, dtype=torch.float64), PolicyLossParams(),
    )
    return logp, out


def test_ppo_clip_hand_computed():
    logp, out = _two_sample_loss()
    _close(out.per_token_loss, EXPECTED_TOKEN_LOSS, atol=1e-12)
    assert out.metrics["actor/clip_frac"] == pytest.approx(2 / 5)
    kl = -(math.log(1.5) + math.log(0.9) + math.log(0.5) + math.log(1.1)) / 5
    assert out.metrics["actor/ppo_kl"] == pytest.approx(kl)
    out.per_token_loss.sum().backward()
    # Clipped tokens and padding get no gradient, and the padding's junk log ratio
    # produces no NaN. d/dlogp of -w A rho = -w A rho elsewhere.
    expected_grad = [[-1.0, 0.0, -0.9], [0.0, 1.1 * 0.5, 0.0]]
    _close(logp.grad, expected_grad, atol=1e-12)


def test_ppo_clip_without_token_weights_and_clip_higher():
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.25, 1.35]]))
    out = get_policy_loss("ppo_clip")(
        logp, old, torch.tensor([1.0]), torch.ones(1, 2), None,
        PolicyLossParams(clip_low=0.2, clip_high=0.28),
    )
    _close(out.per_token_loss, [[-1.25, -1.28]])


def test_ppo_clip_rejects_token_weights_with_grad():
    w = torch.ones(1, 2, requires_grad=True)
    with pytest.raises(ValueError, match="token_weights"):
        get_policy_loss("ppo_clip")(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1),
                                    torch.ones(1, 2), w, PolicyLossParams())


# ---------------------------------------------------------------- aggregation


@pytest.mark.parametrize("mode", MODES)
def test_two_sample_loss_original_plus_half_constructed(mode):
    # Sample 0 original (3 tokens), sample 1 constructed (2 tokens), lambda = 0.5. With one
    # sequence per part both modes give mean(orig tokens) + 0.5 * mean(constructed tokens).
    _, out = _two_sample_loss()
    mask = torch.tensor(MASK)
    part = torch.tensor([0, 1])
    coef = token_coefficients(mask, part, torch.tensor([1.0, 0.5], dtype=torch.float64),
                              local_counts(mask, part), mode, combination="separate")
    expected = (-1.0 - 1.2 - 0.9) / 3 + 0.5 * (1.6 + 0.55) / 2  # = -0.4958333...
    assert micro_batch_loss(out.per_token_loss, coef).item() == pytest.approx(expected, abs=1e-12)


def test_modes_differ_with_unequal_lengths():
    # Two originals of lengths 1 and 3 (token losses [3] and [1, 1, 1]), one constructed [2, 4].
    loss = torch.tensor([[3.0, 0, 0], [1, 1, 1], [2, 4, 0]], dtype=torch.float64)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 0]])
    part = torch.tensor([0, 0, 1])
    scale = torch.tensor([1.0, 0.5], dtype=torch.float64)
    counts = local_counts(mask, part)
    assert counts.seqs.tolist() == [2, 1] and counts.tokens.tolist() == [4, 2]
    seq_mean = micro_batch_loss(loss, token_coefficients(mask, part, scale, counts,
                                                         "seq-mean-token-mean", "separate"))
    token_mean = micro_batch_loss(loss, token_coefficients(mask, part, scale, counts,
                                                           "token-mean", "separate"))
    assert seq_mean.item() == pytest.approx((3 + 1) / 2 + 0.5 * 3)  # 3.5
    assert token_mean.item() == pytest.approx(6 / 4 + 0.5 * 6 / 2)  # 3.0


def test_pooled_is_one_aggregation_over_all_sequences():
    # The data of test_modes_differ_with_unequal_lengths: originals [3] and [1, 1, 1], constructed
    # [2, 4] with lambda = 0.5. Pooled: one mean over the 3 sequences (6 tokens); lambda scales
    # the constructed sequence's per-token loss inside it.
    loss = torch.tensor([[3.0, 0, 0], [1, 1, 1], [2, 4, 0]], dtype=torch.float64)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 0]])
    part = torch.tensor([0, 0, 1])
    scale = torch.tensor([1.0, 0.5], dtype=torch.float64)
    counts = local_counts(mask, part)
    seq_mean = micro_batch_loss(loss, token_coefficients(mask, part, scale, counts,
                                                         "seq-mean-token-mean", "pooled"))
    token_mean = micro_batch_loss(loss, token_coefficients(mask, part, scale, counts,
                                                           "token-mean", "pooled"))
    assert seq_mean.item() == pytest.approx((3 + 1 + 0.5 * 3) / 3)  # 1.8333...
    assert token_mean.item() == pytest.approx((6 + 0.5 * 6) / 6)  # 1.5
    # Pooled is the default, as in the config.
    assert torch.equal(token_coefficients(mask, part, scale, counts, "token-mean"),
                       token_coefficients(mask, part, scale, counts, "token-mean", "pooled"))


def _random_step(seed, B=10, T=6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g)  # some empty sequences
    mask = (torch.arange(T) < lengths[:, None]).long()
    part = torch.randint(0, 2, (B,), generator=g)
    return mask, part


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pooled_with_lambda_one_is_plain_aggregation_over_the_union(mode, seed):
    mask, part = _random_step(seed)
    pooled = token_coefficients(mask, part, torch.tensor([1.0, 1.0], dtype=torch.float64),
                                local_counts(mask, part), mode, "pooled")
    # Plain GRPO aggregation: every sequence an original, one part.
    union = torch.zeros_like(part)
    plain = token_coefficients(mask, union, torch.tensor([1.0, 0.0], dtype=torch.float64),
                               local_counts(mask, union), mode, "separate")
    assert torch.equal(pooled, plain)
    # The two readings really differ on this data (unless one part is empty).
    separate = token_coefficients(mask, part, torch.tensor([1.0, 1.0], dtype=torch.float64),
                                  local_counts(mask, part), mode, "separate")
    assert not torch.allclose(separate, pooled)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_separate_reproduces_the_per_part_formula(mode, seed):
    # The coefficients of the loss before the combination became a choice, written out.
    mask, part = _random_step(seed)
    scale = torch.tensor([1.0, 0.37], dtype=torch.float64)
    counts = local_counts(mask, part)
    m = mask.double()
    if mode == "seq-mean-token-mean":
        denominator = counts.seqs.double()[part] * m.sum(-1)
    else:
        denominator = counts.tokens.double()[part]
    expected = torch.where(denominator > 0, scale[part] / denominator.clamp(min=1), 0.0)[:, None] * m
    coef = token_coefficients(mask, part, scale, counts, mode, "separate")
    torch.testing.assert_close(coef, expected, rtol=1e-15, atol=0)


def test_unknown_combination_lists_the_known_ones():
    assert combination_names() == ["pooled", "separate"]
    with pytest.raises(ValueError, match="pooled.*separate"):
        token_coefficients(torch.ones(1, 1), torch.zeros(1, dtype=torch.long),
                           torch.ones(2), GlobalCounts.zeros(), combination="mean")


@pytest.mark.parametrize("mode", MODES)
def test_missing_part_and_empty_sequence_contribute_nothing(mode):
    mask = torch.tensor([[1, 1], [0, 0]])
    part = torch.tensor([0, 0])
    counts = local_counts(mask, part)
    assert counts.seqs.tolist() == [1, 0]  # the empty sequence is not counted
    coef = token_coefficients(mask, part, torch.tensor([1.0, 0.5]), counts, mode)
    assert torch.isfinite(coef).all()
    _close(coef, [[0.5, 0.5], [0.0, 0.0]])


def test_global_counts_sum_and_roundtrip():
    a = GlobalCounts(torch.tensor([1, 2]), torch.tensor([3, 4]))
    b = GlobalCounts(torch.tensor([10, 20]), torch.tensor([30, 40]))
    total = sum([a, b])
    assert total.seqs.tolist() == [11, 22] and total.tokens.tolist() == [33, 44]
    back = GlobalCounts.from_tensor(total.as_tensor())
    assert back.seqs.tolist() == [11, 22] and back.tokens.tolist() == [33, 44]


def _invariance_setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T, D, V = 12, 7, 5, 11
    torch.manual_seed(seed)
    model = nn.Linear(D, V).double()
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T) < lengths[:, None]).long()
    part = torch.tensor([0] * 8 + [1] * 4)[torch.randperm(B, generator=g)]
    advantages = torch.randn(B, generator=g, dtype=torch.float64)
    with torch.no_grad():
        logp, _ = token_logprobs_and_entropy(model(x), labels)
        # Spread the ratios so that some tokens are clipped.
        old_logp = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    weights = torch.where(part[:, None] == 1,
                          0.01 + 10 * torch.rand(B, T, generator=g, dtype=torch.float64),
                          torch.ones(B, T, dtype=torch.float64))
    part_scale = torch.tensor([1.0, 0.5], dtype=torch.float64)

    def loss(idx, counts, mode, combination):
        lp, _ = token_logprobs_and_entropy(model(x[idx]), labels[idx], chunk_size=4)
        out = get_policy_loss("ppo_clip")(lp, old_logp[idx], advantages[idx], mask[idx],
                                          weights[idx], PolicyLossParams())
        coef = token_coefficients(mask[idx], part[idx], part_scale, counts, mode, combination)
        return micro_batch_loss(out.per_token_loss, coef)

    def grad(value):
        grads = torch.autograd.grad(value, list(model.parameters()))
        return torch.cat([gr.reshape(-1) for gr in grads])

    return B, mask, part, loss, grad


def _split(indices, sizes):
    out, start = [], 0
    for s in sizes:
        out.append(indices[start:start + s])
        start += s
    assert start == len(indices)
    return out


@pytest.mark.parametrize("combination", COMBINATIONS)
@pytest.mark.parametrize("mode", MODES)
def test_aggregation_invariant_to_micro_batches_and_ranks(mode, combination):
    B, mask, part, loss, grad = _invariance_setup()
    everything = torch.arange(B)
    full_counts = local_counts(mask, part)
    full_loss = loss(everything, full_counts, mode, combination)
    full_grad = grad(full_loss)

    # 2 simulated data-parallel ranks, 3 uneven micro-batches each (gradient accumulation).
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(1))
    ranks = [_split(perm[:6], [1, 2, 3]), _split(perm[6:], [3, 2, 1])]
    world_size, gas = len(ranks), 3
    counts = sum(local_counts(mask[mb], part[mb]) for rank in ranks for mb in rank)
    assert torch.equal(counts.as_tensor(), full_counts.as_tensor())

    scale = gas * world_size  # what undoes DeepSpeed's default backward (divide by GAS, average ranks)
    rank_grads, total_loss = [], 0.0
    for rank in ranks:
        # engine.backward divides by GAS; gradients accumulate over micro-batches.
        rank_grads.append(sum(grad(loss(mb, counts, mode, combination) * scale / gas) for mb in rank))
        total_loss += sum(loss(mb, counts, mode, combination).item() for mb in rank)
    # DeepSpeed averages gradients over data-parallel ranks.
    dp_grad = sum(rank_grads) / world_size
    torch.testing.assert_close(dp_grad, full_grad, rtol=1e-12, atol=1e-12)
    assert total_loss == pytest.approx(full_loss.item(), abs=1e-12)

    # The trainer's own protocol: backward(loss * world_size, scale_wrt_gas=False), ranks
    # averaged, with uneven micro-batch counts per rank (no GAS to agree on).
    uneven = [_split(perm[:6], [2, 4]), _split(perm[6:], [1, 1, 1, 1, 2])]
    trainer_grad = sum(sum(grad(loss(mb, counts, mode, combination) * world_size) for mb in rank)
                       for rank in uneven) / world_size
    torch.testing.assert_close(trainer_grad, full_grad, rtol=1e-12, atol=1e-12)

    # One rank, micro-batch size 1: same gradient again.
    single = sum(grad(loss(everything[i:i + 1], counts, mode, combination)) for i in range(B))
    torch.testing.assert_close(single, full_grad, rtol=1e-12, atol=1e-12)

    # The check is not vacuous: normalising by each micro-batch's own counts breaks it.
    naive = sum(
        grad(loss(mb, local_counts(mask[mb], part[mb]), mode, combination) * scale / gas)
        for rank in ranks for mb in rank
    ) / world_size
    assert not torch.allclose(naive, full_grad, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- KL


def test_kl_estimators():
    logp = torch.tensor([0.0, -1.0, -30.0], dtype=torch.float64)
    ref = torch.tensor([math.log(2.0), -1.0, 0.0], dtype=torch.float64)
    _close(get_kl_estimator("k1")(logp, ref), [-math.log(2.0), 0.0, -30.0], atol=1e-12)
    # k3 = e^(ref-logp) - (ref-logp) - 1, clamped to [-10, 10]
    _close(get_kl_estimator("k3")(logp, ref), [2.0 - math.log(2.0) - 1.0, 0.0, 10.0], atol=1e-12)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(100, generator=g), torch.randn(100, generator=g)
    assert (get_kl_estimator("k3")(a, b) >= 0).all()
    assert torch.isfinite(get_kl_estimator("k3")(torch.full((1,), -1e4), torch.zeros(1))).all()


# ---------------------------------------------------------------- log-probs and entropy


def _naive(logits, labels):
    logp_all = torch.log_softmax(logits.double(), dim=-1)
    logp = logp_all.gather(-1, labels[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


@pytest.mark.parametrize("chunk_size", [1, 5, 4096])
@pytest.mark.parametrize("contiguous", [True, False])
def test_logprobs_and_entropy_match_naive_with_gradients(chunk_size, contiguous):
    g = torch.Generator().manual_seed(chunk_size)
    B, T, V = 3, 7, 13
    base = (3 * torch.randn(B, T + 2, V, generator=g, dtype=torch.float64)).requires_grad_()
    logits = base if contiguous else base[:, 1:-1]  # a [:, p:-1]-style slice cannot be viewed
    labels = torch.randint(0, V, (B, logits.shape[1]), generator=g)
    g_logp = torch.randn(B, logits.shape[1], generator=g, dtype=torch.float64)
    g_ent = torch.randn(B, logits.shape[1], generator=g, dtype=torch.float64)

    logp, entropy = token_logprobs_and_entropy(logits, labels, True, chunk_size=chunk_size)
    ref_logp, ref_entropy = _naive(logits, labels)
    assert logp.dtype == torch.float64
    torch.testing.assert_close(logp, ref_logp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-12, atol=1e-12)

    grad, = torch.autograd.grad((logp * g_logp).sum() + (entropy * g_ent).sum(), base)
    ref_grad, = torch.autograd.grad((ref_logp * g_logp).sum() + (ref_entropy * g_ent).sum(), base,
                                    retain_graph=True)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)

    # Gradient through log-probs alone (the training forward).
    logp, none = token_logprobs_and_entropy(logits, labels, False, chunk_size=chunk_size)
    assert none is None
    grad, = torch.autograd.grad((logp * g_logp).sum(), base)
    ref_grad, = torch.autograd.grad((ref_logp * g_logp).sum(), base)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_logprobs_gradcheck():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (2, 3), generator=g)
    assert torch.autograd.gradcheck(
        lambda z: token_logprobs_and_entropy(z, labels, True, chunk_size=4), (logits,)
    )


def test_logprobs_bf16_under_no_grad():
    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(2, 6, 50, generator=g)).to(torch.bfloat16)
    labels = torch.randint(0, 50, (2, 6), generator=g)
    with torch.no_grad():
        logp, entropy = token_logprobs_and_entropy(logits, labels, True, chunk_size=5)
    assert logp.dtype == torch.float32 and not logp.requires_grad
    ref_logp, ref_entropy = _naive(logits, labels)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=1e-5, atol=1e-5)


def test_algorithms_do_not_import_deepspeed_or_other_tapo_modules():
    code = (
        "import sys, tapo_ds.algorithms\n"
        "bad = [m for m in sys.modules if m == 'deepspeed' or m.startswith('deepspeed.')\n"
        "       or (m.startswith('tapo_ds.') and not m.startswith('tapo_ds.algorithms'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
