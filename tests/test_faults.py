"""Fault tolerance on a real local Ray cluster: actors and learner workers are
killed during a tiny PPO run, and the run still ends with every iteration
trained exactly once. The channel actor (rollout queue and learner commands) is
killed at each moment where it holds something, and a few cells of the fault
matrix (bench/bench_faults.py, whose code they run) go through a driver that is
killed and resumed."""

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from hh_ray.orchestration.controller import RLHFController
from hh_ray.rollout import RolloutBatch, drop_nonfinite
from hh_ray.tracking import read_metrics
from tests.conftest import tiny_config

ITERATIONS = 5
BATCH = 16
HANG_LIMIT_S = 8  # generation.timeout_s of the faulty run: its tiny batches take a second at most


def run_injected(controller, inject) -> dict:
    """The controller's run with `inject(phase, iteration)` called as each phase starts."""
    controller.on_phase = inject
    try:
        return controller.run()
    finally:
        controller.shutdown()


def test_nonfinite_rollouts_are_dropped_and_counted():
    batch = RolloutBatch.from_samples([[1, 2], [3], [4, 5]], [[6, 7], [8], [9]],
                                      [[-0.1, -0.2], [float("nan")], [-0.3]], [0, 0, 0],
                                      ["a", "b", "c"], ["x", "y", "z"], ["stop"] * 3, pad_id=0)
    batch.pm_score = torch.tensor([0.5, 0.1, float("inf")])
    kept, dropped = drop_nonfinite(batch)
    assert dropped == 2 and kept.prompts == ["a"]
    assert torch.equal(kept.input_ids[0, :4], torch.tensor([1, 2, 6, 7]))
    same, none = drop_nonfinite(kept)
    assert none == 0 and same is kept


@pytest.fixture(scope="module")
def faulty_run(ray_cluster, tiny_pm, tmp_path_factory):
    """Kill, during one run: a generation worker (SIGKILL) as iteration 1 starts
    generating, the PM service (ray.kill) as iteration 2 starts scoring, and a
    learner worker (SIGKILL) as iteration 3 starts learning (last checkpoint: iteration 2).
    Then hang (SIGSTOP) a generation worker as iteration 4 starts generating and the PM
    service as it starts scoring: each is stopped past generation.timeout_s and replaced."""
    import ray

    run_dir = tmp_path_factory.mktemp("ppo-faults")
    cfg = tiny_config(**{"model.pm": tiny_pm, "ppo.iterations": ITERATIONS, "ppo.rollout_batch_size": BATCH,
                         "generation.num_workers": 2, "ppo.num_learners": 2, "ppo.checkpoint_every": 2,
                         "generation.timeout_s": HANG_LIMIT_S})
    controller = RLHFController(cfg, run_dir)
    killed = []

    def inject(phase, i):
        if (phase, i) == ("generate", 1) and "generation" not in killed:
            pid = ray.get(controller.rollouts.pool.workers[0].info.remote())["pid"]
            os.kill(pid, signal.SIGKILL)
            killed.append("generation")
        elif (phase, i) == ("score", 2) and "pm" not in killed:
            ray.kill(controller.rollouts.scorer)
            killed.append("pm")
        elif (phase, i) == ("learn", 3) and "learner" not in killed:
            os.kill(controller.learners.pids[1], signal.SIGKILL)
            killed.append("learner")
        elif (phase, i) == ("generate", 4) and "hung generation" not in killed:
            os.kill(ray.get(controller.rollouts.pool.workers[1].info.remote())["pid"], signal.SIGSTOP)
            killed.append("hung generation")
        elif (phase, i) == ("score", 4) and "hung pm" not in killed:
            os.kill(ray.get(controller.rollouts.scorer.placement.remote())["pid"], signal.SIGSTOP)
            killed.append("hung pm")

    return run_dir, run_injected(controller, inject), killed


