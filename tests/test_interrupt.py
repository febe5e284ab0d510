"""Ctrl-C and SIGTERM as a user sends them to `hh-ray` (real processes, each stage with its
own local Ray cluster): the stage ends within 10 s, no process it started is left (actors,
learners, Ray's own), no checkpoint is half-written, and `--resume` continues from the last
checkpoint. The interrupt machinery itself (the deadline, a second Ctrl-C) is tested on a
small process without Ray."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from hh_ray.checkpoint import PPO_CHECKPOINTS, read_state, resume_checkpoint, step_folders, verify_checkpoint
from hh_ray.tracking import read_metrics
from tests.conftest import ROOT

BIN = Path(sys.executable).parent
LIMIT_S = 10.0  # the promise: signal -> process gone
GRACE_S = 2.0   # for the run's other processes to be gone after the driver exited


def stage_env(cache_dir: str) -> dict:
    # Its own local cluster (no RAY_ADDRESS), and not this process's W&B service (WANDB_SERVICE).
    env = {k: v for k, v in os.environ.items() if "WANDB" not in k and k != "RAY_ADDRESS"}
    env.update(PATH=f"{BIN}:{os.environ['PATH']}", HH_RAY_CACHE=cache_dir, WANDB_MODE="offline",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Stage:
    """One `hh-ray` command run as a subprocess, its output in a log file."""

    def __init__(self, args: list, log: Path, env: dict):
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen([BIN / "hh-ray", *map(str, args)], env=env, cwd=ROOT,
                                         stdout=out, stderr=subprocess.STDOUT)
        self.tree: list[psutil.Process] = []

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, marker: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while marker not in self.text():
            assert self.proc.poll() is None, f"exited ({self.proc.returncode}) before {marker!r}:\n{self.text()[-3000:]}"
            assert time.time() < deadline, f"no {marker!r} within {timeout:.0f} s:\n{self.text()[-3000:]}"
            time.sleep(0.2)

    def interrupt(self, sig: int) -> tuple[float, int | None, list[str]]:
        """Send `sig` to the driver only: (seconds until it exited, its exit status, the processes
        of its tree at the signal still alive GRACE_S after it exited)."""
        driver = psutil.Process(self.proc.pid)
        self.tree = [driver, *driver.children(recursive=True)]
        t0 = time.time()
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=LIMIT_S + 30)  # measured, not cut off at the limit
        except subprocess.TimeoutExpired:
            code = None
        seconds = time.time() - t0
        deadline = time.time() + GRACE_S
        while any(alive(p) for p in self.tree) and time.time() < deadline:
            time.sleep(0.1)
        left = []
        for p in self.tree:
            if alive(p):
                try:
                    left.append(f"{p.pid} {p.name()}")
                except psutil.Error:
                    pass
        return seconds, code, left

    def kill(self) -> None:
        """Whatever is still alive after a failed test: not into the next one."""
        procs = list(self.tree)
        if self.proc.poll() is None:
            try:
                driver = psutil.Process(self.proc.pid)
                procs += [driver, *driver.children(recursive=True)]
            except psutil.Error:
                pass
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        self.proc.wait(timeout=30)


def test_sigint_stops_train_ppo_within_10s_and_resume_continues(tiny_pm, cache_dir, tmp_path):
    run = tmp_path / "ppo"
    env = stage_env(cache_dir)
    common = ["--tracking.wandb", "offline"]
    stage = Stage(["train-ppo", "--config", ROOT / "configs" / "tiny.yaml", "--model.pm", tiny_pm, "--run-dir", run,
                   "--ppo.iterations", "20", "--ppo.checkpoint_every", "1", *common], tmp_path / "ppo.log", env)
    try:
        stage.wait_for("[ppo 2/", timeout=900)
        seconds, code, left = stage.interrupt(signal.SIGINT)
    finally:
        stage.kill()
    print(f"train-ppo, SIGINT: exit {code} after {seconds:.2f} s; {len(left)} of {len(stage.tree)} processes left {left}")
    log = stage.text()
    assert code == 130, log[-3000:]
    assert seconds <= LIMIT_S, log[-3000:]
    assert left == [], log[-3000:]
    assert "train-ppo: interrupted (SIGINT): stopping; resume with --resume" in log
    assert "[ppo 20/20]" not in log and not (run / "policy").exists()  # really stopped mid-run
    # The console is hh-ray's own: Ray would prefix a worker's line with "(Name pid=N)"; the
    # workers' output (vLLM's engine reports among it) is in the log files the run links to.
    assert "Ray and vLLM logs:" in log and "pid=" not in log, log[-3000:]
    assert any((run / "ray-logs").glob("worker-*.err")), list((run / "ray-logs").iterdir())

    # No half-written checkpoint: every step-N there verifies (a save cut short is a leftover
    # .tmp folder, which the next start removes).
    root = run / PPO_CHECKPOINTS
    for folder in step_folders(root):
        verify_checkpoint(folder)
    start = read_state(resume_checkpoint(root))["iteration"]
    assert 1 <= start < 20

    end = start + 1
    resumed = Stage(["train-ppo", "--run-dir", run, "--resume", "--ppo.iterations", end, *common],
                    tmp_path / "resume.log", env)
    try:
        assert resumed.proc.wait(timeout=900) == 0, resumed.text()[-3000:]
    finally:
        resumed.kill()
    log = resumed.text()
    # It went on from the checkpoint: no iteration before it was run again.
    assert f"[ppo {end}/{end}]" in log, log[-3000:]
    assert not any(f"[ppo {i}/{end}]" in log for i in range(1, end)), log[-3000:]
    assert [r["step"] for r in read_metrics(run, "ppo", last_per_step=True)] == list(range(1, end + 1))
    assert (run / "policy" / "config.json").exists()


def test_sigterm_stops_train_pm_within_10s(cache_dir, tiny_model, tmp_path):
    # Ten times the tiny data, so that training is still running when the signal comes.
    stage = Stage(["train-pm", "--config", ROOT / "configs" / "tiny.yaml", "--run-dir", tmp_path / "pm",
                   "--data.num_synthetic", "20000", "--tracking.wandb", "offline"], tmp_path / "pm.log",
                  stage_env(cache_dir))
    try:
        stage.wait_for("loss=", timeout=600)  # the progress bar after the first training steps
        seconds, code, left = stage.interrupt(signal.SIGTERM)
    finally:
        stage.kill()
    print(f"train-pm, SIGTERM: exit {code} after {seconds:.2f} s; {len(left)} of {len(stage.tree)} processes left {left}")
    log = stage.text()
    assert code == 143, log[-3000:]
    assert seconds <= LIMIT_S, log[-3000:]
    assert left == [], log[-3000:]
    assert "train-pm: interrupted (SIGTERM): stopping; resume with --resume" in log
    assert "PM written to" not in log


# ---------------------------------------------------------------- the machinery, without Ray

STUCK = textwrap.dedent("""
    import subprocess, sys, time
    from hh_ray.orchestration import cli

    cli.STOP_DEADLINE_S = float(sys.argv[1])
    cli.Interrupts("test")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        print(child.pid, flush=True)  # the test signals once it reads this
        time.sleep(600)
    except KeyboardInterrupt:  # a clean-up that never ends
        print("unwinding", flush=True)
        while True:
            time.sleep(1)
