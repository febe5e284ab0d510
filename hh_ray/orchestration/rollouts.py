"""The rollout side of the loop: draw prompts -> generate (vLLM actors) -> score (PM
service) -> rollout queue, with dead actors replaced, and the weight sync into
the generators. `Prefetch` makes the next batch while the learners train (async mode).

All randomness is derived from (seed, iteration), so a batch produced again
(after an actor died, or after a roll-back) holds the same prompts and samples.
The producer keeps each batch's ref until the controller takes it (`take`): an
entry lost with a restarted queue actor is taken from there, the batch itself.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import ray
import torch

from actors.generation import GenerationPool, IncompleteWeightsError, stop_hung
from actors.pm_service import start_pm_scorer
from actors.rollout_queue import ChannelRestarted, RolloutQueue
from hh_ray.config import Config, parse_resources
from hh_ray.conversation import prompt_token_ids
from hh_ray.prompt_stream import PromptStream
from hh_ray.rollout import drop_nonfinite
from hh_ray.runtime import derive_seed, gpus_for
from learners.transport import LearnerError, LearnerGroupRestarted


def sample_rows(batch, n: int, learners: int) -> list[dict]:
    """n rollouts of a scored batch as rows for samples.jsonl: the first rows of learner rank 0's
    shard, which adds their KL. `reward` is the PM score less the truncation penalty, if any:
    what PPO maximises."""
    return [{"index": i, "prompt": batch.prompts[i], "response": batch.responses[i],
             "finish_reason": batch.finish_reasons[i], "reward": float(batch.pm_score[i]),
             "policy_version": int(batch.policy_version[i])} for i in batch.shard_rows(0, learners)[:n]]


class WeightsLost(RuntimeError):
    """The weights being synced are gone with their owner, the learner group's rank 0."""


