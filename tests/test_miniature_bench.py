"""bench/miniature.py without model runs: its statistics, the protocol lock, and the report it
regenerates from run folders (here written by hand)."""

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("miniature_bench", REPO / "bench" / "miniature.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("df, expected", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)])
def test_t_quantile_matches_the_table(bench, df, expected):
    assert bench.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)


def test_mean_ci(bench):
    s = bench.mean_ci([0.80, 0.85, 0.90])
    half = 4.3027 * statistics.stdev([0.80, 0.85, 0.90]) / 3 ** 0.5
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.85)
    assert s["half"] == pytest.approx(half, rel=1e-4)
    assert (s["low"], s["high"]) == pytest.approx((0.85 - half, 0.85 + half), rel=1e-4)
    one = bench.mean_ci([0.7])
    assert one["mean"] == 0.7 and one["half"] is None and one["low"] is None
    with pytest.raises(ValueError):
        bench.mean_ci([])


def test_paired_difference_uses_shared_seeds(bench):
    tapo = {1: 0.60, 2: 0.62, 3: 0.58, 4: 0.65, 5: 0.61}
    grpo = {1: 0.55, 2: 0.58, 3: 0.57, 4: 0.60, 5: 0.56, 6: 0.99}  # seed 6 has no partner
    d = bench.paired(tapo, grpo)
    diffs = [0.05, 0.04, 0.01, 0.05, 0.05]
    assert d["seeds"] == [1, 2, 3, 4, 5] and d["diffs"] == pytest.approx(diffs)
    assert d["mean"] == pytest.approx(0.04)
    half = 2.7764 * statistics.stdev(diffs) / 5 ** 0.5
    assert d["low"] == pytest.approx(0.04 - half, rel=1e-3) and d["low"] > 0
    assert bench.paired({1: 0.5}, {2: 0.5}) is None


# ----------------------------------------------------------------------------- the protocol lock


def test_lock_writes_then_refuses_a_silent_change(bench, tmp_path):
    path = tmp_path / "protocol.json"
    first = {"steps": 60, "arms": {"grpo": {"seeds": [1, 2, 3]}}}
    record = bench.lock_protocol(path, first, None, "t0")
    assert record == {"written": "t0", "protocol": first, "changes": []}
    assert bench.lock_protocol(path, first, None, "t1")["written"] == "t0"  # same arguments: nothing changes
    changed = {"steps": 80, "arms": {"grpo": {"seeds": [1, 2, 3]}}}
    with pytest.raises(SystemExit, match=r"differ from the protocol written in .*steps: 60 -> 80.*--amend"):
        bench.lock_protocol(path, changed, None, "t2")
    assert json.loads(path.read_text())["protocol"] == first  # the refusal wrote nothing
    record = bench.lock_protocol(path, changed, "more steps", "t3")
    assert record["protocol"] == changed and record["written"] == "t0"
    assert record["changes"] == [{"at": "t3", "reason": "more steps", "changed": {"steps": [60, 80]}}]
    assert json.loads(path.read_text()) == record
    with pytest.raises(SystemExit, match="nothing to amend"):
        bench.lock_protocol(path, changed, "again", "t4")


def test_amend_needs_a_protocol(bench, tmp_path):
    with pytest.raises(SystemExit, match="no protocol to amend"):
        bench.lock_protocol(tmp_path / "p.json", {"steps": 1}, "why", "t0")


def test_script_refuses_changed_arguments(bench, tmp_path, capsys):
    def args(seeds, *extra):
        return ["--plan", "--results", str(tmp_path / "results"), "--out", str(tmp_path / "runs"),
                "--arms", "grpo", "tapo", "--seeds", str(seeds), "--steps", "4", "--eval-every", "2", *extra]

    bench.main(args(2))
    record = json.loads((tmp_path / "results" / bench.PROTOCOL_FILE).read_text())
    assert list(record["protocol"]["arms"]) == ["grpo", "tapo"]
    assert record["protocol"]["arms"]["tapo"]["seeds"] == [1, 2]
    assert "tapo.loss_combination=pooled" in record["protocol"]["arms"]["tapo"]["sets"]
    assert record["protocol"]["run_config"]["model"]["path"] == "checkpoints/miniature-coldstart"
    assert "finished 0/2" in capsys.readouterr().out
    md = (tmp_path / "results" / "miniature.md").read_text()  # the protocol is in the results before any run
    assert "## Protocol (written" in md and "| tapo | paper | 1, 2 |" in md and "0 of 4 runs finished" in md
    bench.main(args(2))  # the same arguments again: accepted
    with pytest.raises(SystemExit, match=r"arms\.grpo\.seeds: \[1, 2\] -> \[1, 2, 3\]"):
        bench.main(args(3))
    bench.main(args(3, "--amend", "a third seed"))
    record = json.loads((tmp_path / "results" / bench.PROTOCOL_FILE).read_text())
    assert record["changes"][0]["reason"] == "a third seed"
    assert "a third seed (`arms.grpo.seeds`: [1, 2] -> [1, 2, 3]" in (tmp_path / "results" / "miniature.md").read_text()
    assert record["changes"][0]["changed"]["arms.grpo.seeds"] == [[1, 2], [1, 2, 3]]


# ----------------------------------------------------------------------------- the report


def fake_run(out, name, seed_value, steps, extra=lambda step: {}):
    """A run folder as tapo_ds/main.py leaves it (metrics.jsonl) plus the script's completion marker."""
    (out / name).mkdir(parents=True)
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "rollout/response_len_mean": 40.0 + step, "actor/entropy": 1.0 / step, **extra(step)}
        if step % 2 == 0:
            row.update({"eval/test/pass@1": seed_value * step / steps, "eval/test/pass@5": min(1.0, 1.5 * seed_value)})
        rows.append(row)
    (out / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / f"{name}.run.json").write_text(json.dumps({"args": [], "wall_s": 100.0}))


