"""The RLHF controller: the paper's PPO loop (Bai et al. 2022, §4.1) over Ray actors
and the learner group. `RLHFController.iteration` is the loop body:

    draw prompts -> generate (vLLM actors, policy version v) -> score (PM service)
    -> make experience + PPO update (Ray Train learner group: KL penalty, GAE, clipped loss)
    -> sync weights v+1 to the generators -> log

Sync mode is on-policy. Async mode generates batch i+1 with version i while
the learners train on batch i (staleness 1; hh_ray/orchestration/rollouts.py).
All randomness is derived from (seed, iteration), so a resumed run draws the
same prompts and samples as an uninterrupted one.

Failures: a dead generation actor or PM service is replaced and the batch
produced again (same seeds, so the same samples). A learner group that Ray
Train restarted, found at whatever phase (the next learner command, or weights
lost in a sync), is rolled back with the generators to the last checkpoint,
and the iterations since are run again. The channel actor (rollout queue and
learner commands) comes back empty after a crash: the pending learner command
is sent again and answered once (learners/transport.py), a lost queue entry is
taken from the producer's own ref (rollouts.py). A killed driver is resumed
with `--resume` from the last checkpoint (a `resume` row in ppo_fault).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import ray

from actors.rollout_queue import RolloutQueue
from hh_ray.checkpoint import (PPO_CHECKPOINTS, clean_leftovers, complete_checkpoints, no_checkpoint_error,
                               prune_checkpoints, read_state, resume_checkpoint, step_folders)
from hh_ray.config import Config, ConfigError, with_value
from hh_ray.conversation import model_format, read_format
from hh_ray.estimators import needs_critic
from hh_ray.models import is_scalar_head_model, load_pm_tokenizer, load_tokenizer, resolve_model
from hh_ray.orchestration.rollouts import Prefetch, RolloutProducer, WeightsLost
from hh_ray.prompt_stream import PromptStream, load_prompts
from hh_ray.reward_kl import plot_reward_vs_sqrt_kl
from hh_ray.tracking import Tracker, read_metrics
from learners.group import with_learner_autocast
from learners.ppo_learner import LearnerGroupRestarted, LearnerPaths, PPOLearnerGroup, learner_resources
from learners.transport import LearnerError
from learners.weight_sync import WeightGroupUnavailable

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


def check_config(cfg: Config, policy: str, pm: str) -> str:
    """What the config loader cannot check; returns the run's conversation format.

    The policy is trained in the format its folder records (or `model.conversation_format`
    resolves to); the PM must score conversations in the same one. The critic reads the
    policy's token ids, so a critic started from the PM needs the policy's vocabulary."""
    policy_tokenizer = load_tokenizer(policy)
    fmt = model_format(policy, cfg.model.conversation_format, policy_tokenizer)
    pm_fmt = read_format(pm)
    if pm_fmt is not None and pm_fmt != fmt:
        raise ConfigError(f"model.pm: {pm} was trained on conversations in the {pm_fmt!r} format, but the policy "
                          f"({policy}) uses {fmt!r}; train the PM in the policy's format "
                          f"(model.conversation_format={fmt})")
    if cfg.ppo.critic_init == "pm" and needs_critic(cfg.ppo.advantage_estimator):
        pol, pmv = policy_tokenizer.get_vocab(), load_pm_tokenizer(pm).get_vocab()
        differ = [t for t, i in pol.items() if pmv.get(t) != i]
        if differ:
            raise ConfigError(f"ppo.critic_init=pm, but the PM's tokenizer ({pm}) differs from the policy's "
                              f"({policy}) in {len(differ)} tokens (e.g. {differ[0]!r}); use a PM trained on the "
                              "policy's backbone, or ppo.critic_init=policy")
    return fmt


def reward_sqrt_kl_table(rows: list[dict]) -> str:
    lines = [f"{'iter':>4} {'PM reward':>10} {'KL':>8} {'sqrt KL':>8} {'total':>8} {'resp len':>8} {'s/iter':>7}"]
    for r in rows:
        lines.append(f"{r['step']:>4} {r['reward_pm']:>10.4f} {r['kl']:>8.4f} {r['sqrt_kl']:>8.4f} "
                     f"{r['reward_total']:>8.4f} {r['response_length']:>8.1f} {r['time_iteration']:>7.1f}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the controller

class RLHFController:
    """Holds the actors and the learner group for the whole run and runs the paper's loop."""

    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False):
        # Absolute: the learners write policy/ and checkpoints here from Ray workers, whose working
        # directory is not the driver's.
        self.run_dir = Path(run_dir).resolve()
        self.policy_path, self.pm_path = resolve_paths(cfg)
        # Every part of the run reads the resolved format from the config (and config.yaml shows it).
        self.cfg = cfg = with_value(cfg, "model.conversation_format", check_config(cfg, self.policy_path, self.pm_path))
        # ppo.autocast: resolved on a node a learner could take (it may have GPUs or a processor this
        # driver lacks); the PM service resolves the setting as given on its own device (the placement
        # row says what it chose).
        pm_autocast = cfg.ppo.autocast
        self.cfg = cfg = with_learner_autocast(cfg, "ppo.autocast", learner_resources(cfg))
        # auto: broadcast, which every engine takes; the object store if its group cannot form.
        self.auto_sync = cfg.generation.weight_sync == "auto"
        self.cfg = cfg = with_value(cfg, "generation.weight_sync", "broadcast" if self.auto_sync
                                    else cfg.generation.weight_sync)
        self.tokenizer = load_tokenizer(self.policy_path)
        train_prompts, self.eval_prompts = load_prompts(cfg, self.tokenizer, cfg.model.conversation_format)
        self.checkpoints = self.run_dir / PPO_CHECKPOINTS
        if not resume and complete_checkpoints(self.checkpoints):  # a roll-back would restore the other run's
            raise ValueError(f"{self.run_dir} already holds PPO checkpoints: pass --resume to continue it, "
                             "or another --run-dir")
        clean_leftovers(self.checkpoints, recover=resume)
        ckpt = resume_checkpoint(self.checkpoints) if resume else None  # the newest that verifies
        if resume and ckpt is None:
            if step_folders(self.checkpoints):  # saved, but none verifies
                raise no_checkpoint_error(self.checkpoints)
            print(f"no checkpoint in {self.checkpoints}: starting from iteration 0")
        self.resumed_from = ckpt
        self.initial_state = {"iteration": 0, "policy_version": 0, "prompt_position": 0, "seed": cfg.seed,
                              "restarts": {"generation": 0, "pm": 0, "learner": 0, "channel": 0, "driver": 0}}
        self.state = read_state(ckpt) if ckpt else dict(self.initial_state)
        self.state["restarts"] = {**self.initial_state["restarts"], **self.state.get("restarts", {})}
        self.tracker = Tracker(self.run_dir, cfg, "ppo")
        if ckpt:  # the driver (or the whole run) stopped after this checkpoint
            self.state["restarts"]["driver"] += 1
            self.tracker.log(self.state["iteration"], {"what": "resume", "checkpoint": str(ckpt)}, stage="ppo_fault")
        self.on_phase = None  # optional hook(phase, iteration), called as each phase starts (fault-injection tests)

        t0 = time.time()
        self.queue = RolloutQueue(maxsize=2)  # the batch being learned on, and the one made meanwhile (async)
        self._channel_restarts = 0  # of self.queue's actor (it also carries the learners' commands), counted so far
        self.rollouts = RolloutProducer(cfg, self.policy_path, self.pm_path, self.tokenizer,
                                        PromptStream(train_prompts, cfg.seed), self.queue, self.state["restarts"],
                                        cfg.model.conversation_format, pm_autocast)
        self.prefetch = Prefetch(self.rollouts, cfg.ppo.mode == "async", self._phase)
        critic = self.pm_path if cfg.ppo.critic_init == "pm" else self.policy_path
        self.learners = None
        try:  # the learners start while the engines do
            self.learners = PPOLearnerGroup(cfg, LearnerPaths(self.policy_path, critic, str(ckpt) if ckpt else None),
                                            self.run_dir, self.queue)
            self.rollouts.wait_ready()
            self.rollouts.fetch_weights = self.learners.publish
            if ckpt:  # generators start from the initial policy; bring them to the checkpoint's version
                self.rollouts.sync_weights(self.state["policy_version"], self.learners.publish()[0])
        except BaseException:  # what started is stopped here, not left running until the driver ends
            self.shutdown()
            raise
        print(f"actors ready in {time.time() - t0:.1f}s: {cfg.generation.num_workers} generation worker(s), "
              f"PM service, {cfg.ppo.num_learners} learner(s); weight sync: {cfg.generation.weight_sync}", flush=True)
        self.log_placement()

    def _phase(self, name: str, iteration: int) -> None:
        if self.on_phase is not None:
            self.on_phase(name, iteration)

    # ---- the loop

    def run(self) -> dict:
        cfg = self.cfg
        reward_before = self.evaluate(0) if self.state["iteration"] == 0 else None
        history: dict[int, dict] = {}
        while True:
            try:
                while self.state["iteration"] < cfg.ppo.iterations:
                    history[self.state["iteration"] + 1] = self.iteration(self.state["iteration"])
                self.learners.save(self.run_dir)
                break
            except LearnerGroupRestarted as restarted:  # at any phase: found at the next learner command
                self.roll_back(restarted)
        reward_after = self.evaluate(cfg.ppo.iterations)
        summary = {"reward_pm_heldout_before": reward_before, "reward_pm_heldout_after": reward_after,
                   "iterations": cfg.ppo.iterations, "policy": str(self.run_dir / "policy"),
                   **{f"restarts_{k}": v for k, v in self.state["restarts"].items()}}
        self.tracker.summary(summary)
        return {**summary, "history": [history[k] for k in sorted(history)]}

    def iteration(self, i: int) -> dict:
        """One PPO iteration: rollouts of policy version i -> update -> version i+1 in the generators."""
        t_iter = time.time()
        produced = self.prefetch.take(i)            # draw prompts -> generate -> score -> rollout queue
        batch_ref = self.rollouts.take(i)
        self.prefetch.start(i + 1, self.cfg.ppo.iterations)  # async: batch i+1 from version i, meanwhile
        self.rollouts.drop_weights()
        self._phase("learn", i)
        t0 = time.time()
        learned, sample_kl = self.learners.train(batch_ref, i)  # make experience (KL, reward, GAE) + PPO update
        t1 = time.time()
        self._phase("sync", i)
        learned.update(self.sync_weights(i + 1))     # version i+1 to every generator
        prompts = self.cfg.ppo.rollout_batch_size // self.cfg.generation.samples_per_prompt
        self.state.update(iteration=i + 1, policy_version=i + 1, prompt_position=(i + 1) * prompts)
        samples = [{**s, "kl": kl} for s, kl in zip(produced.pop("logged_samples"), sample_kl)]
        row = self.log(i + 1, produced, learned, {"time_learn": t1 - t0, "time_sync": time.time() - t1,
                                                  "time_iteration": time.time() - t_iter})
        self.tracker.log_samples(i + 1, samples)
        if (i + 1) % self.cfg.ppo.checkpoint_every == 0 or i + 1 == self.cfg.ppo.iterations:
            self._phase("checkpoint", i)
            self.checkpoint()
        return row

    def log(self, step: int, produced: dict, learned: dict, times: dict) -> dict:
        channel = self.queue.restarts - self._channel_restarts  # restarts of the channel actor seen since the last row
        self._channel_restarts += channel
        self.state["restarts"]["channel"] += channel
        row = {**produced, **learned, **times, "sqrt_kl": math.sqrt(max(0.0, learned["kl"])), "policy_version": step,
               "samples_per_s": produced["samples"] / times["time_iteration"], "restarts_channel": channel,
               **{f"restarts_{k}_total": v for k, v in self.state["restarts"].items()}}
        self.tracker.log(step, row)
        print(f"[ppo {step}/{self.cfg.ppo.iterations}] PM reward {row['reward_pm']:+.4f}  KL {row['kl']:.4f}  "
              f"total {row['reward_total']:+.4f}  len {row['response_length']:.1f}  ended {row['ended_fraction']:.2f}  "
              f"gen {row['time_generate']:.1f}s score {row['time_score']:.1f}s learn {row['time_learn']:.1f}s "
              f"sync {row['time_sync']:.2f}s  staleness {row['staleness']:.0f}", flush=True)
        return {"step": step, **row}

    def evaluate(self, step: int) -> float:
        """Mean PM reward of one sampled response per held-out prompt (same seeds every time)."""
        if not self.eval_prompts:
            return float("nan")
        reward, length = self.rollouts.score_heldout(self.eval_prompts)
        self.tracker.log(step, {"reward_pm_heldout": reward, "response_length": length}, stage="ppo_eval")
        return reward

    # ---- weights, checkpoints and the learner group's restarts

    def sync_weights(self, version: int) -> dict:
        """The learners' policy, as `version`, into every generator; returns the sync's metrics."""
        if self.cfg.generation.weight_sync == "broadcast":
            try:
                report = self.rollouts.sync_weights(version, send=lambda workers: self.learners.broadcast(version, workers))
                return {"sync_bytes": report["bytes"], "time_sync_connect": report["time_connect"]}
            except LearnerError as e:
                if not (self.auto_sync and e.error_type == WeightGroupUnavailable.__name__):
                    raise
                print(f"weight_sync=auto: the broadcast group could not form ({e}); using the object store",
                      flush=True)
                self.cfg = with_value(self.cfg, "generation.weight_sync", "object_store")
                self.tracker.log(version - 1, {"what": "weight_sync_fallback", "error": str(e)[:500]}, stage="ppo_fault")
        try:
            self.rollouts.sync_weights(version, self.learners.publish()[0])
        except WeightsLost as e:  # the learner group died after publishing them
            print(f"{e}; waiting for the learner group to restart", flush=True)
            raise self.learners.wait_restarted() from e
        return {}

    def log_placement(self) -> None:
        """Where every part of the run landed: a `placement` row in metrics.jsonl and the log."""
        where = {**self.rollouts.placement(), "learners": self.learners.placement}
        self.tracker.log(self.state["iteration"], where, stage="placement")
        short = lambda node: node[:8]  # noqa: E731
        print("placement: generation " + ", ".join(short(g["node_id"]) for g in where["generation"])
              + f"; PM service {short(where['pm']['node_id'])} (autocast {where['pm']['autocast']}); learners "
              + ", ".join(f"{short(r['node_id'])} ({r['device']})" for r in where["learners"]), flush=True)

    def checkpoint(self) -> None:
        self.learners.checkpoint(self.checkpoints, self.state["iteration"], dict(self.state))
        # The newest ppo.keep_checkpoints stay, and the one resumed from: a restarted group reloads it first.
        prune_checkpoints(self.checkpoints, self.cfg.ppo.keep_checkpoints, protect=self.resumed_from)

    def roll_back(self, restarted: LearnerGroupRestarted) -> None:
        """The learner group restarted from scratch: restore the last checkpoint (or the run's
        start) in it, in the controller and in the generators."""
        self.prefetch.discard()
        ckpt = resume_checkpoint(self.checkpoints)  # the newest that verifies
        restarts = self.state["restarts"]
        restarts["learner"] += 1
        if ckpt is not None:
            weights = self.learners.restore(ckpt)[0]
            saved = read_state(ckpt)
        else:  # no checkpoint yet: the restarted group holds the weights the run started with
            weights, saved = self.learners.publish()[0], self.initial_state
        self.state = {**saved, "restarts": restarts}
        self.rollouts.drain()
        self.rollouts.sync_weights(self.state["policy_version"], weights)
        print(f"learner group restarted ({restarted}); rolled back to iteration {self.state['iteration']} "
              f"from {ckpt or 'the start of the run'}", flush=True)
        self.tracker.log(self.state["iteration"], {"what": "learner_restart", "checkpoint": str(ckpt or "")},
                         stage="ppo_fault")

    def shutdown(self) -> None:
        # The actors first: a batch still being made (async mode) then fails at once instead of
        # holding up the prefetch's shutdown (Ctrl-C has 10 s).
        for part in (self.rollouts, self.prefetch, self.learners, self.queue):
            if part is None:  # the learner group failed to start
                continue
            try:
                part.shutdown()
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
    rows = read_metrics(run_dir, "ppo", last_per_step=True)
    print(reward_sqrt_kl_table(rows))
    plot = plot_reward_vs_sqrt_kl(rows, Path(run_dir) / "reward_vs_sqrt_kl.png")
    print(f"held-out PM reward: before {result['reward_pm_heldout_before']}, after {result['reward_pm_heldout_after']:.4f}")
    print(f"policy: {result['policy']}   plot: {plot}")
    return result

