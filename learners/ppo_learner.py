"""PPO learner group: a Ray Train `TorchTrainer` whose workers hold policy and critic.

Each worker runs one long train loop for the whole run (models, optimizers and
the DDP group are built once). The controller drives it through queues:
  commands[rank]  <- {"cmd": "train", "batch": [ObjectRef], "iteration": i} | "checkpoint" | "save" | "stop"
  results         -> {"rank": 0, "kind": ..., ...}   (rank 0 answers for the group)
After every update rank 0 publishes the new policy weights as one ObjectRef
(a state dict of CPU tensors); the controller hands it to the generators.

Old log-probs are vLLM's behaviour log-probs: in sync mode they are the
current policy's (to ~1e-5), in async mode they are the policy that really
sampled, which is what the PPO ratio should be taken against. This saves a
forward pass. The reference policy's log-probs are computed here, on each
worker's shard, unless the batch already carries them.
"""

from __future__ import annotations

import json
import os
import queue as queue_mod
import threading
import time
from pathlib import Path

import torch

from hh_ray import ppo
from hh_ray.checkpoint import begin, commit, load_optimizer, save_optimizer
from hh_ray.config import Config, parse_resources
from hh_ray.rollout import RolloutBatch

RESULT_TIMEOUT_S = 1800


class LearnerGroupRestarted(RuntimeError):
    """A learner worker died and Ray Train restarted the group (FailureConfig):
    it holds the weights it started with until the controller restores a checkpoint."""


class ValueModel(torch.nn.Module):
    """The critic as a module whose forward gives a value per token, so DDP's hooks see it."""

    def __init__(self, critic):
        super().__init__()
        self.critic = critic

    def forward(self, input_ids, attention_mask):
        from hh_ray.models import token_values

        return token_values(self.critic, input_ids, attention_mask)


def _config_from_dict(d: dict) -> Config:
    from hh_ray.config import load_config, _flatten

    return load_config(None, _flatten(d))


def _micro_batches(batch: RolloutBatch, size: int):
    """Micro-batches with padding columns beyond the longest row trimmed."""
    for s in range(0, len(batch), size):
        mb = batch.select(list(range(s, min(s + size, len(batch)))))
        width = int(mb.attention_mask.sum(1).max())
        yield s, mb, width


def _unwrap(m):
    return getattr(m, "module", m)


