"""The RLHF controller: the paper's PPO loop over Ray actors and the learner group.

    for each iteration:
        draw prompts -> generate (vLLM actors, policy version v) -> score (PM service)
        -> rollout queue -> learn (PPO learner group) -> sync weights v+1 to the generators

Sync mode is on-policy. Async mode generates batch i+1 with version i while
the learners train on batch i (staleness 1, the bound `ppo.max_staleness`
must allow). All randomness is derived from (seed, iteration), so a resumed
run draws the same prompts and samples as an uninterrupted one.

Failures: a dead generation actor or PM service is replaced and the
iteration produced again (same seeds, so the same samples); a learner group
that Ray Train restarted is rolled back, with the generators, to the last
checkpoint, and the iterations since are run again.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
import torch

from actors.generation import GenerationPool
from actors.pm_service import start_pm_scorer
from actors.rollout_queue import RolloutQueue
from hh_ray.checkpoint import latest_checkpoint
from hh_ray.config import Config, ConfigError
from hh_ray.data import load_comparisons, prompts_of, train_eval_split
from hh_ray.models import is_scalar_head_model, load_pm_tokenizer, load_tokenizer, resolve_model
from hh_ray.rollout import drop_nonfinite
from hh_ray.orchestration.cluster import ensure_ray
from hh_ray.tracking import Tracker
from learners.ppo_learner import LearnerGroupRestarted, PPOLearnerGroup

# ---------------------------------------------------------------- checks before any actor starts

def resolve_paths(cfg: Config) -> tuple[str, str]:
    """(policy folder, PM folder), or a clear error."""
    policy = resolve_model(cfg.model.policy, cfg.model.cache_dir)
    if not cfg.model.pm:
        raise ConfigError("model.pm: no preference model given; train one with `hh-ray train-pm` "
                          "and pass its folder (…/pm)")
    pm = resolve_model(cfg.model.pm, cfg.model.cache_dir)
    if Path(pm).exists() and not is_scalar_head_model(pm):
        raise ConfigError(f"model.pm: {pm} is not a trained PM (its config.json has no ForSequenceClassification "
                          "architecture); train one with `hh-ray train-pm`")
    return policy, pm


def check_config(cfg: Config, policy: str, pm: str) -> None:
    p = cfg.ppo
    n = p.num_learners
    if p.rollout_batch_size % n or p.minibatch_size % n:
        raise ConfigError(f"ppo.rollout_batch_size ({p.rollout_batch_size}) and ppo.minibatch_size "
                          f"({p.minibatch_size}) must both divide by ppo.num_learners ({n})")
    if p.rollout_batch_size % p.minibatch_size:
        raise ConfigError(f"ppo.rollout_batch_size ({p.rollout_batch_size}) must divide by "
                          f"ppo.minibatch_size ({p.minibatch_size})")
    if p.mode not in ("sync", "async"):
        raise ConfigError(f"ppo.mode: {p.mode!r} is not 'sync' or 'async'")
    if p.mode == "async" and p.max_staleness < 1:
        raise ConfigError("ppo.mode=async generates batch i+1 with version i: ppo.max_staleness must be >= 1")
    if cfg.generation.max_new_tokens >= cfg.model.max_seq_len:
        raise ConfigError(f"generation.max_new_tokens ({cfg.generation.max_new_tokens}) leaves no room for a "
                          f"prompt within model.max_seq_len ({cfg.model.max_seq_len})")
    if p.critic_init == "pm":
        # The critic reads the policy's token ids, so the PM it starts from must share the vocabulary.
        pol, pmv = load_tokenizer(policy).get_vocab(), load_pm_tokenizer(pm).get_vocab()
        differ = [t for t, i in pol.items() if pmv.get(t) != i]
        if differ:
            raise ConfigError(f"ppo.critic_init=pm, but the PM's tokenizer ({pm}) differs from the policy's "
                              f"({policy}) in {len(differ)} tokens (e.g. {differ[0]!r}); use a PM trained on the "
                              "policy's backbone, or ppo.critic_init=policy")
    elif p.critic_init != "policy":
        raise ConfigError(f"ppo.critic_init: {p.critic_init!r} is not 'pm' or 'policy'")


# ---------------------------------------------------------------- prompts

class PromptStream:
    """An endless, epoch-shuffled stream of prompts; position k is the same in every run with this seed."""

    def __init__(self, prompts: list[str], seed: int):
        self.prompts, self.seed = prompts, seed

    def take(self, start: int, n: int) -> list[str]:
        out = []
        for k in range(start, start + n):
            epoch, i = divmod(k, len(self.prompts))
            order = list(range(len(self.prompts)))
            random.Random(self.seed * 7919 + epoch).shuffle(order)
            out.append(self.prompts[order[i]])
        return out


def load_prompts(cfg: Config, tokenizer) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts), keeping those that fit the context with a full response."""
    comparisons = load_comparisons(cfg.data.source, cfg.data.data_dir, cfg.data.split, cfg.data.skip_bad,
                                   cfg.data.num_synthetic, cfg.seed)
    if cfg.data.eval_split:
        train = comparisons
        held_out = load_comparisons(cfg.data.source, cfg.data.data_dir, cfg.data.eval_split, cfg.data.skip_bad)
    else:
        train, held_out = train_eval_split(comparisons, cfg.data.eval_fraction, cfg.seed)
    room = cfg.model.max_seq_len - cfg.generation.max_new_tokens

    def fits(ps):
        return [p for p, ids in zip(ps, tokenizer(ps, add_special_tokens=False)["input_ids"]) if 0 < len(ids) <= room]

    train_p, eval_p = fits(prompts_of(train)), fits(prompts_of(held_out))[: cfg.ppo.eval_prompts]
    if not train_p:
        raise ConfigError(f"no training prompt fits in model.max_seq_len - generation.max_new_tokens = {room} tokens")
    return train_p, eval_p