class RolloutProducer:
    """Generation workers, the PM service and the queue they fill, for the whole run.

    `restarts` (the run's counters, shared with the controller) counts the actors replaced."""

    def __init__(self, cfg: Config, policy_path: str, pm_path: str, tokenizer, stream: PromptStream,
                 queue: RolloutQueue, restarts: dict, conversation_format: str, pm_autocast: str):
        """`pm_autocast`: the PM service's setting as the config gave it ('auto' is resolved by the
        service on its own device; cfg.ppo.autocast holds the learners' resolved one)."""
        self.cfg, self.pm_path, self.tokenizer, self.stream = cfg, pm_path, tokenizer, stream
        self.pm_autocast = pm_autocast
        self.queue, self.restarts, self.format = queue, restarts, conversation_format
        # The engines start while the PM service and the learners do; `wait_ready` before use.
        self.pool = GenerationPool(policy_path, cfg.generation, cfg.model.max_seq_len, cfg.model.dtype, cfg.seed,
                                   conversation_format=conversation_format, wait=False)
        self.scorer = self._start_scorer()
        # The version the generators hold and its weights, so a revived generator can load
        # them (version 0: a fresh generator's own; None: not held, see drop_weights; a
        # broadcast sync holds none). `fetch_weights() -> ObjectRef` asks the learners for
        # them again (the controller sets it; from the main thread only: the learners take
        # one command at a time).
        self.weights: tuple[int, object] = (0, None)
        self.fetch_weights = None
        self._lock = threading.Lock()  # weight sync vs. reviving a generator from the prefetch thread
        # iteration -> (its batch's ref, start id of the queue actor that holds it), until taken:
        # a batch whose queue entry a restarted queue actor lost is taken from here.
        self.queued: dict[int, tuple[ray.ObjectRef, str]] = {}

    def wait_ready(self) -> None:
        """Block until the engines and the PM service are up (generation.timeout_s is for their work)."""
        self.pool.wait_ready()
        ray.get(self.scorer.placement.remote())

    def _start_scorer(self):
        c = self.cfg
        gpus = gpus_for(c.ppo.pm_service_gpus, ray.cluster_resources().get("GPU", 0), 1)
        return start_pm_scorer(self.pm_path, c.model.max_seq_len, c.model.dtype, num_cpus=c.ppo.pm_service_cpus,
                               num_gpus=gpus, resources=parse_resources(c.ppo.pm_service_resources, "ppo.pm_service_resources"),
                               autocast=self.pm_autocast, conversation_format=self.format)

    def placement(self) -> dict:
        """Node (and GPUs) of every generation worker and of the PM service."""
        return {"generation": [{k: i[k] for k in ("node_id", "gpus", "pid", "malloc")} for i in self.pool.infos()],
                "pm": ray.get(self.scorer.placement.remote())}

    # ---- one batch

    def produce(self, iteration: int, on_phase=None, may_fetch: bool = True) -> dict:
        """Produce batch `iteration` into the queue; a generation worker or the PM service
        that dies meanwhile is replaced and the batch produced again (same seeds).
        `may_fetch`: the learners are idle, so weights for a revived generator may be fetched."""
        revived = {"generation": 0, "pm": 0}
        for attempt in range(self.cfg.ppo.max_actor_restarts + 1):
            try:
                return {**self._produce(iteration, on_phase or (lambda *a: None)),
                        "restarts_generation": revived["generation"], "restarts_pm": revived["pm"]}
            except ray.exceptions.RayActorError as e:
                if attempt == self.cfg.ppo.max_actor_restarts:
                    raise
                for k, v in self.replace_dead(e, may_fetch).items():
                    revived[k] += v

    def _produce(self, iteration: int, on_phase) -> dict:
        g = self.cfg.generation
        n = self.cfg.ppo.rollout_batch_size // g.samples_per_prompt  # prompts; each answered samples_per_prompt times
        prompts = self.stream.take(iteration * n, n)
        ids = prompt_token_ids(prompts, self.tokenizer, self.format)
        on_phase("generate", iteration)
        t0 = time.time()
        batch = self.pool.generate(ids, prompts, g.max_new_tokens, g.temperature, g.top_p,
                                   seed=derive_seed(self.cfg.seed, "rollouts", iteration) % 2**31,
                                   n=g.samples_per_prompt)
        if g.samples_per_prompt > 1:
            batch.group = torch.arange(n).repeat_interleave(g.samples_per_prompt)
        t1 = time.time()
        on_phase("score", iteration)
        scores = torch.tensor(self._score(batch))
        t2 = time.time()
        # The reward the policy gets: the PM score, less the optional penalty for a response cut
        # at the token cap (ppo.truncation_penalty) so that ending the turn pays.
        batch.pm_score = scores - self.cfg.ppo.truncation_penalty * (~batch.ended).float()
        batch, dropped = drop_nonfinite(batch, self.cfg.ppo.num_learners)  # equal learner shards
        ref = ray.put(batch)
        self.queued[iteration] = (ref, self.queue.put(ref))
        kept = torch.isfinite(scores)
        return {"time_generate": t1 - t0, "time_score": t2 - t1, "dropped_nonfinite": dropped,
                "reward_pm": float(scores[kept].mean()), "reward_pm_std": float(scores[kept].std()),
                "response_length": float(batch.response_lengths.float().mean()),
                "ended_fraction": float(batch.ended.float().mean()),
                "tokens_generated": int(batch.response_lengths.sum()), "samples": len(batch),
                "tokens_sequences": int(batch.attention_mask.sum()), "max_sequence_tokens": batch.input_ids.shape[1],
                "logged_samples": sample_rows(batch, self.cfg.ppo.log_samples, self.cfg.ppo.num_learners)}

    def _score(self, batch) -> list[float]:
        """The PM's scores of the batch; a PM service past generation.timeout_s is stopped as hung, and
        its call then fails as a dead actor's (produce replaces it)."""
        ref, limit = self.scorer.score.remote(batch.prompts, batch.responses), self.cfg.generation.timeout_s
        try:
            return ray.get(ref, timeout=limit or None)
        except ray.exceptions.GetTimeoutError:
            stop_hung(self.scorer, "the PM service", f"{len(batch)} transcript(s)", limit)
            return ray.get(ref)

    def take(self, iteration: int) -> ray.ObjectRef:
        """Batch `iteration`'s ref out of the queue. If the queue actor restarted since the batch
        was put (its entry is lost), the ref kept here: the same samples, none lost or doubled."""
        ref, since = self.queued.pop(iteration)
        while True:
            try:
                got = self.queue.get(timeout=1800, since=since)
            except ChannelRestarted as e:
                print(f"{e}; taking batch {iteration} from the producer's own ref", flush=True)
                return ref
            if got == ref:
                return ref
            # a batch of an iteration abandoned before it was taken: dropped

    def score_heldout(self, prompts: list[str]) -> tuple[float, float]:
        """(mean PM reward, mean response length) of one sample per prompt, the same seeds every time;
        a dead generation worker or PM service is replaced first, as in `produce`."""
        g = self.cfg.generation
        ids = prompt_token_ids(prompts, self.tokenizer, self.format)
        for attempt in range(self.cfg.ppo.max_actor_restarts + 1):
            try:
                batch = self.pool.generate(ids, prompts, g.max_new_tokens, g.temperature, g.top_p,
                                           seed=derive_seed(self.cfg.seed, "heldout") % 2**31)
                scores = torch.tensor(self._score(batch))
                return float(scores.mean()), float(batch.response_lengths.float().mean())
            except ray.exceptions.RayActorError as e:
                if attempt == self.cfg.ppo.max_actor_restarts:
                    raise
                self.replace_dead(e, may_fetch=True)

    # ---- faults and weights

    def replace_dead(self, error: Exception, may_fetch: bool) -> dict:
        """`revive` with the current weights, fetched from the learners if none are held and
        `may_fetch` (they are idle); without them, `error` is raised (Prefetch redoes the batch)."""
        version, ref = self.weights
        if ref is None and version and may_fetch and self.fetch_weights is not None:
            self.weights = version, ref = version, self.fetch_weights()[0]
        if ref is None and version:
            raise error  # no weights to revive a generator with while the learners train
        return self.revive(error)

    def revive(self, error: Exception) -> dict:
        """Replace dead generation workers and a dead PM service; returns how many of each."""
        with self._lock:
            gen = self.pool.revive(*self.weights)
        pm = 0
        try:
            ray.get(self.scorer.score.remote([], []), timeout=300)
        except ray.exceptions.RayActorError:
            self.scorer = self._start_scorer()
            ray.get(self.scorer.placement.remote())  # up before its first batch counts against its timeout
            pm = 1
        if not gen and not pm:
            raise error  # nothing died: the error is not ours to absorb
        self.restarts["generation"] += gen
        self.restarts["pm"] += pm
        print(f"actor failure ({type(error).__name__}): replaced {gen} generation worker(s), {pm} PM service(s)",
              flush=True)
        return {"generation": gen, "pm": pm}

    def sync_weights(self, version: int, weights_ref=None, send=None) -> dict:
        """Every generator holds `version` after: it loads `weights_ref` (object store), or
        `send(workers)` broadcasts it into them (the learners' `broadcast`). A generator that
        died is replaced (a fresh engine, which the retried broadcast brings to `version`).
        Returns what `send` reported."""
        with self._lock:
            self.weights = (version, weights_ref)
            for attempt in range(self.cfg.ppo.max_actor_restarts + 1):
                try:
                    if send is None:
                        self.pool.update_weights(version, weights_ref)  # waits for an in-flight generation
                        return {}
                    report = send(self.pool.workers)
                    self.pool.check_versions(version, report["versions"])
                    return report
                except ray.exceptions.ObjectLostError as e:
                    raise WeightsLost(f"policy version {version} was lost with the learner that published it") from e
                except (ray.exceptions.RayActorError, LearnerError) as e:
                    if isinstance(e, LearnerGroupRestarted) or attempt == self.cfg.ppo.max_actor_restarts:
                        raise
                    # a broadcast's generators start fresh, then take the retried broadcast
                    replaced = self.pool.revive(*(self.weights if send is None else (0, None)))
                    if not replaced:
                        raise  # no generator died: not ours to absorb
                    self.restarts["generation"] += replaced
                    print(f"generation worker died during the weight sync to version {version}: replaced "
                          f"{replaced}, syncing again", flush=True)

    def drop_weights(self) -> None:
        """Let the generators' current weights go while the learners train, so the object
        store puts the next version where they were instead of in new pages (0.5 GB in the
        learner and in every generator, which map them). A generator that dies before the
        next sync cannot be revived with them: its batch is produced again after the sync."""
        self.weights = (self.weights[0], None)

    def drain(self) -> None:
        """Drop the queued batches (of iterations abandoned by a roll-back)."""
        self.queued.clear()
        while self.queue.qsize():
            self.queue.get(timeout=60)

    def shutdown(self) -> None:
        self.pool.shutdown()
        ray.kill(self.scorer)


