"""The fault matrix: each of {a generation worker, the PM service, a learner worker, the
channel actor, the driver} killed at each phase {generate, score, learn, sync, checkpoint}
of a tiny PPO run, in sync mode, and in async mode for the generator and learner rows.

    .venv/bin/python bench/bench_faults.py [--cells generation@score,driver@checkpoint@sync,...]
                                           [--pm RUN/pm] [--out bench-faults.json]

Every cell is one run (4 iterations of 8 rollouts, a checkpoint after each, 1 generation
worker, 2 learners, the tiny models of configs/tiny.yaml) driven by `hh-ray train-ppo` in a
subprocess of its own on one local Ray cluster. The kill comes at the start of the phase in
iteration 2 (the third), from `RLHFController`'s phase hook: SIGKILL of generation worker 0,
of the PM service, of learner rank 1, of the driver itself. The channel actor (rollout queue
and learner commands) is SIGKILLed where the phase has something in it (`kill`): at
generate as it starts, at score once the batch is queued, at learn, sync and checkpoint once
the phase's learner command is sent. A killed driver is resumed with `hh-ray train-ppo
--run-dir RUN --resume`. In async mode the generate and score phases of iteration 2 run in
the prefetch thread while the learners train on iteration 1.

Counted over the final metrics (`read_metrics(run, "ppo", last_per_step=True)`), samples.jsonl
and the final checkpoint, as tests/test_faults.py counts them:
- lost: rollouts of a step missing from the trained history (a missing step, a short or
  dropped batch), or batches missing from the final optimizer's step count;
- duplicated: rollouts trained twice (more optimizer steps than batches, a step twice) or
  replaced: a step run again (after a roll-back or a resume) that drew other prompts, or,
  in sync mode, other samples than its first run;
- recorded: the restart is in the metrics (`restarts_<component>_total` of the rows; for
  the learner and the driver also a `ppo_fault` row).
A cell is survived when the run ends (after the resume, for the driver), the kill happened,
nothing is lost or duplicated and the restart is recorded.

The tests run a few cells in one run through the same code (tests/test_faults.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hh_ray.runtime import processor_name  # noqa: E402

BIN = Path(sys.executable).parent
TINY = ROOT / "configs" / "tiny.yaml"

COMPONENTS = ("generation", "pm", "learner", "channel", "driver")
PHASES = ("generate", "score", "learn", "sync", "checkpoint")
ASYNC_COMPONENTS = ("generation", "learner")
ITERATIONS, BATCH, KILL_AT = 4, 8, 2
RECORDED_BY = {"generation": "restarts_generation_total", "pm": "restarts_pm_total",
               "learner": "restarts_learner_total", "channel": "restarts_channel_total",
               "driver": "restarts_driver_total"}


@dataclass(frozen=True)
class Kill:
    component: str
    phase: str
    iteration: int = KILL_AT

    @classmethod
    def parse(cls, text: str) -> "Kill":
        component, phase, *it = text.split("@")
        assert component in COMPONENTS and phase in PHASES, text
        return cls(component, phase, int(it[0]) if it else KILL_AT)

    def __str__(self) -> str:
        return f"{self.component}@{self.phase}@{self.iteration}"


def train_flags(pm: str, mode: str, iterations: int = ITERATIONS, batch: int = BATCH) -> list[str]:
    """`hh-ray train-ppo` flags of every cell: tiny models, one checkpoint per iteration."""
    return ["--config", str(TINY), "--model.pm", pm, "--ppo.mode", mode, "--ppo.iterations", str(iterations),
            "--ppo.rollout_batch_size", str(batch), "--ppo.minibatch_size", str(batch),
            "--ppo.micro_batch_size", str(batch), "--ppo.checkpoint_every", "1", "--ppo.eval_prompts", "0",
            "--generation.num_workers", "1", "--ppo.num_learners", "2", "--tracking.wandb", "disabled"]


# ---------------------------------------------------------------- in the driver: the kills

def _pid_of(actor) -> int:
    return __import__("ray").get(actor.__ray_call__.remote(lambda self: os.getpid()))


def _sigkill(pid: int) -> None:
    """SIGKILL `pid` and wait until it is gone (or a zombie its parent has not reaped)."""
    import psutil

    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.01)


def _after_next(obj, method: str, then) -> None:
    """Run `then()` once, right after the next call of `obj.method` returns."""
    original = getattr(obj, method)

    def once(*args, **kwargs):
        setattr(obj, method, original)
        out = original(*args, **kwargs)
        then()
        return out

    setattr(obj, method, once)


def kill(k: Kill, controller) -> None:
    """SIGKILL `k.component` of the running `controller`'s run (the driver: this process).

    The channel actor dies where the phase has something in it: at generate, as it starts
    (the learners' waiting `get`s are in flight); at score, once the scored batch is in the
    queue (the entry is lost); at learn, sync and checkpoint, once the phase's learner
    command is in the channel (the command, or its answer, is lost)."""
    import ray

    if k.component == "generation":
        _sigkill(ray.get(controller.rollouts.pool.workers[0].info.remote())["pid"])
    elif k.component == "pm":
        _sigkill(_pid_of(controller.rollouts.scorer))
    elif k.component == "learner":
        _sigkill(controller.learners.pids[-1])
    elif k.component == "channel":
        pid = controller.queue.pid()
        if k.phase == "generate":
            _sigkill(pid)
        elif k.phase == "score":
            _after_next(controller.queue, "put", lambda: _sigkill(pid))
        else:
            _after_next(controller.learners.client, "_send", lambda: _sigkill(pid))
    elif k.component == "driver":
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def install_kills(kills: list[Kill], log: Path) -> None:
    """Each kill once, at its phase's start (`RLHFController`'s phase hook); a line in `log` first."""
    from hh_ray.orchestration.controller import RLHFController

    original, done, lock = RLHFController._phase, set(), threading.Lock()

    def _phase(self, name: str, iteration: int) -> None:
        for k in kills:
            with lock:
                if (k.phase, k.iteration) != (name, iteration) or k in done:
                    continue
                done.add(k)
            with open(log, "a") as f:
                f.write(json.dumps({**asdict(k), "thread": threading.current_thread().name,
                                    "restarts": dict(self.state["restarts"])}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            print(f"fault injection: killing {k}", flush=True)
            kill(k, self)
        original(self, name, iteration)

    RLHFController._phase = _phase


def child_main(argv: list[str]) -> int:
    """`--child RUN KILLS -- train-ppo flags`: `hh-ray train-ppo` with the kills installed."""
    run_dir, kills, flags = argv[0], [Kill.parse(k) for k in argv[1].split(",") if k], argv[3:]
    install_kills(kills, Path(run_dir).parent / "kills.jsonl")
    from hh_ray.orchestration.cli import main

    return main(["train-ppo", "--run-dir", run_dir, *flags])


# ---------------------------------------------------------------- a cell: run, resume, count

def run_cell(kills: list[Kill], mode: str, pm: str, folder: Path, address: str, iterations: int = ITERATIONS,
             batch: int = BATCH, timeout_s: float = 1800) -> dict:
    """One run with `kills` (a driver subprocess joining the cluster at `address`), resumed
    once if the driver was killed; the counts of `count`, the seconds and the logs' tails."""
    folder.mkdir(parents=True, exist_ok=True)
    run_dir = folder / "run"
    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    logs = []
    cmd = [sys.executable, __file__, "--child", str(run_dir), ",".join(map(str, kills)), "--",
           *train_flags(pm, mode, iterations, batch)]
    codes = [_run(cmd, env, folder / "driver.log", timeout_s, logs)]
    if codes[0] == -signal.SIGKILL and any(k.component == "driver" for k in kills):
        codes.append(_run([str(BIN / "hh-ray"), "train-ppo", "--run-dir", str(run_dir), "--resume"], env,
                          folder / "resume.log", timeout_s, logs))
    seconds = time.time() - t0
    killed = [json.loads(line) for line in (folder / "kills.jsonl").read_text().splitlines()] \
        if (folder / "kills.jsonl").exists() else []
    out = {"kills": [str(k) for k in kills], "mode": mode, "exit_codes": codes, "seconds": seconds,
           "killed": killed, "recovery": recovery_lines(folder),
           **count(run_dir, iterations, batch, mode, {k.component for k in kills})}
    out["survived"] = (codes[-1] == 0 and len(killed) == len(kills) and out["lost"] == 0
                       and out["duplicated"] == 0 and out["recorded"])
    if not out["survived"]:
        out["log_tail"] = "\n".join(logs)[-6000:]
    return out