def test_run_survives_killed_generator_pm_and_learner(faulty_run):
    run_dir, result, killed = faulty_run
    assert killed == ["generation", "pm", "learner", "hung generation", "hung pm"]
    assert (result["restarts_generation"], result["restarts_pm"], result["restarts_learner"]) == (2, 2, 1)

    rows = read_metrics(run_dir, "ppo")
    # Iteration 3 (step 4) died in learning and rolled back to the step-2
    # checkpoint: step 3 was trained twice, everything else once.
    assert [r["step"] for r in rows] == [1, 2, 3, 3, 4, 5]
    faults = read_metrics(run_dir, "ppo_fault")
    assert [(f["step"], f["what"]) for f in faults] == [(2, "learner_restart")]
    assert faults[0]["checkpoint"].endswith("step-000002")

    final = read_metrics(run_dir, "ppo", last_per_step=True)
    assert [r["step"] for r in final] == list(range(1, ITERATIONS + 1))
    # No rollout lost: every trained batch is whole, none dropped.
    assert all(r["samples"] == BATCH and r["dropped_nonfinite"] == 0 for r in final)
    # The metrics say what happened, in the iteration it happened.
    assert [r["restarts_generation"] for r in rows] == [0, 1, 0, 0, 0, 1]
    assert [r["restarts_pm"] for r in rows] == [0, 0, 1, 0, 0, 1]
    assert [r["restarts_learner_total"] for r in rows] == [0, 0, 0, 1, 1, 1]
    # None duplicated or replaced by other data: the redone iteration drew the
    # same prompts and samples (same seeds, same checkpointed weights).
    first, redo = rows[2], rows[3]
    assert redo["tokens_generated"] == first["tokens_generated"]
    assert redo["reward_pm"] == pytest.approx(first["reward_pm"], abs=1e-5)
    assert (run_dir / "policy" / "config.json").exists()


@pytest.fixture(scope="module")
def learner_killed_outside_learn(ray_cluster, tiny_pm, tmp_path_factory):
    """Kill a learner worker (SIGKILL) as iteration 2 starts its weight sync, and, once
    that restart is rolled back, again as the redone iteration 2 starts generating.
    Neither is a moment the learners are busy: each restart is found at the next
    learner command. Last checkpoint before both: iteration 2."""
    run_dir = tmp_path_factory.mktemp("ppo-learner-faults")
    cfg = tiny_config(**{"model.pm": tiny_pm, "ppo.iterations": 4, "ppo.rollout_batch_size": BATCH,
                         "generation.num_workers": 1, "ppo.num_learners": 2, "ppo.checkpoint_every": 2,
                         "ppo.eval_prompts": 0})
    controller = RLHFController(cfg, run_dir)
    killed = []

    def inject(phase, i):
        restarts = controller.state["restarts"]["learner"]
        if (phase, i, restarts) == ("sync", 2, 0) and not killed:
            killed.append(("sync", controller.learners.pids[1]))
        elif (phase, i, restarts) == ("generate", 2, 1) and len(killed) == 1:
            killed.append(("generate", controller.learners.pids[1]))
        else:
            return
        os.kill(killed[-1][1], signal.SIGKILL)

    return run_dir, run_injected(controller, inject), killed


def test_learner_killed_during_sync_or_generate_loses_and_duplicates_nothing(learner_killed_outside_learn):
    run_dir, result, killed = learner_killed_outside_learn
    assert [phase for phase, _ in killed] == ["sync", "generate"]
    assert killed[0][1] != killed[1][1]  # the second kill hit the restarted group
    assert result["restarts_learner"] == 2
    rows = read_metrics(run_dir, "ppo")
    # Killed in iteration 2's sync: step 3 was logged, then found at the next command and rolled
    # back to the step-2 checkpoint; killed again in the redone step 3's generation: no row.
    assert [r["step"] for r in rows] == [1, 2, 3, 3, 4]
    faults = read_metrics(run_dir, "ppo_fault")
    assert [(f["step"], f["what"]) for f in faults] == [(2, "learner_restart")] * 2
    final = read_metrics(run_dir, "ppo", last_per_step=True)
    assert [r["step"] for r in final] == [1, 2, 3, 4]
    # 0 lost: every trained batch whole; 0 duplicated or replaced: the redone step drew the same samples.
    assert all(r["samples"] == BATCH and r["dropped_nonfinite"] == 0 for r in final)
    first, redo = rows[2], rows[3]
    assert redo["tokens_generated"] == first["tokens_generated"]
    assert redo["reward_pm"] == pytest.approx(first["reward_pm"], abs=1e-5)
    assert (run_dir / "policy" / "config.json").exists()


