"""The learner side of `generation.weight_sync: broadcast` (the generators' side is
actors/weight_transfer.py).

Learner rank 0 is the sender: it hosts the group's rendezvous, asks every generation
worker to join (rank 1 + k·tensor_parallel_size for worker k), then for each sync
broadcasts the policy's tensors in buckets while the workers receive them into their
engines, and finally hears back the version each worker holds. The group is formed
again whenever its members change (a generator revived) or it broke (a failed
collective, a restarted learner). It follows the shape of vLLM's trainer-side engines
(`trainer_init`, `send_weights`) but imports no vLLM: the learner processes stay small.
"""

from __future__ import annotations

import threading
import time

import ray
import torch

from hh_ray.weights import join_group, rendezvous, send_weights, tensor_specs

TIMEOUT_S = 300.0


class WeightSyncError(Exception):
    """A broadcast that failed on the generators' side (one died, or could not join). Not a
    RuntimeError on purpose: the learner transport takes those from a collective for a dead
    learner peer, and the learner group must not restart for a generator."""


class WeightGroupUnavailable(WeightSyncError):
    """The broadcast group could not form (a generator or rank 0 could not join): with
    weight_sync=auto the controller falls back to the object store."""


class WeightBroadcaster:
    """Held by learner rank 0 for the whole run."""

    def __init__(self, device: torch.device, tensor_parallel_size: int = 1, bucket_bytes: int = 64 << 20):
        self.device, self.tp, self.bucket_bytes = device, tensor_parallel_size, bucket_bytes
        self.group = self.store = None
        self.members: list | None = None
        self.backend = "gloo"

    def choose_backend(self, workers: list) -> str:
        """NCCL between GPUs; gloo from a CPU learner (the generators then copy into their device),
        or when a generator shares the learner's GPU (NCCL refuses two ranks on one device)."""
        if self.device.type != "cuda":
            return "gloo"
        mine = str(torch.cuda.get_device_properties(self.device).uuid)
        theirs = [set(u) for u in ray.get([w.gpu_uuids.remote() for w in workers], timeout=TIMEOUT_S)]
        return "nccl" if all(u and mine not in u for u in theirs) else "gloo"

    def connect(self, workers: list) -> float:
        """Form the group with `workers` (generation actor handles); returns seconds."""
        t0 = time.perf_counter()
        self.close()
        self.backend = self.choose_backend(workers)
        world, host = 1 + self.tp * len(workers), ray.util.get_node_ip_address()
        store = rendezvous(host, 0, world, True, TIMEOUT_S)
        info = {"host": host, "port": store.port, "world_size": world, "backend": self.backend, "timeout_s": TIMEOUT_S}
        joins = [w.join_weight_group.remote({**info, "rank_offset": 1 + self.tp * k}) for k, w in enumerate(workers)]
        joined: dict = {}

        def join():  # blocks until every worker has joined too
            try:
                joined["group"] = join_group(store, 0, world, self.backend, TIMEOUT_S)
            except BaseException as e:  # noqa: BLE001 - raised below, in the caller's thread
                joined["error"] = e

        thread = threading.Thread(target=join, daemon=True, name="weight-group-join")
        thread.start()
        try:
            ray.get(joins, timeout=TIMEOUT_S)  # a dead worker raises here, not after the group's timeout
        except Exception as e:
            raise WeightGroupUnavailable(f"a generation worker could not join the weight group: {e!r}") from e
        thread.join(TIMEOUT_S)
        if "group" not in joined:
            raise WeightGroupUnavailable(f"weight group: rank 0 could not join: {joined.get('error')!r}")
        self.store, self.group, self.members = store, joined["group"], list(workers)
        return time.perf_counter() - t0

    def send(self, state: dict[str, torch.Tensor], version: int, workers: list) -> dict:
        """Broadcast `state` (the policy's state dict) to `workers`, which hold `version` after.
        Returns {"versions": [...], "bytes": n, "time_connect": s, "time_broadcast": s}."""
        connect = 0.0
        if self.group is None or self.members != list(workers):
            connect = self.connect(workers)
        specs, aliases = tensor_specs(state)
        update = {"specs": specs, "aliases": aliases, "bucket_bytes": self.bucket_bytes}
        t0 = time.perf_counter()
        receiving = [w.receive_weights.remote(version, update) for w in workers]
        try:
            sent = send_weights(self.group, state, specs, self.bucket_bytes, self.device if self.backend == "nccl" else "cpu")
            versions = ray.get(receiving, timeout=TIMEOUT_S)
        except Exception as e:
            self.close()  # a failed collective leaves the group unusable: the next send forms a new one
            raise WeightSyncError(f"weight broadcast of version {version} failed: {e!r}") from e
        return {"versions": versions, "bytes": sent, "time_connect": connect,
                "time_broadcast": time.perf_counter() - t0}

    def close(self) -> None:
        self.group = self.store = self.members = None