RECOVERY = re.compile(r"again|own ref|replaced|rolled back|resuming from|actor failure")


def recovery_lines(folder: Path) -> list[str]:
    """What the drivers said they did about the faults (their logs' recovery lines)."""
    lines = []
    for name in ("driver.log", "resume.log"):
        if (folder / name).exists():
            lines += [f"{name}: {line.strip()[:300]}" for line in (folder / name).read_text().splitlines()
                      if RECOVERY.search(line) and "pid=" not in line]
    return lines


def _run(cmd: list, env: dict, log: Path, timeout_s: float, logs: list) -> int:
    with open(log, "w") as f:
        try:
            code = subprocess.run([str(c) for c in cmd], env=env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=timeout_s, cwd=ROOT).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    logs.append(f"--- {log.name} (exit {code})\n" + log.read_text()[-4000:])
    return code


def count(run_dir: Path, iterations: int, batch: int, mode: str, components: set[str]) -> dict:
    """Lost, duplicated (or replaced) rollouts and whether each restart is recorded."""
    from hh_ray.checkpoint import PPO_CHECKPOINTS, latest_checkpoint, read_checkpoint
    from hh_ray.tracking import read_metrics

    rows = read_metrics(run_dir, "ppo")
    final = {r["step"]: r for r in read_metrics(run_dir, "ppo", last_per_step=True)}
    steps = range(1, iterations + 1)
    lost = sum(batch - min(batch, final[s]["samples"]) if s in final else batch for s in steps)
    duplicated = sum(max(0, final[s]["samples"] - batch) for s in steps if s in final)
    duplicated += batch * len(set(final) - set(steps))

    # Steps run more than once (roll-backs, resumes): the same prompts; in sync mode the same samples.
    runs: dict[int, list[dict]] = {}
    for r in rows:
        runs.setdefault(r["step"], []).append(r)
    samples: dict[int, list[dict]] = {}
    path = run_dir / "samples.jsonl"
    for line in (path.read_text().splitlines() if path.exists() else []):
        s = json.loads(line)
        samples.setdefault(s["step"], []).append(s)
    replaced = 0
    for step, again in runs.items():
        if len(again) < 2:
            continue
        logged = samples.get(step, [])
        per_run = len(logged) // len(again)
        chunks = [logged[k * per_run:(k + 1) * per_run] for k in range(len(again))]
        same = all([s["prompt"] for s in c] == [s["prompt"] for s in chunks[0]] for c in chunks)
        if mode == "sync":
            same = same and all([s["response"] for s in c] == [s["response"] for s in chunks[0]] for c in chunks)
            same = same and all(r["tokens_generated"] == again[0]["tokens_generated"]
                                and abs(r["reward_pm"] - again[0]["reward_pm"]) <= 1e-5 for r in again)
        replaced += 0 if same else batch

    # Batches trained into the final model: its optimizer's step count (roll-backs restore it).
    trained = None
    ckpt = latest_checkpoint(run_dir / PPO_CHECKPOINTS)
    if ckpt is not None:
        optimizers = read_checkpoint(ckpt)[1]
        steps_taken = {int(v["step"]) for v in optimizers["policy"]["state"].values() if "step" in v}
        per_iteration = 1  # one epoch over one minibatch: train_flags sets minibatch = batch
        trained = max(steps_taken) / per_iteration if steps_taken else 0
        lost = max(lost, batch * max(0, iterations - int(trained)))
        duplicated = max(duplicated, batch * max(0, int(trained) - iterations))
    duplicated += replaced

    # The most each total reached: a resumed driver carries its checkpoint's counts, not those
    # of the steps it runs again.
    seen = {c: max([r.get(RECORDED_BY[c], 0) for r in rows] or [0]) for c in COMPONENTS}
    faults = [f["what"] for f in read_metrics(run_dir, "ppo_fault")]
    recorded = all(seen[c] >= 1 for c in components)
    if "learner" in components:
        recorded = recorded and "learner_restart" in faults
    if "driver" in components:
        recorded = recorded and "resume" in faults
    return {"lost": lost, "duplicated": duplicated, "replaced": replaced, "trained_batches": trained,
            "recorded": recorded, "steps_logged": [r["step"] for r in rows], "faults": faults,
            "restarts": seen,
            "policy_written": (run_dir / "policy" / "config.json").exists()}