def test_async_run_redoes_a_batch_whose_generator_died_while_learning(ray_cluster, tiny_pm, tmp_path):
    """Async mode keeps one weights version: a generation worker killed while the learners
    train (the next batch being made with the version before) is replaced at the weight
    sync, and that batch is produced again with the new weights, at staleness 0."""
    import ray

    batch = 8
    cfg = tiny_config(**{"model.pm": tiny_pm, "ppo.mode": "async", "ppo.iterations": 3,
                         "ppo.rollout_batch_size": batch, "ppo.minibatch_size": batch,
                         "generation.num_workers": 2, "ppo.num_learners": 1, "ppo.checkpoint_every": 10,
                         "ppo.eval_prompts": 0})
    controller = RLHFController(cfg, tmp_path)
    killed = []

    def inject(phase, i):
        if (phase, i) == ("learn", 1) and not killed:
            killed.append(ray.get(controller.rollouts.pool.workers[0].info.remote())["pid"])
            os.kill(killed[0], signal.SIGKILL)

    run_injected(controller, inject)
    rows = read_metrics(tmp_path, "ppo")
    assert len(killed) == 1 and [r["step"] for r in rows] == [1, 2, 3]
    assert rows[2]["staleness"] == 0  # batch 2 redone after the sync, with version 2
    assert [r["restarts_generation_total"] for r in rows] == [0, 1, 1]
    assert all(r["samples"] == batch for r in rows)


# ---------------------------------------------------------------- the channel actor restarts

class Gate:
    """A channel whose `get` waits until the gate is open: holds a reader back while the test
    kills the channel actor under it."""

    def __init__(self, channel):
        self.channel, self.open = channel, threading.Event()
        self.open.set()

    def put(self, item):
        return self.channel.put(item)

    def get(self, *args, **kwargs):
        self.open.wait()
        return self.channel.get(*args, **kwargs)


class CountingWorker:
    """Runs `train` (blocking on `hold[iteration]` if set), and records every run."""

    def __init__(self):
        self.calls, self.hold, self.started = [], {}, threading.Event()

    def ready(self):
        return {"pids": [os.getpid()]}

    def train(self, iteration):
        self.started.set()
        if iteration in self.hold:
            self.hold[iteration].wait(60)
        self.calls.append(iteration)
        return {"trained": iteration}


def kill_channel_actor(queue) -> None:
    """SIGKILL the queue actor's process; returns once its restarted successor answers."""
    before = queue.start_id()
    os.kill(queue.pid(), signal.SIGKILL)
    while queue.start_id() == before:  # a call during the restart waits for the new actor
        time.sleep(0.1)


def wait_until(condition, what: str, timeout_s: float = 60) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_channel_actor_restart_loses_no_command_and_runs_none_twice(ray_cluster):
    """The queue actor SIGKILLed (1) with a command queued that no worker took, (2) with an answer
    queued that the controller did not take, (3) while the worker runs the command: each time the
    controller sends it again, and the worker answers it once and runs it once."""
    from actors.rollout_queue import RolloutQueue
    from learners.transport import CommandClient, serve_commands

    queue = RolloutQueue(maxsize=2)
    commands, results = Gate(queue.channel("learner-0-commands")), queue.channel("learner-results")
    client_results = Gate(results)
    worker = CountingWorker()
    commands.open.clear()  # the worker announces itself, then waits at the gate
    serving = threading.Thread(target=serve_commands, args=(worker, commands, results, 0, 1), daemon=True)
    serving.start()
    client = CommandClient([queue.channel("learner-0-commands")], client_results, timeout_s=120)
    client.wait_ready()
    calls = ThreadPoolExecutor(max_workers=1)
    try:
        # (1) the command is lost with the actor: no worker had taken it
        answer = calls.submit(client.call, "train", iteration=1)
        wait_until(lambda: not commands.channel.empty(), "the command to be queued")
        kill_channel_actor(queue)
        wait_until(lambda: client.resent == 1, "the command to be sent again")
        commands.open.set()
        assert answer.result(60) == {"trained": 1}

        # (2) the answer is lost with the actor: the controller had not taken it
        client_results.open.clear()
        answer = calls.submit(client.call, "train", iteration=2)
        wait_until(lambda: not results.empty(), "the answer to be queued")
        kill_channel_actor(queue)
        client_results.open.set()
        assert answer.result(60) == {"trained": 2}  # answered again from the worker's memory
        assert client.resent == 2

        # (3) the actor dies while the worker runs the command (both ends wait on it, retried)
        worker.hold[3], worker.started = threading.Event(), threading.Event()
        answer = calls.submit(client.call, "train", iteration=3)
        wait_until(worker.started.is_set, "the worker to start the command")
        kill_channel_actor(queue)
        wait_until(lambda: client.resent == 3, "the command to be sent again")
        worker.hold[3].set()
        assert answer.result(60) == {"trained": 3}
        assert client.call("train", iteration=4) == {"trained": 4}  # the repeated answer to 3 is discarded
        assert worker.calls == [1, 2, 3, 4]  # each run once
        assert queue.restarts == 3
        client.stop()
        serving.join(30)
        assert not serving.is_alive()
    finally:
        commands.open.set()
        client_results.open.set()
        calls.shutdown(wait=False)
        queue.shutdown()


