"""SIGTERM/SIGINT: the step finishes, every rank saves, exit 0 with one line on how to resume, and
``--resume auto`` continues to the end; a second signal exits at once."""

import os
import re
import signal
import time

from _launch import Run, command, finished, logged_step, metrics, tensorboard_steps, wait_for

from tapo_ds.preemption import SAME_EVENT_S, StopRequest

TOTAL = 6
RESUME_HINT = "to continue, run the same command (same config and name) with --resume auto"


def stopped_line(output: str) -> tuple[int, str, str]:
    lines = [line for line in output.splitlines() if line.startswith("stopped by ")]
    assert len(lines) == 1, output[-4000:]  # rank 0 only
    m = re.fullmatch(rf"stopped by (.+) after step (\d+) of {TOTAL}: checkpoint (\S+); " + re.escape(RESUME_HINT),
                     lines[0])
    assert m, lines[0]
    return int(m.group(2)), m.group(3), m.group(1)


def assert_saved_and_resumes(tmp_path, name, output, ranks):
    step, where, by = stopped_line(output)
    run_dir = tmp_path / name
    assert where == str(run_dir / "checkpoints" / f"step_{step:08d}")
    assert (run_dir / "checkpoints" / f"step_{step:08d}" / "complete").is_file()
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, step + 1))
    resumed = finished(command(tmp_path, name, [f"total_steps={TOTAL}"], ["--resume", "auto"], ranks=ranks),
                       tmp_path, f"{name}-resume")
    assert f"resumed from {where} at step {step}" in resumed.output
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, TOTAL + 1))
    return by


def test_sigterm_one_rank(tmp_path):
    """Through the deepspeed launcher, SIGTERM to the worker (as a cluster's scheduler sends it)."""
    run = Run(command(tmp_path, "one", [f"total_steps={TOTAL}"], ranks=1), tmp_path, "one")
    try:
        worker, = run.workers(1)
        wait_for(logged_step(tmp_path / "one", 1), 240, "step 1")
        worker.send_signal(signal.SIGTERM)
        code = run.wait(240)
    finally:
        run.kill_all()
    assert code == 0, run.output[-6000:]
    assert assert_saved_and_resumes(tmp_path, "one", run.output, ranks=0) == "SIGTERM"
    assert tensorboard_steps(tmp_path / "one", "rollout/reward_mean") == list(range(1, TOTAL + 1))


def test_sigterm_to_one_of_two_ranks_stops_both_at_the_same_step(tmp_path):
    """Only rank 1 gets the signal: the ranks agree at the step boundary and both save the same step."""
    run = Run(command(tmp_path, "two", [f"total_steps={TOTAL}"], ranks=2), tmp_path, "two")
    try:
        _, rank1 = run.workers(2)
        wait_for(logged_step(tmp_path / "two", 1), 300, "step 1")
        rank1.send_signal(signal.SIGTERM)
        code = run.wait(300)
    finally:
        run.kill_all()
    assert code == 0, run.output[-6000:]
    assert "SIGTERM received: stopping after the current step" in run.output
    assert assert_saved_and_resumes(tmp_path, "two", run.output, ranks=2) == "a signal on another rank"


def test_ctrl_c_through_the_launcher_still_saves(tmp_path):
    """SIGINT to the whole process group (Ctrl-C in a terminal): the launcher forwards a SIGTERM on top
    and exits 1 (DeepSpeed's behaviour), the worker counts the two as one signal and saves."""
    run = Run(command(tmp_path, "ctrlc", [f"total_steps={TOTAL}"], ranks=1), tmp_path, "ctrlc")
    try:
        worker, = run.workers(1)
        wait_for(logged_step(tmp_path / "ctrlc", 1), 240, "step 1")
        os.killpg(run.proc.pid, signal.SIGINT)
        run.wait(60)
        worker.wait(120)  # the launcher gives it 30 s before SIGKILL
    finally:
        run.kill_all()
    step, where, by = stopped_line(run.output)
    assert by in ("SIGINT", "SIGTERM")
    assert "received again" not in run.output
    assert (tmp_path / "ctrlc" / "checkpoints" / f"step_{step:08d}" / "complete").is_file()


def test_second_signal_exits_at_once(tmp_path):
    """The first SIGTERM lands in a checkpoint write slowed on purpose; the second one, past the window in
    which copies of one signal count once, ends the process there: no complete checkpoint."""
    run = Run(command(tmp_path, "twice", [f"total_steps={TOTAL}"]), tmp_path, "twice", TAPO_DS_TEST_SLOW_SAVE_S="60")
    try:
        wait_for(lambda: (tmp_path / "twice" / "checkpoints" / "step_00000002").is_dir(), 240, "the first save")
        run.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "SIGTERM received" in run.output, 30, "the first signal's line")
        time.sleep(SAME_EVENT_S + 0.5)
        assert run.proc.poll() is None  # the first signal only asked to stop
        run.proc.send_signal(signal.SIGTERM)
        code = run.wait(10)
    finally:
        run.kill_all()
    assert code == 128 + signal.SIGTERM, run.output[-4000:]
    assert "SIGTERM received again: exiting now, without a checkpoint" in run.output
    assert not (tmp_path / "twice" / "checkpoints" / "step_00000002" / "complete").exists()


def test_stop_request_in_process():
    """The first signal only sets the flag; a copy within the window is the same event; handlers are
    restored on exit (the second-signal exit itself is tested on a real run above)."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. the launcher's forwarded copy
        assert stop.requested and stop.name == "SIGINT"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