# ---------------------------------------------------------------- the loop

def reward_sqrt_kl_table(rows: list[dict]) -> str:
    lines = [f"{'iter':>4} {'PM reward':>10} {'KL':>8} {'sqrt KL':>8} {'total':>8} {'resp len':>8} {'s/iter':>7}"]
    for r in rows:
        lines.append(f"{r['step']:>4} {r['reward_pm']:>10.4f} {r['kl']:>8.4f} {r['sqrt_kl']:>8.4f} "
                     f"{r['reward_total']:>8.4f} {r['response_length']:>8.1f} {r['time_iteration']:>7.1f}")
    return "\n".join(lines)


class RLHFController:
    """Holds the actors for the whole run and runs the paper's loop."""

    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        policy, pm = resolve_paths(cfg)
        check_config(cfg, policy, pm)
        self.policy_path, self.pm_path = policy, pm
        self.tokenizer = load_tokenizer(policy)
        self.train_prompts, self.eval_prompts = load_prompts(cfg, self.tokenizer)
        self.stream = PromptStream(self.train_prompts, cfg.seed)

        ckpt = latest_checkpoint(self.run_dir / "checkpoints") if resume else None
        if resume and ckpt is None:
            print(f"no checkpoint in {self.run_dir / 'checkpoints'}: starting from iteration 0")
        self.state = json.loads((ckpt / "controller_state.json").read_text()) if ckpt else \
            {"iteration": 0, "policy_version": 0, "prompt_position": 0, "seed": cfg.seed}
        self.state.setdefault("restarts", {"generation": 0, "pm": 0, "learner": 0})
        self.tracker = Tracker(self.run_dir, cfg, "ppo")
        self.on_phase = None  # optional hook(phase, iteration), called as each phase starts (fault-injection tests)
        self._lock = threading.Lock()  # weight sync vs. reviving a dead generator from the producer thread
        self._start_actors(ckpt)

    def _start_actors(self, ckpt: Path | None) -> None:
        cfg = self.cfg
        ensure_ray()
        t0 = time.time()
        self.pool = GenerationPool(self.policy_path, cfg.generation, cfg.model.max_seq_len, cfg.model.dtype, cfg.seed)
        self.scorer = self._start_scorer()
        self.queue = RolloutQueue(maxsize=1 + cfg.ppo.max_staleness)
        critic = self.pm_path if cfg.ppo.critic_init == "pm" else self.policy_path
        self.learners = PPOLearnerGroup(cfg, str(ckpt / "policy") if ckpt else self.policy_path,
                                        str(ckpt / "critic") if ckpt else critic, self.policy_path,
                                        self.run_dir, self.queue, resume_from=ckpt)
        # The version the generators hold and its weights, so a revived generator can load
        # them (version 0: a fresh generator's own).
        initial = self.learners.take_initial_weights()[0]
        self.weights = (self.state["policy_version"], initial if ckpt else None)
        if ckpt:  # generators start from the initial policy; bring them to the checkpoint's version
            self.pool.update_weights(*self.weights)
        print(f"actors ready in {time.time() - t0:.1f}s: {cfg.generation.num_workers} generation worker(s), "
              f"PM service, {cfg.ppo.num_learners} learner(s)", flush=True)

    def _start_scorer(self):
        return start_pm_scorer(self.pm_path, self.cfg.model.max_seq_len, self.cfg.model.dtype,
                               num_cpus=self.cfg.ppo.pm_service_cpus, autocast=self.cfg.ppo.autocast)

    # ---- fault tolerance: dead actors are replaced, the learner group rolls back

    def _phase(self, name: str, iteration: int) -> None:
        if self.on_phase is not None:
            self.on_phase(name, iteration)

    def _revive_actors(self, error: Exception) -> dict:
        """Replace dead generation workers and a dead PM service; returns how many of each."""
        with self._lock:
            gen = self.pool.revive(*self.weights)
        pm = 0
        try:
            ray.get(self.scorer.score.remote([], []), timeout=300)
        except ray.exceptions.RayActorError:
            self.scorer = self._start_scorer()
            pm = 1
        if not gen and not pm:
            raise error  # nothing died: the error is not ours to absorb
        self.state["restarts"]["generation"] += gen
        self.state["restarts"]["pm"] += pm
        print(f"actor failure ({type(error).__name__}): replaced {gen} generation worker(s), {pm} PM service(s)",
              flush=True)
        return {"generation": gen, "pm": pm}

    def sync_weights(self, version: int, weights_ref) -> None:
        with self._lock:
            self.weights = (version, weights_ref)
            for attempt in range(self.cfg.ppo.max_actor_restarts + 1):
                try:
                    self.pool.update_weights(version, weights_ref)  # waits for an in-flight generation
                    return
                except ray.exceptions.RayActorError:
                    if attempt == self.cfg.ppo.max_actor_restarts:
                        raise
                    self.state["restarts"]["generation"] += self.pool.revive(*self.weights)

    def roll_back(self, error: Exception) -> None:
        """The learner group restarted from scratch (`error`: its LearnerGroupRestarted): restore
        the last checkpoint (or the run's start) in it, in the controller and in the generators."""
        ckpt = latest_checkpoint(self.run_dir / "checkpoints")
        restarts = self.state["restarts"]
        restarts["learner"] += 1
        if ckpt is not None:
            weights = self.learners.restore(ckpt)[0]
            self.state = {**json.loads((ckpt / "controller_state.json").read_text()), "restarts": restarts}
        else:  # no checkpoint yet: the restarted group holds the weights the run started with
            weights = error.weights[0]
            self.state = {**self.initial_state, "restarts": restarts}
        while self.queue.qsize():  # rollouts of the abandoned iterations
            self.queue.get(timeout=60)
        self.sync_weights(self.state["policy_version"], weights)
        print(f"learner group restarted ({error}); rolled back to iteration {self.state['iteration']} "
              f"from {ckpt or 'the start of the run'}", flush=True)
        self.tracker.log(self.state["iteration"], {"what": "learner_restart", "checkpoint": str(ckpt or "")},
                         stage="ppo_fault")

    # ---- one rollout batch: draw prompts -> generate -> score -> queue
    def produce(self, iteration: int) -> dict:
        """Produce one batch; a generation worker or PM service that dies meanwhile is
        replaced and the iteration's prompts are generated again (same seeds)."""
        revived = {"generation": 0, "pm": 0}
        for attempt in range(self.cfg.ppo.max_actor_restarts + 1):
            try:
                out = self._produce(iteration)
                return {**out, "restarts_generation": revived["generation"], "restarts_pm": revived["pm"]}
            except ray.exceptions.RayActorError as e:
                if attempt == self.cfg.ppo.max_actor_restarts or self.weights[1] is None and self.weights[0]:
                    raise  # no weights to revive a generator with while the learners train: see run()
                for k, v in self._revive_actors(e).items():
                    revived[k] += v

    def _produce(self, iteration: int) -> dict:
        cfg, n = self.cfg, self.cfg.ppo.rollout_batch_size
        prompts = self.stream.take(iteration * n, n)
        ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        self._phase("generate", iteration)
        t0 = time.time()
        batch = self.pool.generate(ids, prompts, cfg.generation.max_new_tokens, cfg.generation.temperature,
                                   cfg.generation.top_p, seed=cfg.seed * 1_000_003 + iteration * n)
        t1 = time.time()
        self._phase("score", iteration)
        batch.pm_score = torch.tensor(ray.get(self.scorer.score.remote(batch.prompts, batch.responses)))
        t2 = time.time()
        batch, dropped = drop_nonfinite(batch)
        self.queue.put(ray.put(batch))
        return {"time_generate": t1 - t0, "time_score": t2 - t1, "dropped_nonfinite": dropped,
                "reward_pm": float(batch.pm_score.mean()), "reward_pm_std": float(batch.pm_score.std()),
                "response_length": float(batch.response_lengths.float().mean()),
                "tokens_generated": int(batch.response_lengths.sum()), "samples": len(batch)}

    def _produced(self, pending, iteration: int) -> dict:
        """The batch produced while the learners trained (async mode), or, if an actor died
        meanwhile, the batch produced again now, with the actors replaced and the weights
        synced since (so at staleness 0)."""
        try:
            return pending.result()
        except ray.exceptions.RayActorError as e:
            print(f"actor failure while the learners trained ({type(e).__name__}): producing batch "
                  f"{iteration} again with policy version {self.weights[0]}", flush=True)
            return self.produce(iteration)

    def evaluate(self, step: int) -> float:
        """Mean PM reward of one sampled response per held-out prompt (same seeds every time)."""
        if not self.eval_prompts:
            return float("nan")
        ids = self.tokenizer(self.eval_prompts, add_special_tokens=False)["input_ids"]
        batch = self.pool.generate(ids, self.eval_prompts, self.cfg.generation.max_new_tokens,
                                   self.cfg.generation.temperature, self.cfg.generation.top_p, seed=10**9 + self.cfg.seed)
        reward = float(torch.tensor(ray.get(self.scorer.score.remote(batch.prompts, batch.responses))).mean())
        self.tracker.log(step, {"reward_pm_heldout": reward, "response_length": float(batch.response_lengths.float().mean())},
                         stage="ppo_eval")
        return reward

    def checkpoint(self) -> None:
        it = self.state["iteration"]
        self.learners.checkpoint(self.run_dir / "checkpoints" / f"iter-{it}", dict(self.state))

    def run(self) -> dict:
        cfg = self.cfg
        self.initial_state = dict(self.state)
        reward_before = self.evaluate(self.state["iteration"]) if self.state["iteration"] == 0 else None
        history = {}
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-producer")
        pending = None  # async mode: the production of the next batch, running meanwhile
        while self.state["iteration"] < cfg.ppo.iterations:
            i = self.state["iteration"]
            t_iter = time.time()
            produced = self._produced(pending, i) if pending else self.produce(i)
            batch_ref = self.queue.get(timeout=1800)
            if cfg.ppo.mode == "async" and i + 1 < cfg.ppo.iterations:
                pending = pool.submit(self.produce, i + 1)  # generated with version i while we learn on i
            else:
                pending = None
            # The generators hold version i now: let its weights go, so the object store puts
            # version i+1 where they were instead of in new pages (0.5 GB in the learner and
            # in every generator, which map them). A generator that dies before the sync
            # cannot be revived with version i, so its batch is produced again after it.
            self.weights = (self.weights[0], None)
            self._phase("learn", i)
            t0 = time.time()
            try:
                weights, learned = self.learners.train(batch_ref, i)
            except LearnerGroupRestarted as e:
                if pending:  # let the batch being made finish (or fail); roll_back drops it
                    pending.exception()
                    pending = None
                self.roll_back(e)
                continue
            t1 = time.time()
            self._phase("sync", i)
            self.sync_weights(i + 1, weights[0])
            del weights  # self.weights holds them now, for reviving a generator
            t2 = time.time()
            self.state.update(iteration=i + 1, policy_version=i + 1, prompt_position=(i + 1) * cfg.ppo.rollout_batch_size)
            row = {**produced, **learned, "sqrt_kl": math.sqrt(max(0.0, learned["kl"])), "policy_version": i + 1,
                   "time_learn": t1 - t0, "time_sync": t2 - t1, "time_iteration": time.time() - t_iter,
                   "samples_per_s": produced["samples"] / (time.time() - t_iter),
                   **{f"restarts_{k}_total": v for k, v in self.state["restarts"].items()}}
            self.tracker.log(i + 1, row)
            history[i + 1] = {"step": i + 1, **row}
            print(f"[ppo {i + 1}/{cfg.ppo.iterations}] PM reward {row['reward_pm']:+.4f}  KL {row['kl']:.4f}  "
                  f"total {row['reward_total']:+.4f}  len {row['response_length']:.1f}  "
                  f"gen {row['time_generate']:.1f}s score {row['time_score']:.1f}s learn {row['time_learn']:.1f}s "
                  f"sync {row['time_sync']:.2f}s  staleness {row['staleness']:.0f}", flush=True)
            if (i + 1) % cfg.ppo.checkpoint_every == 0 or i + 1 == cfg.ppo.iterations:
                self.checkpoint()
        pool.shutdown()
        reward_after = self.evaluate(cfg.ppo.iterations)
        self.learners.save(self.run_dir)
        summary = {"reward_pm_heldout_before": reward_before, "reward_pm_heldout_after": reward_after,
                   "iterations": cfg.ppo.iterations, "policy": str(self.run_dir / "policy"),
                   **{f"restarts_{k}": v for k, v in self.state["restarts"].items()}}
        self.tracker.summary(summary)
        return {**summary, "history": [history[k] for k in sorted(history)]}

    def shutdown(self) -> None:
        for closer in (self.learners.shutdown, self.pool.shutdown, self.queue.shutdown, lambda: ray.kill(self.scorer)):
            try:
                closer()
            except Exception as e:  # a failed clean-up must not hide the run's own error
                print(f"clean-up: {e!r}")
        self.tracker.close()


def train_ppo(cfg: Config, run_dir: Path, resume: bool = False) -> dict:
    """`hh-ray train-ppo`: run the loop, write policy/ and critic/ and a reward-vs-sqrt(KL) plot."""
    controller = RLHFController(cfg, run_dir, resume)
    try:
        result = controller.run()
    finally:
        controller.shutdown()
    from hh_ray.reward_kl import plot_reward_vs_sqrt_kl
    from hh_ray.tracking import read_metrics

    rows = read_metrics(run_dir, "ppo", last_per_step=True)
    print(reward_sqrt_kl_table(rows))
    plot = plot_reward_vs_sqrt_kl(rows, Path(run_dir) / "reward_vs_sqrt_kl.png")
    print(f"held-out PM reward: before {result['reward_pm_heldout_before']}, after {result['reward_pm_heldout_after']:.4f}")
    print(f"policy: {result['policy']}   plot: {plot}")
    return result