def test_a_batch_lost_with_the_queue_actor_is_taken_from_the_producers_ref(ray_cluster):
    import ray

    from actors.rollout_queue import ChannelRestarted, RolloutQueue
    from hh_ray.orchestration.rollouts import RolloutProducer

    queue = RolloutQueue(maxsize=2)
    try:
        producer = object.__new__(RolloutProducer)  # only its queue side
        producer.queue, producer.queued = queue, {}
        for i in (0, 1):
            ref = ray.put(f"batch-{i}")
            producer.queued[i] = (ref, queue.put(ref))
        assert ray.get(producer.take(0)) == "batch-0"  # through the queue
        since = producer.queued[1][1]
        kill_channel_actor(queue)
        with pytest.raises(ChannelRestarted):
            queue.get(timeout=5, since=since)
        assert queue.qsize() == 0 and ray.get(producer.take(1)) == "batch-1"  # the producer's own ref
        ref = ray.put("batch-2")
        producer.queued[2] = (ref, queue.put(ref))
        assert ray.get(producer.take(2)) == "batch-2" and queue.restarts == 1 and not producer.queued
    finally:
        queue.shutdown()


# ---------------------------------------------------------------- cells of the fault matrix (bench/bench_faults.py)

SUBSET = "generation@score@0,pm@generate@1,channel@score@1,channel@learn@2,driver@checkpoint@2"


@pytest.fixture(scope="module")
def matrix_subset(ray_cluster, tiny_pm, tmp_path_factory):
    """One run of `hh-ray train-ppo` (a driver subprocess on the session's cluster) through the
    fault matrix's code, with one kill per cell, each in its own phase: a generation worker as
    iteration 0 starts scoring, the PM service as iteration 1 starts generating, the channel
    actor once iteration 1's batch is queued (the entry is lost) and once iteration 2's train
    command is sent (the command or its answer is lost), and the driver itself as iteration 2
    starts its checkpoint; then `--resume`."""
    from bench.bench_faults import Kill, run_cell

    kills = [Kill.parse(k) for k in SUBSET.split(",")]
    address = ray_cluster.get_runtime_context().gcs_address
    return run_cell(kills, "sync", tiny_pm, tmp_path_factory.mktemp("matrix"), address)


def test_fault_matrix_cells_lose_and_duplicate_no_rollout(matrix_subset):
    r = matrix_subset
    print({k: v for k, v in r.items() if k != "log_tail"})
    assert r["exit_codes"] == [-signal.SIGKILL, 0], r.get("log_tail")  # the driver died, the resume ended
    assert [k["component"] for k in r["killed"]] == ["generation", "pm", "channel", "channel", "driver"]
    log = "\n".join(r["recovery"])
    assert "taking batch 1 from the producer's own ref" in log and "sending 'train' (seq" in log
    # step 3 was logged, then the driver died before its checkpoint: the resume redid it from step 2's
    assert r["steps_logged"] == [1, 2, 3, 3, 4] and r["faults"] == ["resume"]
    assert r["lost"] == 0 and r["duplicated"] == 0 and r["replaced"] == 0 and r["trained_batches"] == 4
    # every restart in the metrics (a resumed run carries the counts of its checkpoint)
    assert r["restarts"] == {"generation": 1, "pm": 1, "learner": 0, "channel": 2, "driver": 1}
    assert r["recorded"] and r["survived"] and r["policy_written"]