# ---------------------------------------------------------------- the matrix

def all_cells() -> list[tuple[str, str, str]]:
    """(component, phase, mode) of every cell."""
    cells = [(c, p, "sync") for c in COMPONENTS for p in PHASES]
    return cells + [(c, p, "async") for c in ASYNC_COMPONENTS for p in PHASES]


def recovery_summary(r: dict) -> str:
    """How the run got over it, from its logs: resent commands, batches taken from the producer's
    ref, replaced actors, roll-backs, a resume."""
    tags = []
    for line in r["recovery"]:
        if m := re.search(r"sending '(\w+)' \(seq \d+\) again", line):
            tags.append(f"resent {m.group(1)}")
        elif "own ref" in line:
            tags.append("batch from own ref")
        elif "rolled back to iteration" in line:
            tags.append("rolled back to " + re.search(r"rolled back to iteration (\d+)", line).group(1))
        elif "replaced" in line:
            tags.append("generator replaced" if "weight sync" in line or "generation worker(s)" in line
                        and not line.split("replaced ")[1].startswith("0") else "PM replaced")
        elif "while the learners trained" in line:
            tags.append("batch redone")
    if len(r["exit_codes"]) > 1:
        tags.append("resumed")
    return ", ".join(dict.fromkeys(tags)) or "-"