def test_report_from_finished_runs(bench, tmp_path):
    results, out = tmp_path / "results", tmp_path / "runs"
    results.mkdir()
    a = bench.parse_args(["--arms", "grpo", "tapo", "no_ots", "oracle_p60", "grpo_more_samples", "--steps", "4",
                          "--eval-every", "2", "--out", str(out), "--results", str(results)],
                         bench.load_config(bench.CONFIG))
    record = bench.lock_protocol(results / bench.PROTOCOL_FILE, bench.build_protocol(a, bench.load_config(bench.CONFIG)),
                                 None, "t0")
    tapo_metrics = {"tapo/parse_success": 1.0, "tapo/construction_acc": 0.5, "tapo/prefix_fidelity": 0.95,
                    "tapo/reflected_mixed_frac": 0.6, "tapo/ots_weight_mean": 1.1, "tapo/generated_tokens": 400.0}
    for s in range(1, 6):
        fake_run(out, f"grpo-s{s}", 0.50 + 0.01 * s, 4)
        fake_run(out, f"tapo-s{s}", 0.55 + 0.01 * s + 0.002 * (s % 2), 4, lambda step: tapo_metrics)
    for s in range(1, 4):
        fake_run(out, f"no_ots-s{s}", 0.52 + 0.01 * s, 4, lambda step: tapo_metrics)
    (out / "step0").mkdir()
    (out / "step0" / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/test/pass@1": 0.42}) + "\n")
    cfg = bench.load_config(bench.CONFIG)
    derived = bench.derive_more_samples_k(out, record["protocol"], cfg)
    B, K = cfg.rollout.questions_per_step, cfg.rollout.samples_per_question
    t_tapo = B * K * 42.5 + 400.0  # response_len_mean 41..44 over the steps, plus the construction outputs
    assert derived["T_tapo"] == pytest.approx(t_tapo) and derived["L_grpo"] == pytest.approx(42.5)
    assert derived["K"] == max(K, round(t_tapo / (B * 42.5)))

    stats = bench.write_report(results, record, bench.collect(out, record["protocol"]), derived, "bench/miniature.py")
    d = stats["pairs"]["tapo - grpo"]
    assert d["seeds"] == [1, 2, 3, 4, 5] and d["mean"] == pytest.approx(0.05 + 0.002 * 3 / 5) and d["low"] > 0
    assert stats["pairs"]["no_ots - tapo"]["mean"] < 0
    assert stats["arms"]["grpo"]["pass@1"]["n"] == 5 and "oracle_p60" not in stats["arms"]
    assert stats["constructions"]["tapo"]["tapo/construction_acc"] == pytest.approx(0.5)
    assert "grpo" not in stats["constructions"]
    md = (results / "miniature.md").read_text()
    assert "## Protocol (written t0, before the first run)" in md
    assert "## Changes of protocol after the first run\n\nNone." in md
    assert "13 of 19 runs finished" in md and "42.0%" in md
    assert "| headline: TAPO - GRPO paired pass@1 difference > 0 with its 95% interval above 0 | met:" in md
    assert "incomplete (1 of 4 measured, 1 below TAPO): no_ots -3.1" in md  # only one ablation ran
    assert "| tapo | 1.00 | 0.50 | 0.95 | 0.60 | 400 |" in md
    assert "| regime: step-0 held-out pass@1 in [0.30, 0.55] | met: 42.0% |" in md
    assert f"K' = {derived['K']}" in md
    for png in ("miniature_pass_at_1.png", "miniature_dynamics.png"):
        assert (results / png).stat().st_size > 10_000
    saved = json.loads((results / "miniature.json").read_text())
    assert saved["step0"] == 0.42 and set(saved["runs"]) >= {"tapo-s1", "grpo-s5", "no_ots-s3"}


def test_a_finished_run_counts_until_what_it_depends_on_changes(bench, tmp_path):
    cfg = bench.load_config(bench.CONFIG)
    argv = ["--arms", "grpo", "tapo", "--steps", "4", "--eval-every", "2", "--out", str(tmp_path)]
    a = bench.parse_args(argv, cfg)
    protocol = bench.build_protocol(a, cfg)
    runner = bench.Runner(a, protocol, cfg)
    assert not runner.current("tapo", 1)
    fake_run(tmp_path, "tapo-s1", 0.5, 4)
    assert not runner.current("tapo", 1)  # a marker without the fingerprint of these arguments
    args = runner.run_args("tapo", 1)
    (tmp_path / "tapo-s1.run.json").write_text(json.dumps({"args": args, "fingerprint": runner.fingerprint(args),
                                                            "wall_s": 1.0}))
    assert runner.current("tapo", 1) and not runner.current("tapo", 2)
    side_by_side = bench.Runner(bench.parse_args(argv + ["--jobs", "2"], cfg), protocol, cfg)
    assert side_by_side.current("tapo", 1)  # one torch thread per run changes how it runs, not the protocol
    new_checkpoint = {**protocol, "initial_checkpoint": {"path": "x", "sha256": "0" * 64}}
    assert not bench.Runner(a, new_checkpoint, cfg).current("tapo", 1)
    assert not bench.Runner(a, {**protocol, "steps": 6}, cfg).current("tapo", 1)
    assert bench.Runner(a, protocol, cfg).more_samples_k() is None  # K' waits for every tapo and grpo seed
