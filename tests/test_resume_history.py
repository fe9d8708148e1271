"""A run killed with SIGKILL (mid-step, then mid-checkpoint-write) and resumed twice logs every step once,
with the same values as an uninterrupted run; the interrupted checkpoint is never resumed from."""

import signal
from pathlib import Path

import pytest
from _launch import Run, command, finished, logged_step, metrics, tensorboard_steps, wait_for

from tapo_ds import checkpoint
from tapo_ds.checkpoint import SLOW_SAVE_ENV
from tapo_ds.monitor import Monitor

TOTAL = 6
EXACT = ("rollout/reward_mean", "rollout/acc", "rollout/response_len_mean", "rollout/response_len_max")
CLOSE = ("actor/pg_loss", "actor/entropy", "actor/grad_norm")


def killed(run: Run, when, what: str) -> None:
    try:
        wait_for(when, 240, what)
        run.proc.send_signal(signal.SIGKILL)
        run.wait(30)
    finally:
        run.kill_all()


def test_sigkill_and_resume_leave_one_history(tmp_path):
    ref = tmp_path / "ref"
    finished(command(tmp_path, "ref", [f"total_steps={TOTAL}"]), tmp_path, "ref")

    run_dir, ckpts = tmp_path / "cut", tmp_path / "cut" / "checkpoints"
    # 1. killed during step 4's rollout; the last checkpoint is step 2, metrics.jsonl already has step 3
    first = Run(command(tmp_path, "cut", [f"total_steps={TOTAL}"]), tmp_path, "cut-1")
    killed(first, logged_step(run_dir, 3), "step 3")
    assert [r["step"] for r in metrics(run_dir)][:3] == [1, 2, 3]

    # 2. resumed from step 2 (step 3 is run again), killed while writing step 4's checkpoint
    second = Run(command(tmp_path, "cut", [f"total_steps={TOTAL}"], ["--resume", "auto"]), tmp_path, "cut-2",
                 **{SLOW_SAVE_ENV: "60"})
    killed(second, lambda: (ckpts / "step_00000004").is_dir(), "the step-4 checkpoint write")
    assert "resumed from" in second.output and "at step 2" in second.output
    assert not (ckpts / "step_00000004" / "complete").exists()
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]  # step 3 once: the killed run's row went

    # 3. the half-written step 4 is passed over: resumed from step 2 again, to the end
    third = finished(command(tmp_path, "cut", [f"total_steps={TOTAL}"], ["--resume", "auto"]), tmp_path, "cut-3")
    assert f"resumed from {ckpts / 'step_00000002'} at step 2" in third.output

    full, cut = metrics(ref), metrics(run_dir)
    assert [r["step"] for r in cut] == list(range(1, TOTAL + 1))
    for a, b in zip(full, cut):
        for key in EXACT:
            assert a[key] == b[key], (a["step"], key)
        for key in CLOSE:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    for tag in ("rollout/reward_mean", "actor/pg_loss"):
        assert tensorboard_steps(run_dir, tag) == list(range(1, TOTAL + 1)), tag
    # the incomplete write was replaced, and only complete checkpoints are kept
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000004", "step_00000006"]
    assert all((p / "complete").is_file() for p in ckpts.glob("step_*"))
    assert (ckpts / "latest").read_text() == "step_00000006"


# ----------------------------------------------------------------------------- the pieces, without processes


class FakeEngine:
    """Writes what DeepSpeed's save_checkpoint would, minus the tensors."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # `latest` is written after the completion marker, not before
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_text(str(client_state))


def test_only_complete_checkpoints_count(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for step in (2, 4):
        checkpoint.save(FakeEngine(), ckpts, step, {"step": step}, keep_last=2, rank=0)
    (ckpts / "step_00000006").mkdir()  # a write that never completed
    assert checkpoint.complete_tags(ckpts) == ["step_00000002", "step_00000004"]
    assert checkpoint.resolve_resume("auto", ckpts) == (ckpts, "step_00000004")
    assert checkpoint.resolve_resume(str(ckpts), ckpts) == (ckpts, "step_00000004")
    with pytest.raises(checkpoint.CheckpointError, match="incomplete checkpoint"):
        checkpoint.resolve_resume(str(ckpts / "step_00000006"), ckpts)
    assert checkpoint.resolve_resume("auto", tmp_path / "nothing") is None

    # resumed from step 2: re-saving step 4 replaces it; steps after it (another timeline) and
    # incomplete writes go; keep_last counts complete checkpoints only
    (ckpts / "step_00000004" / "stale.pt").write_text("old timeline")
    checkpoint.save(FakeEngine(), ckpts, 4, {"step": 4}, keep_last=1, rank=0)
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000004"]
    assert not (ckpts / "step_00000004" / "stale.pt").exists()
    assert (ckpts / "latest").read_text() == "step_00000004"


def test_legacy_checkpoints_without_markers(tmp_path):
    """Folders written before completion markers: the one `latest` names (written last) counts."""
    ckpts = tmp_path / "checkpoints"
    for tag in ("step_00000002", "step_00000004"):
        (ckpts / tag).mkdir(parents=True)
    (ckpts / "latest").write_text("step_00000002\n")
    assert checkpoint.resolve_resume("auto", ckpts) == (ckpts, "step_00000002")
    checkpoint.save(FakeEngine(), ckpts, 3, {"step": 3}, keep_last=2, rank=0)
    assert checkpoint.complete_tags(ckpts) == ["step_00000003"]


def test_resumed_monitor_keeps_each_step_once(tmp_path):
    first = Monitor(tmp_path, enabled=True, tensorboard=True, progress_bar=False, total_steps=6)
    for step in range(5):
        first.scalars({"x": float(step)}, step)
    first.close()
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 5, "x"')  # killed mid-line

    resumed = Monitor(tmp_path, enabled=True, tensorboard=True, progress_bar=False, total_steps=6, append=True)
    resumed.continue_after(2)
    for step in (3, 4):
        resumed.scalars({"x": 10.0 + step}, step)
    resumed.close()
    assert [(r["step"], r["x"]) for r in metrics(tmp_path)] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]
    assert tensorboard_steps(tmp_path, "x") == [0, 1, 2, 3, 4]

    # from step 0 nothing of the earlier run stays (the evaluation before training runs again)
    again = Monitor(tmp_path, enabled=True, tensorboard=True, progress_bar=False, total_steps=6, append=True)
    again.continue_after(0)
    again.scalars({"x": 20.0}, 0)
    again.close()
    assert [(r["step"], r["x"]) for r in metrics(tmp_path)] == [(0, 20.0)]
    assert tensorboard_steps(tmp_path, "x") == [0]