def table(results: list[dict]) -> str:
    head = (f"{'component':<11} {'mode':<5} {'phase':<10} {'survived':>8} {'lost':>5} {'duplicated':>10} "
            f"{'recorded':>8} {'seconds':>8}  {'steps logged':<18} recovery")
    lines = [head, "-" * len(head)]
    for r in results:
        steps = ",".join(map(str, r["steps_logged"]))
        lines.append(f"{r['component']:<11} {r['mode']:<5} {r['phase']:<10} {'yes' if r['survived'] else 'NO':>8} "
                     f"{r['lost']:>5} {r['duplicated']:>10} {'yes' if r['recorded'] else 'no':>8} "
                     f"{r['seconds']:>8.0f}  {steps:<18} {recovery_summary(r)}")
    return "\n".join(lines)


def grid(results: list[dict]) -> str:
    """component x phase: survived (lost/duplicated) seconds."""
    by = {(r["component"], r["mode"], r["phase"]): r for r in results}
    lines = [f"{'':<17}" + "".join(f"{p:>16}" for p in PHASES)]
    for c, m in [(c, "sync") for c in COMPONENTS] + [(c, "async") for c in ASYNC_COMPONENTS]:
        if not any((c, m, p) in by for p in PHASES):
            continue
        cells = []
        for p in PHASES:
            r = by.get((c, m, p))
            cells.append("" if r is None else f"{'ok' if r['survived'] else 'FAIL'} {r['lost']}/{r['duplicated']} "
                                              f"{r['seconds']:.0f}s")
        lines.append(f"{c + ' (' + m + ')':<17}" + "".join(f"{x:>16}" for x in cells))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", default="", help="component@phase[@mode],... (default: the whole matrix)")
    ap.add_argument("--pm", default="", help="a trained PM folder (default: train the tiny one, ~1 min)")
    ap.add_argument("--baseline", action="store_true", help="also a run with no kill per mode")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the run folders")
    args = ap.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(tempfile.mkdtemp(prefix="hh-faults-"))
    os.environ.setdefault("HH_RAY_CACHE", str(work / "cache"))

    import ray

    from hh_ray.config import load_config

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in ("HH_RAY_CACHE", "WANDB_MODE", "HF_HUB_OFFLINE",
                                                                   "TOKENIZERS_PARALLELISM")}})
    address = ray.get_runtime_context().gcs_address
    t_all = time.time()
    pm = args.pm
    if not pm:
        from learners.pm_learner import train_pm

        pm = str(train_pm(load_config(TINY, {"tracking.wandb": "disabled"}), work / "pm-run"))
    if args.cells:
        cells = []
        for c in args.cells.split(","):
            component, phase, *mode = c.split("@")
            cells.append((component, phase, mode[0] if mode else "sync"))
    else:
        cells = all_cells()
    if args.baseline:
        cells = [("none", "-", m) for m in sorted({m for _, _, m in cells})] + cells
    print(f"{len(cells)} cells on {processor_name()}, {os.cpu_count()} CPUs; runs under {work}", flush=True)
    results = []
    for component, phase, mode in cells:
        kills = [] if component == "none" else [Kill(component, phase)]
        folder = work / f"{component}-{phase}-{mode}"
        r = {"component": component, "phase": phase, "mode": mode,
             **run_cell(kills, mode, pm, folder, address)}
        if component == "none":  # nothing to kill or record
            r["survived"] = r["exit_codes"][-1] == 0 and r["lost"] == r["duplicated"] == 0
            r["recorded"] = True
        results.append(r)
        print(f"{component}@{phase} ({mode}): {'survived' if r['survived'] else 'NOT SURVIVED'}, lost {r['lost']}, "
              f"duplicated {r['duplicated']}, recorded {r['recorded']}, {r['seconds']:.0f} s, steps "
              f"{r['steps_logged']}, restarts {r['restarts']}", flush=True)
        if not r["survived"]:
            print(r.get("log_tail", ""), flush=True)
        if not args.keep:
            import shutil

            shutil.rmtree(folder / "run", ignore_errors=True)
    wall = time.time() - t_all
    print()
    print(table(results))
    print()
    print(grid(results))
    print(f"\n{sum(r['survived'] for r in results)}/{len(results)} survived; wall time {wall / 60:.1f} min "
          f"on {processor_name()} ({os.cpu_count()} CPUs)")
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "wall_s": wall, "cpu": processor_name()}, indent=1))
    ray.shutdown()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(child_main(sys.argv[2:]))
    main()
