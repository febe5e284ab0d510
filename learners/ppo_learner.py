"""PPO learner group: a Ray Train `TorchTrainer` whose workers hold policy and critic.

Each worker runs one long train loop for the whole run (models, optimizers and
the DDP group are built once). The controller drives it through channels of the
run's rollout-queue actor (actors/rollout_queue.py):
  commands[rank]  <- {"cmd": "train", "batch": [ObjectRef], "iteration": i} | "checkpoint" | "save" | "stop"
  results         -> {"rank": 0, "kind": ..., ...}   (rank 0 answers for the group)
After every update rank 0 publishes the new policy weights as one ObjectRef
(a state dict of CPU tensors); the controller hands it to the generators.

Old log-probs are vLLM's behaviour log-probs: in sync mode they are the
current policy's (to ~1e-5), in async mode they are the policy that really
sampled, which is what the PPO ratio should be taken against. This saves a
forward pass. The reference policy's log-probs are computed here, on each
worker's shard, unless the batch already carries them, in full precision
even under `ppo.autocast` (the KL is read from them). With one epoch over
one minibatch the critic's training forward also gives the old values, and
the output layer runs at response positions only (`PolicyModel`).
"""

from __future__ import annotations

import functools
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
from learners.group import adamw, torch_trainer

RESULT_TIMEOUT_S = 1800


class LearnerGroupRestarted(RuntimeError):
    """A learner worker died and Ray Train restarted the group (FailureConfig):
    it holds the weights it started with (`.weights`, [ObjectRef]) until the
    controller restores a checkpoint."""

    weights: list | None = None


class ValueModel(torch.nn.Module):
    """The critic as a module whose forward gives a value per token, so DDP's hooks see it."""

    def __init__(self, critic):
        super().__init__()
        self.critic = critic

    def forward(self, input_ids, attention_mask):
        from hh_ray.models import token_values

        return token_values(self.critic, input_ids, attention_mask)