""")


def _stuck(deadline_s: float):
    proc = subprocess.Popen([sys.executable, "-c", STUCK, str(deadline_s)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    child = psutil.Process(int(proc.stdout.readline()))
    return proc, child


@pytest.mark.timeout(120)
@pytest.mark.parametrize("second_signal", [False, True])
def test_stuck_clean_up_is_cut_at_the_deadline_or_by_a_second_signal(second_signal):
    proc, child = _stuck(deadline_s=3.0)
    try:
        t0 = time.time()
        proc.send_signal(signal.SIGINT)
        assert proc.stdout.readline().strip() == "unwinding"
        if second_signal:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        seconds = time.time() - t0
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        if alive(child):
            child.kill()
    assert code == 130, err  # the first signal's status
    assert "test: interrupted (SIGINT): stopping" in err and "resume" not in err  # not a resumable stage
    if second_signal:
        assert seconds < 2.5 and "second signal (SIGTERM): killed the run's processes" in err, (seconds, err)
    else:
        assert 3.0 <= seconds < 5.5 and "clean-up not done in 3 s: killed the run's processes" in err, (seconds, err)
    time.sleep(0.2)
    assert not alive(child)


def test_main_in_process_leaves_signal_handling_as_it_found_it(tmp_path):
    from hh_ray.orchestration.cli import main

    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(fd)
    assert main(["train-pm", "--config", str(tmp_path / "missing.yaml"), "--run-dir", str(tmp_path / "r")]) == 2
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert signal.set_wakeup_fd(fd) == fd
