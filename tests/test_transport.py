"""The learner transport's control flow, with in-process channels standing in for the
queue actor's (the real ones run in test_ppo_loop and test_faults)."""

import queue
import threading

import pytest

from learners.transport import (Command, CommandClient, LearnerError, LearnerGroupRestarted, Result, post_fit_ended,
                                serve_commands)


class Channel:
    def __init__(self):
        self.q = queue.Queue()

    def put(self, item):
        self.q.put(item)

    def get(self, timeout=None):
        return self.q.get(timeout=timeout)


class Worker:
    def __init__(self):
        self.calls = []

    def ready(self):
        return {"pids": [1], "placement": ["node-a"]}

    def train(self, iteration):
        self.calls.append(iteration)
        if iteration == 99:
            raise ValueError("bad batch")
        return {"trained": iteration}


def start(worker, commands, results):
    t = threading.Thread(target=serve_commands, args=(worker, commands, results, 0, 1), daemon=True)
    t.start()
    return t


def test_commands_are_answered_in_order_and_errors_carry_the_traceback():
    commands, results, worker = Channel(), Channel(), Worker()
    thread = start(worker, commands, results)
    client = CommandClient([commands], results, timeout_s=10)
    assert client.wait_ready()["placement"] == ["node-a"]
    assert client.call("train", iteration=1) == {"trained": 1}
    with pytest.raises(LearnerError, match=r"(?s)rank 0 failed in 'train'.*ValueError: bad batch") as raised:
        client.call("train", iteration=99)
    assert raised.value.error_type == "ValueError"  # what a caller handling one kind of error reads
    assert client.call("train", iteration=2) == {"trained": 2}  # the worker stayed up
    client.stop()
    thread.join(5)
    assert not thread.is_alive() and worker.calls == [1, 99, 2]


def test_a_late_answer_is_discarded_and_a_restart_is_seen_at_the_next_call():
    commands, results = Channel(), Channel()
    client = CommandClient([commands], results, timeout_s=10)
    results.put(Result(-1, "first", "ready", {"pids": [1]}))
    client.wait_ready()
    # an answer to an older command (seq 0) arrives before the one the client waits for
    results.put(Result(0, "first", "train", {"trained": "stale"}))
    results.put(Result(1, "first", "train", {"trained": "current"}))
    assert client.call("train", iteration=1) == {"trained": "current"}
    # the group restarted meanwhile: its announcement comes before any answer
    results.put(Result(-1, "second", "ready", {"pids": [2]}))
    with pytest.raises(LearnerGroupRestarted) as e:
        client.call("train", iteration=2)
    assert e.value.pids == [2]
    # a late answer of the dead incarnation to the same seq number is not taken for the new one's
    results.put(Result(3, "first", "restore", {"path": "old"}))
    results.put(Result(3, "second", "restore", {"path": "new"}))
    assert client.call("restore") == {"path": "new"}
    sent = [commands.get() for _ in range(3)]
    assert [(c.seq, c.incarnation) for c in sent] == [(1, "first"), (2, "first"), (3, "second")]


def test_a_restarted_worker_ignores_commands_sent_to_the_group_before():
    commands, results, worker = Channel(), Channel(), Worker()
    commands.put(Command(5, "the-dead-group", "train", {"iteration": 5}))
    thread = start(worker, commands, results)
    client = CommandClient([commands], results, timeout_s=10)
    client.wait_ready()
    client.seq = 5
    assert client.call("train", iteration=6) == {"trained": 6}
    client.stop()
    thread.join(5)
    assert worker.calls == [6]


def test_the_end_of_fit_wakes_a_waiting_controller():
    commands, results = Channel(), Channel()
    client = CommandClient([commands], results, timeout_s=10)
    post_fit_ended(results, RuntimeError("worker group failed 3 times"))
    with pytest.raises(RuntimeError, match="stopped while the controller waited.*failed 3 times"):
        client.wait_ready()