class PolicyModel(torch.nn.Module):
    """The policy as a module whose forward gives the logits at response positions
    only (models.response_logits: the 49k-wide output layer skips the prompt and
    padding, ~40% of a transcript in the demo), so DDP's hooks see it. Models whose
    logits are more than output_layer(last hidden state) (soft-capping, scaling)
    are detected on a probe input and get the full logits, then the rows."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.split = self._split_is_exact()

    @torch.no_grad()
    def _split_is_exact(self) -> bool:
        from hh_ray.models import response_logits

        ids = torch.arange(8)[None] % self.lm.config.vocab_size
        attn, positions = torch.ones_like(ids), torch.ones_like(ids).index_fill_(1, torch.tensor([0]), 0)
        full = self.lm(input_ids=ids, attention_mask=attn).logits[0, :-1]
        return torch.allclose(response_logits(self.lm, ids, attn, positions), full, atol=1e-4, rtol=1e-4)

    def forward(self, input_ids, attention_mask, positions):
        from hh_ray.models import response_logits

        if self.split:
            return response_logits(self.lm, input_ids, attention_mask, positions)
        return self.lm(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][positions[:, 1:].bool()]


def _config_from_dict(d: dict) -> Config:
    from hh_ray.config import load_config, _flatten

    return load_config(None, _flatten(d))


def _micro_batches(batch: RolloutBatch, rows: list[int], size: int):
    """Micro-batches of `batch`'s `rows`, rows of like length together so that less
    padding is computed (bench_ppo's batches of 16: 2-11% fewer tokens than random
    micro-batches of 8), the padding columns beyond the longest row trimmed.
    Yields (those rows, the micro-batch, its width)."""
    length = batch.attention_mask.sum(1)
    rows = sorted(rows, key=lambda r: int(length[r]))
    for s in range(0, len(rows), size):
        part = rows[s: s + size]
        yield part, batch.select(part), int(length[part].max())


def _unwrap(m):
    return getattr(m, "module", m)


def ppo_train_loop(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from hh_ray.models import autocast, load_policy, load_scalar_head_model, save_model

    cfg = _config_from_dict(config["cfg"])
    # the policy and critic passes (log-softmax is done in fp32 by ppo.token_logprobs)
    device_type = ray.train.torch.get_device().type
    mixed = functools.partial(autocast, cfg.ppo.autocast, device_type)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    commands, results = config["commands"][rank], config["results"]
    torch.manual_seed(cfg.seed)

    policy = load_policy(config["policy_path"], cfg.model.dtype)
    critic, critic_tok = load_scalar_head_model(config["critic_path"], cfg.model.dtype)
    reference = load_policy(config["reference_path"], cfg.model.dtype).eval().requires_grad_(False)
    from transformers import AutoTokenizer

    policy_tok = AutoTokenizer.from_pretrained(config["reference_path"])
    if cfg.ppo.autocast == "bfloat16" and device_type == "cpu":
        # torch's fused CPU attention has a slow bf16 backward (1.7 s of a 10 s policy
        # forward+backward, SmolLM2, 16 x 150 tokens); eager attention (bmm, fp32
        # softmax) makes that forward+backward 19% faster. In fp32 sdpa is the faster.
        for m in (policy, critic):
            m.set_attn_implementation("eager")
    if cfg.model.gradient_checkpointing:
        for m in (policy, critic):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.config.use_cache = False
    reference = PolicyModel(reference)
    policy, value_model = PolicyModel(policy), ValueModel(critic)
    policy_opt = adamw(policy.parameters(), lr=cfg.ppo.lr)
    critic_opt = adamw(value_model.parameters(), lr=cfg.ppo.critic_lr)
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
        from hh_ray.weights import weights_for_sync

        return [ray.put(weights_for_sync(_unwrap(policy).lm))]

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
    if rank == 0:  # with the weights it holds: the run's start, or the checkpoint it resumed from
        results.put({"kind": "ready", "pids": pids, "weights": publish_weights()})

    while True:
        cmd = commands.get()
        kind = cmd["cmd"]
        if kind == "stop":
            break
        if kind == "save":  # the run's final policy/ and critic/ HF folders
            if rank == 0:
                save_model(_unwrap(policy).lm, policy_tok, Path(cmd["path"]) / "policy")
                save_model(_unwrap(value_model).critic, critic_tok, Path(cmd["path"]) / "critic")
                results.put({"kind": kind, "path": cmd["path"]})
            continue
        if kind == "restore":  # the controller rolls the restarted group back to a checkpoint
            ckpt = Path(cmd["path"])
            _unwrap(policy).lm.load_state_dict(load_policy(str(ckpt / "policy"), cfg.model.dtype).state_dict())
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
                save_model(_unwrap(policy).lm, policy_tok, tmp / "policy")
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
        p = cfg.ppo
        mb_size, per_worker_mb = p.micro_batch_size, max(1, p.minibatch_size // world)
        token_mean = p.loss_agg == "token_mean"
        # One epoch over one minibatch (the paper's main setting): the critic's first
        # training forward sees the weights a separate no-grad pass would, so the
        # critic is trained first and its values feed GAE. One forward pass saved.
        one_pass = p.fuse_value_pass and p.epochs == 1 and per_worker_mb >= len(shard)
        old_logp, mask = shard.behaviour_logprobs, shard.response_mask
        ref_logp = torch.zeros_like(old_logp)
        old_values = torch.zeros_like(old_logp)
        with torch.no_grad():
            for rows, mb, w in _micro_batches(shard, list(range(len(shard))), mb_size):
                ids, attn = mb.input_ids[:, :w], mb.attention_mask[:, :w]
                if shard.ref_logprobs is not None:
                    ref_logp[rows] = shard.ref_logprobs[rows]
                else:  # in model.dtype, not autocast: the KL is read from these
                    pos = mask[rows, :w]
                    ref_logp[rows, :w] = ppo.response_logprobs(reference(ids, attn, pos), ids, pos,
                                                               cfg.generation.temperature)
                if not one_pass:
                    with mixed():
                        old_values[rows, :w] = ppo.shift_right(_unwrap(value_model)(ids, attn)).float()
        old_values = old_values * mask
        kl = ppo.kl_penalty(old_logp, ref_logp, p.kl_estimator) * mask
        reward = ppo.rewards(shard.pm_score, kl, mask, p.kl_coef)
        adv, returns = ppo.gae(reward, old_values, mask, p.gamma, p.gae_lambda)
        t_forward = time.time() - t0

        factor = ppo.lr_factor(iteration, p.iterations, p.lr_schedule, p.warmup_iterations)
        for g in policy_opt.param_groups:
            g["lr"] = p.lr * factor
        for g in critic_opt.param_groups:
            g["lr"] = p.critic_lr * factor

        def step(model, opt, idx: list[int], loss_of) -> dict:
            """One optimizer step of `model` on rows `idx`, micro-batched;
            loss_of(rows, ids, attn, mask) -> (loss, stats). Returns the stats, minibatch-weighted."""
            units = mask[idx].sum() if token_mean else torch.tensor(float(len(idx)))
            micro = list(_micro_batches(shard, idx, mb_size))
            totals: dict[str, float] = {}
            for j, (rows, mb, w) in enumerate(micro):
                m = mask[rows, :w]
                # each micro-batch's share of the minibatch loss, so the sum is the minibatch mean
                weight = (m.sum() if token_mean else torch.tensor(float(len(rows)))) / units
                with _no_sync(model, j == len(micro) - 1 or world == 1), mixed():
                    loss, stats = loss_of(rows, mb.input_ids[:, :w], mb.attention_mask[:, :w], m)
                    (loss * weight).backward()
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + float(v) * float(weight)
            torch.nn.utils.clip_grad_norm_(model.parameters(), p.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)  # free this model's gradients before the other's backward
            return totals

        def critic_loss(rows, ids, attn, m):
            w = ids.shape[1]
            values = ppo.shift_right(value_model(ids, attn)).float()
            if one_pass:  # these are the old values: GAE for these rows now
                old_values[rows, :w] = values.detach() * m
                adv[rows, :w], returns[rows, :w] = ppo.gae(reward[rows, :w], old_values[rows, :w], m,
                                                           p.gamma, p.gae_lambda)
            vl = ppo.value_loss(values, old_values[rows, :w], returns[rows, :w], m, p.value_clip_eps, p.loss_agg)
            return p.value_coef * vl, {"value_loss": vl.detach()}

        def policy_loss(rows, ids, attn, m):
            w = ids.shape[1]
            logp, ent = ppo.response_logprobs(policy(ids, attn, m), ids, m, cfg.generation.temperature,
                                              with_entropy=True, entropy_grad=p.entropy_coef != 0)
            pl, st = ppo.ppo_loss(logp, old_logp[rows, :w], adv[rows, :w], m, p.clip_eps, p.loss_agg)
            entropy = ppo.masked_mean(ent, m, p.loss_agg)
            return pl - p.entropy_coef * entropy, {"policy_loss": pl.detach(), "entropy": entropy.detach(), **st}

        stats: dict[str, float] = {}

        def add(st: dict) -> None:
            for k, v in st.items():
                stats[k] = stats.get(k, 0.0) + v

        if one_pass:
            add(step(value_model, critic_opt, list(range(len(shard))), critic_loss))
        if p.whiten_advantages:
            # statistics over the whole batch, not one worker's shard
            m = mask.float()
            s = torch.tensor([(adv * m).sum(), (adv * adv * m).sum(), m.sum()], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(s)
            mean = s[0] / s[2]
            std = (s[1] / s[2] - mean ** 2).clamp(min=1e-12).sqrt()
            adv = ((adv - mean) / (std + 1e-8)).float() * m

        n_updates = 0
        gen = torch.Generator().manual_seed(cfg.seed * 100003 + iteration)
        for epoch in range(p.epochs):
            order = torch.randperm(len(shard), generator=gen).tolist()
            for start in range(0, len(order), per_worker_mb):
                idx = order[start: start + per_worker_mb]
                add(step(policy, policy_opt, idx, policy_loss))
                if not one_pass:
                    add(step(value_model, critic_opt, idx, critic_loss))
                n_updates += 1

        kl_seq = kl.sum(1)
        total = shard.pm_score - p.kl_coef * kl_seq
        metrics = all_mean({**{k: v / max(1, n_updates) for k, v in stats.items()},
                            "kl": float(kl_seq.mean()), "reward_total": float(total.mean()),
                            "staleness": float((iteration - shard.policy_version).float().mean()),
                            "time_learn_forward": t_forward,
                            "time_learn_update": time.time() - t0 - t_forward})
        if rank == 0:
            t1 = time.time()
            # No ref to the weights stays here: once the generators hold them, the object is
            # freed. (A dict display is evaluated in order: the publish is timed.)
            results.put({"kind": "trained", "iteration": iteration, "weights": publish_weights(),
                         "metrics": {**metrics, "time_learn_publish": time.time() - t1}})


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
                 run_dir: Path, mailbox, resume_from: Path | None = None):
        """`mailbox`: the run's RolloutQueue, whose actor also carries commands and results."""
        import dataclasses

        import ray
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig

        if cfg.ppo.rollout_batch_size % cfg.ppo.num_learners or cfg.ppo.minibatch_size % cfg.ppo.num_learners:
            raise ValueError(f"ppo.rollout_batch_size ({cfg.ppo.rollout_batch_size}) and ppo.minibatch_size "
                             f"({cfg.ppo.minibatch_size}) must divide by ppo.num_learners ({cfg.ppo.num_learners})")
        n = cfg.ppo.num_learners
        self.commands = [mailbox.channel(f"learner-{rank}-commands") for rank in range(n)]
        self.results = mailbox.channel("learner-results")
        use_gpu = bool(ray.cluster_resources().get("GPU", 0))
        self.trainer = torch_trainer(
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
        self.pids, self._initial_weights = ready["pids"], ready["weights"]

    def take_initial_weights(self) -> list:
        """[ObjectRef] to the weights the group started with. The group keeps no ref:
        with one live version at a time the object store reuses its pages."""
        weights, self._initial_weights = self._initial_weights, None
        return weights

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
            if msg is not None:
                if msg["kind"] == "ready" and kind != "ready":
                    self.pids = msg["pids"]
                    restarted = LearnerGroupRestarted("the PPO learner group restarted after a worker failure")
                    restarted.weights = msg["weights"]
                    raise restarted
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