class Prefetch:
    """Async mode: batch i+1 is generated with version i while the learners train on batch i
    (staleness 1). In sync mode nothing runs ahead and `take` produces the batch itself."""

    def __init__(self, producer: RolloutProducer, enabled: bool, on_phase):
        self.producer, self.enabled, self.on_phase = producer, enabled, on_phase
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-prefetch")
        self.pending: tuple[int, Future] | None = None

    def take(self, iteration: int) -> dict:
        """Batch `iteration` in the queue: the one made meanwhile, or made now. If an actor died
        while it was made, or a generator was left without complete weights by a weight sync cut
        off meanwhile (the sync was redone since), it is produced again now (staleness 0)."""
        pending, self.pending = self.pending, None
        if pending is None or pending[0] != iteration:
            self.discard(pending)
            return self.producer.produce(iteration, self.on_phase)
        try:
            return pending[1].result()
        except (ray.exceptions.RayActorError, IncompleteWeightsError) as e:
            print(f"batch {iteration} failed while the learners trained ({type(e).__name__}): producing it "
                  f"again with policy version {self.producer.weights[0]}", flush=True)
            return self.producer.produce(iteration, self.on_phase)

    def start(self, iteration: int, last: int) -> None:
        if self.enabled and iteration < last:  # while the learners train: no weights may be fetched from them
            self.pending = (iteration, self.executor.submit(self.producer.produce, iteration, self.on_phase, False))

    def discard(self, pending=None) -> None:
        """Let a batch being made finish (or fail); a roll-back drains it from the queue."""
        pending = pending or self.pending
        self.pending = None
        if pending is not None:
            pending[1].exception()

    def shutdown(self) -> None:
        self.discard()
        self.executor.shutdown()