def ppo_train_loop(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from hh_ray.models import load_policy, load_scalar_head_model, save_model

    cfg = _config_from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    commands, results = config["commands"][rank], config["results"]
    torch.manual_seed(cfg.seed)

    policy = load_policy(config["policy_path"], cfg.model.dtype)
    critic, critic_tok = load_scalar_head_model(config["critic_path"], cfg.model.dtype)
    reference = load_policy(config["reference_path"], cfg.model.dtype).eval().requires_grad_(False)
    from transformers import AutoTokenizer

    policy_tok = AutoTokenizer.from_pretrained(config["reference_path"])
    if cfg.model.gradient_checkpointing:
        for m in (policy, critic):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.config.use_cache = False
    value_model = ValueModel(critic)
    policy_opt = torch.optim.AdamW(policy.parameters(), lr=cfg.ppo.lr, weight_decay=0.0)
    critic_opt = torch.optim.AdamW(value_model.parameters(), lr=cfg.ppo.critic_lr, weight_decay=0.0)
    if config.get("resume_from"):
        load_optimizer(policy_opt, Path(config["resume_from"]), "policy_optimizer")
        load_optimizer(critic_opt, Path(config["resume_from"]), "critic_optimizer")
    if world > 1:
        policy = ray.train.torch.prepare_model(policy)
        value_model = ray.train.torch.prepare_model(value_model)
    else:
        policy.train()
        value_model.train()

    def all_mean(values: dict) -> dict:
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(t)
            t /= world
        return dict(zip(keys, t.tolist()))

    def publish_weights() -> list:
        from actors.generation import weights_for_sync

        return [ray.put(weights_for_sync(_unwrap(policy)))]

    # After a restart (FailureConfig) the queues may still hold commands the dead
    # group never finished: drop them, and only then say "ready", so the
    # controller's next command (a restore) is not dropped with them.
    while not commands.empty():
        commands.get()
    pids = [None] * world
    if world > 1:
        dist.all_gather_object(pids, os.getpid())
    else:
        pids = [os.getpid()]
    if rank == 0:
        results.put({"kind": "ready", "pids": pids,
                     "weights": publish_weights() if config.get("resume_from") else None})

    while True:
        cmd = commands.get()
        kind = cmd["cmd"]
        if kind == "stop":
            break
        if kind == "save":  # the run's final policy/ and critic/ HF folders
            if rank == 0:
                save_model(_unwrap(policy), policy_tok, Path(cmd["path"]) / "policy")
                save_model(_unwrap(value_model).critic, critic_tok, Path(cmd["path"]) / "critic")
                results.put({"kind": kind, "path": cmd["path"]})
            continue
        if kind == "restore":  # the controller rolls the restarted group back to a checkpoint
            ckpt = Path(cmd["path"])
            _unwrap(policy).load_state_dict(load_policy(str(ckpt / "policy"), cfg.model.dtype).state_dict())
            _unwrap(value_model).critic.load_state_dict(
                load_scalar_head_model(str(ckpt / "critic"), cfg.model.dtype)[0].state_dict())
            load_optimizer(policy_opt, ckpt, "policy_optimizer")
            load_optimizer(critic_opt, ckpt, "critic_optimizer")
            if rank == 0:
                results.put({"kind": kind, "path": str(ckpt), "weights": publish_weights()})
            continue
        if kind == "checkpoint":
            if rank == 0:
                final = Path(cmd["path"])
                tmp = begin(final)
                save_model(_unwrap(policy), policy_tok, tmp / "policy")
                save_model(_unwrap(value_model).critic, critic_tok, tmp / "critic")
                save_optimizer(policy_opt, tmp, "policy_optimizer")
                save_optimizer(critic_opt, tmp, "critic_optimizer")
                (tmp / "controller_state.json").write_text(json.dumps(cmd["controller_state"]))
                commit(tmp, final)
                results.put({"kind": kind, "path": str(final)})
            continue

        # ---- one PPO iteration on this worker's shard of the rollout batch
        t0 = time.time()
        iteration = cmd["iteration"]
        batch: RolloutBatch = ray.get(cmd["batch"][0])
        shard = batch.select(list(range(rank, len(batch), world)))
        mb_size = cfg.ppo.micro_batch_size
        old_logp, mask = shard.behaviour_logprobs, shard.response_mask
        ref_logp = torch.zeros_like(old_logp)
        old_values = torch.zeros_like(old_logp)
        with torch.no_grad():
            for s, mb, w in _micro_batches(shard, mb_size):
                rows = slice(s, s + len(mb))
                ids, attn = mb.input_ids[:, :w], mb.attention_mask[:, :w]
                if shard.ref_logprobs is not None:
                    ref_logp[rows] = shard.ref_logprobs[rows]
                else:
                    ref_logp[rows, :w] = ppo.policy_logprobs(reference, ids, attn, cfg.generation.temperature)
                old_values[rows, :w] = ppo.shift_right(_unwrap(value_model)(ids, attn))
        old_values = old_values * mask
        kl = ppo.kl_penalty(old_logp, ref_logp, cfg.ppo.kl_estimator) * mask
        reward = ppo.rewards(shard.pm_score, kl, mask, cfg.ppo.kl_coef)
        adv, returns = ppo.gae(reward, old_values, mask, cfg.ppo.gamma, cfg.ppo.gae_lambda)
        if cfg.ppo.whiten_advantages:
            # statistics over the whole batch, not one worker's shard
            m = mask.float()
            s = torch.tensor([(adv * m).sum(), (adv * adv * m).sum(), m.sum()], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(s)
            mean = s[0] / s[2]
            std = (s[1] / s[2] - mean ** 2).clamp(min=1e-12).sqrt()
            adv = ((adv - mean) / (std + 1e-8)).float() * m

        factor = ppo.lr_factor(iteration, cfg.ppo.iterations, cfg.ppo.lr_schedule, cfg.ppo.warmup_iterations)
        for g in policy_opt.param_groups:
            g["lr"] = cfg.ppo.lr * factor
        for g in critic_opt.param_groups:
            g["lr"] = cfg.ppo.critic_lr * factor

        stats = {"policy_loss": 0.0, "value_loss": 0.0, "clip_frac": 0.0, "approx_kl": 0.0, "entropy": 0.0}
        n_updates = 0
        per_worker_mb = max(1, cfg.ppo.minibatch_size // world)
        gen = torch.Generator().manual_seed(cfg.seed * 100003 + iteration)
        for epoch in range(cfg.ppo.epochs):
            order = torch.randperm(len(shard), generator=gen).tolist()
            for start in range(0, len(order), per_worker_mb):
                idx = order[start: start + per_worker_mb]
                minibatch = shard.select(idx)
                units = mask[idx].sum() if cfg.ppo.loss_agg == "token_mean" else torch.tensor(float(len(idx)))
                policy_opt.zero_grad(set_to_none=True)
                critic_opt.zero_grad(set_to_none=True)
                micro = list(_micro_batches(minibatch, mb_size))
                for j, (s, mb, w) in enumerate(micro):
                    rows = [idx[k] for k in range(s, s + len(mb))]
                    ids, attn, m = mb.input_ids[:, :w], mb.attention_mask[:, :w], mask[rows, :w]
                    # each micro-batch's share of the minibatch loss, so the sum is the minibatch mean
                    weight = (m.sum() if cfg.ppo.loss_agg == "token_mean" else torch.tensor(float(len(rows)))) / units
                    sync = j == len(micro) - 1 or world == 1
                    with (_no_sync(policy, sync), _no_sync(value_model, sync)):
                        logp, ent = ppo.policy_logprobs(policy, ids, attn, cfg.generation.temperature, with_entropy=True)
                        pl, st = ppo.ppo_loss(logp, old_logp[rows, :w], adv[rows, :w], m, cfg.ppo.clip_eps, cfg.ppo.loss_agg)
                        values = ppo.shift_right(value_model(ids, attn))
                        vl = ppo.value_loss(values, old_values[rows, :w], returns[rows, :w], m,
                                            cfg.ppo.value_clip_eps, cfg.ppo.loss_agg)
                        entropy = ppo.masked_mean(ent, m, cfg.ppo.loss_agg)
                        loss = pl + cfg.ppo.value_coef * vl - cfg.ppo.entropy_coef * entropy
                        (loss * weight).backward()
                    w_ = float(weight)
                    stats["policy_loss"] += pl.item() * w_
                    stats["value_loss"] += vl.item() * w_
                    stats["clip_frac"] += float(st["clip_frac"]) * w_
                    stats["approx_kl"] += float(st["approx_kl"]) * w_
                    stats["entropy"] += entropy.item() * w_
                torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.ppo.max_grad_norm)
                torch.nn.utils.clip_grad_norm_(value_model.parameters(), cfg.ppo.max_grad_norm)
                policy_opt.step()
                critic_opt.step()
                n_updates += 1

        kl_seq = kl.sum(1)
        total = shard.pm_score - cfg.ppo.kl_coef * kl_seq
        metrics = all_mean({**{k: v / max(1, n_updates) for k, v in stats.items()},
                            "kl": float(kl_seq.mean()), "reward_total": float(total.mean()),
                            "staleness": float((iteration - shard.policy_version).float().mean()),
                            "learn_time_worker": time.time() - t0})
        if rank == 0:
            results.put({"kind": "trained", "iteration": iteration, "metrics": metrics, "weights": publish_weights()})


class _no_sync:
    """DDP's no_sync for all but the last micro-batch (gradient accumulation)."""

    def __init__(self, model, sync: bool):
        self.ctx = None if sync or not hasattr(model, "no_sync") else model.no_sync()

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)


class PPOLearnerGroup:
    """Driver-side handle: starts the TorchTrainer in a thread and talks to its workers."""

    def __init__(self, cfg: Config, policy_path: str, critic_path: str, reference_path: str,
                 run_dir: Path, resume_from: Path | None = None):
        import dataclasses

        import ray
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
        from ray.util.queue import Queue

        if cfg.ppo.rollout_batch_size % cfg.ppo.num_learners or cfg.ppo.minibatch_size % cfg.ppo.num_learners:
            raise ValueError(f"ppo.rollout_batch_size ({cfg.ppo.rollout_batch_size}) and ppo.minibatch_size "
                             f"({cfg.ppo.minibatch_size}) must divide by ppo.num_learners ({cfg.ppo.num_learners})")
        n = cfg.ppo.num_learners
        self.commands = [Queue(actor_options={"num_cpus": 0}) for _ in range(n)]
        self.results = Queue(actor_options={"num_cpus": 0})
        use_gpu = bool(ray.cluster_resources().get("GPU", 0))
        self.trainer = TorchTrainer(
            ppo_train_loop,
            train_loop_config={"cfg": dataclasses.asdict(cfg), "policy_path": policy_path,
                               "critic_path": critic_path, "reference_path": reference_path,
                               "resume_from": str(resume_from) if resume_from else None,
                               "commands": self.commands, "results": self.results},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=n, use_gpu=use_gpu, resources_per_worker={
                "CPU": cfg.ppo.cpus_per_learner, **({"GPU": 1} if use_gpu else {}),
                **parse_resources(cfg.ppo.learner_resources, "ppo.learner_resources")}),
            run_config=RunConfig(name="ppo-learners", storage_path=str(Path(run_dir).resolve() / "ray_train"),
                                 failure_config=FailureConfig(max_failures=cfg.ppo.max_learner_restarts)),
        )
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._fit, daemon=True, name="ppo-learner-group")
        self._thread.start()
        ready = self._wait("ready")
        self.initial_weights, self.pids = ready["weights"], ready["pids"]

    def _fit(self):
        try:
            self.trainer.fit()
        except BaseException as e:  # surfaced by _wait, never a silent hang
            self._error = e

    def _wait(self, kind: str) -> dict:
        deadline = time.time() + RESULT_TIMEOUT_S
        while time.time() < deadline:
            try:
                msg = self.results.get(timeout=1.0)
            except queue_mod.Empty:
                msg = None
            except Exception as e:  # ray.util.queue raises its own Empty
                if type(e).__name__ != "Empty":
                    raise
                msg = None
            if msg is not None:
                if msg["kind"] == "ready" and kind != "ready":
                    self.pids = msg["pids"]
                    raise LearnerGroupRestarted("the PPO learner group restarted after a worker failure")
                if msg["kind"] != kind:
                    raise RuntimeError(f"learner group answered {msg['kind']!r}, expected {kind!r}")
                return msg
            if not self._thread.is_alive():
                raise RuntimeError(f"the PPO learner group stopped while the controller waited for {kind!r}: "
                                   f"{self._error!r}") from self._error
        raise TimeoutError(f"no {kind!r} from the PPO learner group in {RESULT_TIMEOUT_S}s")

    def _broadcast(self, cmd: dict) -> None:
        for q in self.commands:
            q.put(cmd)

    def train(self, batch_ref, iteration: int) -> tuple[list, dict]:
        """One PPO update on a rollout batch (an ObjectRef); returns ([new weights ref], metrics)."""
        self._broadcast({"cmd": "train", "batch": [batch_ref], "iteration": iteration})
        msg = self._wait("trained")
        return msg["weights"], msg["metrics"]

    def checkpoint(self, path: Path, controller_state: dict) -> Path:
        self._broadcast({"cmd": "checkpoint", "path": str(path), "controller_state": controller_state})
        return Path(self._wait("checkpoint")["path"])

    def restore(self, path: Path) -> list:
        """Load a checkpoint's policy, critic and optimizers into the running group; returns [weights ref]."""
        self._broadcast({"cmd": "restore", "path": str(path)})
        return self._wait("restore")["weights"]

    def save(self, path: Path) -> Path:
        """Write policy/ and critic/ HF folders into `path`."""
        self._broadcast({"cmd": "save", "path": str(path)})
        return Path(self._wait("save")["path"])

    def shutdown(self) -> None:
        self._broadcast({"cmd": "stop"})
        self._thread.join(timeout=120)
