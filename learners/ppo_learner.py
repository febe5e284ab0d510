"""PPO learner group: a Ray Train `TorchTrainer` whose workers hold policy, critic and
the reference policy pi0, for the whole run (built once; one DDP group).

The controller drives the group by commands (learners/transport.py): each is a
method of `PPOWorker` — `train`, `broadcast`, `publish`, `checkpoint`, `restore`,
`save`. After an update the new policy reaches the generators by `broadcast` (rank 0
sends it over a process group with them: learners/weight_sync.py) or `publish` (rank 0
puts it in the object store as one ObjectRef, which the controller hands to them).
Every worker computes on its device (hh_ray.runtime.device: the GPU Ray Train gave
it, else the CPU): models, optimizer state, the reference and each batch.

Old log-probs are vLLM's behaviour log-probs: in sync mode they are the current
policy's (to ~1e-5), in async mode those of the policy that really sampled,
which is what the PPO ratio should be taken against; a forward pass saved. The
reference log-probs are computed here on each worker's shard, in model.dtype
even under `ppo.autocast` (the KL is read from them). With one epoch over one
minibatch the critic's training forward also gives the old values
(`ppo.fuse_value_pass`), and the output layer runs at response positions only
(`PolicyModel`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig

from hh_ray import ppo
from hh_ray.estimators import needs_critic
from hh_ray.lora import AdapterView, adapters_off, add_lora, hf_state_dict, merged_copy
from hh_ray.config import Config, parse_resources
from hh_ray.models import autocast, enable_checkpointing, load_policy, set_attention_for, load_scalar_head_model, load_tokenizer, response_logits, save_model, token_values
from hh_ray.rollout import RolloutBatch
from hh_ray.runtime import derive_seed, device, gpus_for, malloc_in_use, worker_env
from hh_ray.weights import weights_for_sync
from learners.group import torch_trainer
from learners.kit import (adamw, all_reduce_mean, all_reduce_sum, clip_and_step, no_sync_unless, restore_checkpoint,
                          save_checkpoint, unwrap)
from learners.transport import CommandClient, LearnerGroupRestarted, post_fit_ended, serve_commands
from learners.weight_sync import WeightBroadcaster

RESULT_TIMEOUT_S = 1800

__all__ = ["PPOLearnerGroup", "LearnerGroupRestarted", "PolicyModel", "ValueModel", "command_channels", "learner_resources", "micro_batches"]


class ValueModel(torch.nn.Module):
    """The critic as a module whose forward gives a value per token, so DDP's hooks see it."""

    def __init__(self, critic):
        super().__init__()
        self.critic = critic

    def forward(self, input_ids, attention_mask):
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
        ids = torch.arange(8)[None] % self.lm.config.vocab_size
        attn, positions = torch.ones_like(ids), torch.ones_like(ids).index_fill_(1, torch.tensor([0]), 0)
        full = self.lm(input_ids=ids, attention_mask=attn).logits[0, :-1]
        return torch.allclose(response_logits(self.lm, ids, attn, positions), full, atol=1e-4, rtol=1e-4)

    def forward(self, input_ids, attention_mask, positions):
        if self.split:
            return response_logits(self.lm, input_ids, attention_mask, positions)
        return self.lm(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][positions[:, 1:].bool()]


def micro_batches(batch: RolloutBatch, rows: list[int], size: int):
    """Micro-batches of `batch`'s `rows`, rows of like length together so that less
    padding is computed (bench_ppo's batches of 16: 2-11% fewer tokens than random
    micro-batches of 8), the padding columns beyond the longest row trimmed.
    Yields (those rows, the micro-batch, its width)."""
    length = batch.attention_mask.sum(1)
    rows = sorted(rows, key=lambda r: int(length[r]))
    for s in range(0, len(rows), size):
        part = rows[s: s + size]
        yield part, batch.select(part), int(length[part].max())


def _all_reduce_tensor(t: torch.Tensor) -> torch.Tensor:
    return torch.tensor(all_reduce_sum(t.tolist()), dtype=t.dtype, device=t.device)


@dataclass
class LearnerPaths:
    policy: str     # the run's initial policy: also pi0, the reference
    critic: str     # the PM (ppo.critic_init=pm) or the policy
    resume_from: str | None = None  # a checkpoint folder to start from


class PPOWorker:
    """One Ray Train worker: the models, their optimizers and the commands the controller sends."""

    def __init__(self, cfg: Config, paths: LearnerPaths):
        ctx = ray.train.get_context()
        self.cfg, self.p = cfg, cfg.ppo
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = device()
        self.device_type = self.device.type
        self.broadcaster = None  # rank 0, broadcast sync: made at the first `broadcast`
        torch.manual_seed(cfg.seed)
        self.paths = paths
        self.build(paths)
        if paths.resume_from:
            self.restore(paths.resume_from)

    # ---- build

    def build(self, paths: LearnerPaths) -> None:
        cfg = self.cfg
        policy = load_policy(paths.policy, cfg.model.dtype)
        # GAE needs a critic; the critic-free estimators (GRPO, RLOO, REINFORCE++) build none.
        self.has_critic = needs_critic(self.p.advantage_estimator)
        critic, self.critic_tokenizer = (load_scalar_head_model(paths.critic, cfg.model.dtype) if self.has_critic
                                         else (None, None))
        trained = [m for m in (policy, critic) if m is not None]
        self.lora = cfg.model.lora_rank
        if self.lora:  # adapters only; pi0 is the policy with them off, so no reference copy
            add_lora(policy, self.lora)
            if critic is not None:
                add_lora(critic, self.lora, head="score")
            self.reference = None
        else:
            self.reference = PolicyModel(load_policy(paths.policy, cfg.model.dtype).eval().requires_grad_(False)).to(self.device)
        self.policy_tokenizer = load_tokenizer(paths.policy)
        set_attention_for(trained, self.p.autocast, self.device_type)
        for m in trained:
            enable_checkpointing(m, cfg.model.gradient_checkpointing, frozen_embeddings=bool(self.lora))
        policy.config.use_cache = False
        trainable = lambda m: [q for q in m.parameters() if q.requires_grad]  # noqa: E731
        self.policy = PolicyModel(policy).to(self.device)
        self.policy_opt = adamw(trainable(self.policy), lr=self.p.lr)
        self.value_model = self.critic_opt = None
        if self.has_critic:
            self.value_model = ValueModel(critic).to(self.device)
            self.critic_opt = adamw(trainable(self.value_model), lr=self.p.critic_lr)
        # What a checkpoint holds: the whole models, or with LoRA their trainable tensors only.
        self.saved = {"policy": AdapterView(policy) if self.lora else policy}
        if self.has_critic:
            self.saved["critic"] = AdapterView(critic) if self.lora else critic
        if self.world > 1:
            self.policy = ray.train.torch.prepare_model(self.policy)
            if self.has_critic:
                self.value_model = ray.train.torch.prepare_model(self.value_model)
        for m in (self.policy, self.value_model):
            if m is not None:
                m.train()
        self.mixed = functools.partial(autocast, self.p.autocast, self.device_type)

    def models(self) -> tuple[dict, dict]:
        """What a checkpoint holds by name (the HF models, or with LoRA their adapters), with the
        optimizers that train them."""
        optimizers = {"policy": self.policy_opt, **({"critic": self.critic_opt} if self.has_critic else {})}
        return dict(self.saved), optimizers

    def ready(self) -> dict:
        """What the group announces when it starts: every rank's pid and placement. No weights:
        the generators start from the same policy, and a put here would hold 0.5 GB of object
        store pages in this process for nothing (`publish` gives them when needed)."""
        me = {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(), "device": str(self.device),
              "malloc": malloc_in_use()}
        ranks = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(ranks, me)
        else:
            ranks = [me]
        return {"pids": [r["pid"] for r in ranks], "placement": ranks}

    # ---- one PPO iteration on this worker's shard

    def train(self, batch: list, iteration: int) -> dict:
        t0 = time.time()
        whole: RolloutBatch = ray.get(batch[0])
        shard = whole.select(whole.shard_rows(self.rank, self.world)).to(self.device)  # whole groups
        self.set_lr(iteration)
        fused = self.fused(shard)
        ref_logp = self.reference_logprobs(shard)
        t_reference = time.time() - t0
        if not self.has_critic:
            values, stats = torch.zeros_like(shard.behaviour_logprobs), {}
        elif fused:
            values, stats = self.critic_step_with_values(shard, ref_logp)
        else:
            values, stats = self.old_values(shard), {}
        exp = self.experience(shard.pm_score, shard.behaviour_logprobs, ref_logp, values, shard.response_mask,
                              groups=shard.groups().to(self.device))
        t_forward = time.time() - t0
        stats = {**stats, **self.update(shard, exp, values, ref_logp, iteration,
                                        train_critic=self.has_critic and not fused)}
        metrics = all_reduce_mean({**stats, "fused_value_pass": float(fused),
                                   "kl": float(exp.kl_k1.mean()), "reward_total": float(exp.reward_total.mean()),
                                   "staleness": float((iteration - shard.policy_version).float().mean()),
                                   "time_learn_reference": t_reference, "time_learn_forward": t_forward,
                                   "time_learn_update": time.time() - t0 - t_forward})
        return {"metrics": metrics,
                # the KL of the logged samples (rank 0's first rows, RolloutBatch.shard_rows)
                "sample_kl": exp.kl_k1[: self.p.log_samples].tolist()}

    def fused(self, shard: RolloutBatch) -> bool:
        """One epoch over one minibatch (the paper's main setting): the critic's first training
        forward sees the weights a separate no-grad pass would, so it gives the old values."""
        return (self.has_critic and self.p.fuse_value_pass and self.p.epochs == 1
                and self.per_worker_minibatch() >= len(shard))

    def per_worker_minibatch(self) -> int:
        return max(1, self.p.minibatch_size // self.world)

    def set_lr(self, iteration: int) -> None:
        factor = ppo.lr_factor(iteration, self.p.iterations, self.p.lr_schedule, self.p.warmup_iterations)
        for opt, lr in ((self.policy_opt, self.p.lr), (self.critic_opt, self.p.critic_lr)):
            for g in opt.param_groups if opt is not None else ():
                g["lr"] = lr * factor

    @torch.no_grad()
    def reference_logprobs(self, shard: RolloutBatch) -> torch.Tensor:
        """log pi0 of the response tokens, in model.dtype (not autocast): the KL is read from these."""
        if shard.ref_logprobs is not None:
            return shard.ref_logprobs
        out = torch.zeros_like(shard.behaviour_logprobs)
        reference = self.reference or unwrap(self.policy)
        with adapters_off(reference.lm) if self.lora else contextlib.nullcontext():
            for rows, mb, w in micro_batches(shard, list(range(len(shard))), self.p.micro_batch_size):
                ids, attn, pos = mb.input_ids[:, :w], mb.attention_mask[:, :w], mb.response_mask[:, :w]
                out[rows, :w] = ppo.response_logprobs(reference(ids, attn, pos), ids, pos, self.cfg.generation.temperature)
        return out

    @torch.no_grad()
    def old_values(self, shard: RolloutBatch) -> torch.Tensor:
        out = torch.zeros_like(shard.behaviour_logprobs)
        for rows, mb, w in micro_batches(shard, list(range(len(shard))), self.p.micro_batch_size):
            with self.mixed():
                out[rows, :w] = ppo.shift_right(unwrap(self.value_model)(mb.input_ids[:, :w], mb.attention_mask[:, :w])).float()
        return out * shard.response_mask

    def experience(self, pm_score, logp, ref_logp, values, mask, whiten: bool | None = None,
                   groups: torch.Tensor | None = None) -> ppo.Experience:
        """ppo.make_experience with this run's settings; whitening over every rank's shard
        (the group estimators need only their own groups, which a shard holds whole)."""
        p = self.p
        return ppo.make_experience(
            pm_score, logp, ref_logp, values, mask, kl_coef=p.kl_coef,
            kl_estimator=p.kl_estimator, advantage_estimator=p.advantage_estimator, gamma=p.gamma, lam=p.gae_lambda,
            whiten_advantages=p.whiten_advantages if whiten is None else whiten,
            all_reduce_sum=_all_reduce_tensor if self.world > 1 else None, groups=groups, kl_in=p.kl_in)

    # ---- the updates

    def step(self, model, opt, shard: RolloutBatch, idx: list[int], loss_of) -> tuple[dict, list]:
        """One optimizer step of `model` on rows `idx`, micro-batched.
        loss_of(rows, micro-batch, width, mask) -> (loss, stats, output). Returns the stats,
        minibatch-weighted, and every micro-batch's (rows, width, output)."""
        token_mean = self.p.loss_agg == "token_mean"
        mask = shard.response_mask
        units = mask[idx].sum() if token_mean else torch.tensor(float(len(idx)))
        micro = list(micro_batches(shard, idx, self.p.micro_batch_size))
        totals: dict[str, float] = {}
        outputs = []
        for j, (rows, mb, w) in enumerate(micro):
            m = mask[rows, :w]
            # each micro-batch's share of the minibatch loss, so the sum is the minibatch mean
            weight = (m.sum() if token_mean else torch.tensor(float(len(rows)))) / units
            with no_sync_unless(model, j == len(micro) - 1), self.mixed():
                loss, stats, out = loss_of(rows, mb, w, m)
                (loss * weight).backward()
            outputs.append((rows, w, out))
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + float(v) * float(weight)
        clip_and_step(model, opt, self.p.max_grad_norm)  # frees this model's gradients before the other's backward
        return totals, outputs

    def critic_step_with_values(self, shard: RolloutBatch, ref_logp: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The fused pass: one critic step on the whole shard whose forward also gives the old
        values (returned, [B, T]); each micro-batch's returns come from its own values."""
        def loss_of(rows, mb, w, m):
            values = ppo.shift_right(self.value_model(mb.input_ids[:, :w], mb.attention_mask[:, :w])).float()
            old = values.detach() * m
            returns = self.experience(mb.pm_score, mb.behaviour_logprobs[:, :w], ref_logp[rows, :w], old, m,
                                      whiten=False).returns
            vl = ppo.value_loss(values, old, returns, m, self.p.value_clip_eps, self.p.loss_agg)
            return self.p.value_coef * vl, {"value_loss": vl.detach()}, old

        stats, outputs = self.step(self.value_model, self.critic_opt, shard, list(range(len(shard))), loss_of)
        values = torch.zeros_like(shard.behaviour_logprobs)
        for rows, w, old in outputs:
            values[rows, :w] = old
        return values, stats

    def update(self, shard: RolloutBatch, exp: ppo.Experience, old_values: torch.Tensor, ref_logp: torch.Tensor,
               iteration: int, train_critic: bool) -> dict:
        """ppo.epochs passes over the shard in minibatches: a policy step (and a critic step) each."""
        p, temperature = self.p, self.cfg.generation.temperature
        old_logp = shard.behaviour_logprobs

        def policy_loss(rows, mb, w, m):
            logp, ent = ppo.response_logprobs(self.policy(mb.input_ids[:, :w], mb.attention_mask[:, :w], m),
                                              mb.input_ids[:, :w], m, temperature, with_entropy=True,
                                              entropy_grad=p.entropy_coef != 0)
            pl, st = ppo.ppo_loss(logp, old_logp[rows, :w], exp.advantages[rows, :w], m, p.clip_eps, p.loss_agg)
            entropy = ppo.masked_mean(ent, m, p.loss_agg)
            loss = pl - p.entropy_coef * entropy
            if p.kl_in == "loss":
                kl = ppo.kl_loss(logp, ref_logp[rows, :w], m, p.loss_agg)
                loss, st = loss + p.kl_coef * kl, {**st, "kl_loss": kl.detach()}
            return loss, {"policy_loss": pl.detach(), "entropy": entropy.detach(), **st}, None

        def critic_loss(rows, mb, w, m):
            values = ppo.shift_right(self.value_model(mb.input_ids[:, :w], mb.attention_mask[:, :w])).float()
            vl = ppo.value_loss(values, old_values[rows, :w], exp.returns[rows, :w], m, p.value_clip_eps, p.loss_agg)
            return p.value_coef * vl, {"value_loss": vl.detach()}, None

        totals: dict[str, float] = {}
        updates = 0
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "ppo-minibatches", iteration))
        for _ in range(p.epochs):
            order = torch.randperm(len(shard), generator=gen).tolist()
            for start in range(0, len(order), self.per_worker_minibatch()):
                idx = order[start: start + self.per_worker_minibatch()]
                steps = [(self.policy, self.policy_opt, policy_loss)]
                if train_critic:
                    steps.append((self.value_model, self.critic_opt, critic_loss))
                for model, opt, loss_of in steps:
                    for k, v in self.step(model, opt, shard, idx, loss_of)[0].items():
                        totals[k] = totals.get(k, 0.0) + v
                updates += 1
        return {k: v / max(1, updates) for k, v in totals.items()}

    # ---- weights, checkpoints, the final models

    def publish(self) -> list | None:
        """[ObjectRef] to the policy's weights (rank 0), for the generators. No ref stays
        here: once the generators hold them, the object is freed."""
        return [ray.put(weights_for_sync(unwrap(self.policy).lm))] if self.rank == 0 else None

    def broadcast(self, version: int, workers: list) -> dict | None:
        """Rank 0: send the policy straight into the generation workers' engines."""
        if self.rank != 0:
            return None
        if self.broadcaster is None:
            g = self.cfg.generation
            self.broadcaster = WeightBroadcaster(self.device, g.tensor_parallel_size, g.weight_bucket_mb << 20)
        return self.broadcaster.send(hf_state_dict(unwrap(self.policy).lm), version, workers)

    def checkpoint(self, root: str, step: int, controller_state: dict) -> dict:
        models, optimizers = self.models()
        if self.lora:  # the adapters need their base
            controller_state = {**controller_state, "lora": {"rank": self.lora, "base_policy": self.paths.policy,
                                                             "base_critic": self.paths.critic}}
        folder = save_checkpoint(Path(root), step, models, optimizers, controller_state, self.rank)
        return {"path": str(folder)}

    def restore(self, path: str) -> dict:
        """Roll the models and optimizers back to a checkpoint (a restarted group, or --resume)."""
        models, optimizers = self.models()
        restore_checkpoint(Path(path), models, optimizers)
        return {"path": path, "weights": self.publish()}

    def save(self, path: str) -> dict:
        """The run's final policy/ and critic/ Hugging Face folders."""
        if self.rank == 0:
            fmt = self.cfg.model.conversation_format  # resolved by the controller
            plain = merged_copy if self.lora else (lambda m: m)  # LoRA: the adapters merged in
            save_model(plain(unwrap(self.policy).lm), self.policy_tokenizer, Path(path) / "policy", conversation_format=fmt)
            if self.has_critic:
                save_model(plain(unwrap(self.value_model).critic), self.critic_tokenizer, Path(path) / "critic",
                           conversation_format=fmt)
        return {"path": path}


def ppo_train_loop(config: dict) -> None:
    """Ray Train's per-worker entry point: build the worker, then serve the controller's commands."""
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    worker = PPOWorker(config["cfg"], config["paths"])
    serve_commands(worker, config["commands"][rank], config["results"], rank, ctx.get_world_size())


def learner_resources(cfg: Config) -> dict[str, float]:
    """What one PPO learner worker asks Ray for: its CPUs, its GPU share and custom resources."""
    gpus = gpus_for(cfg.ppo.gpus_per_learner, ray.cluster_resources().get("GPU", 0), 1)
    return {"CPU": cfg.ppo.cpus_per_learner, **({"GPU": gpus} if gpus else {}),
            **parse_resources(cfg.ppo.learner_resources, "ppo.learner_resources")}


def command_channels(mailbox, n: int) -> list:
    """Each learner rank's command channel on the run's channel actor, by ref: commands carry
    actor handles and refs the actor has no need to unpickle (Channel says why)."""
    return [mailbox.channel(f"learner-{rank}-commands", by_ref=True) for rank in range(n)]


class PPOLearnerGroup:
    """Driver-side handle: runs the TorchTrainer in a thread and sends its workers commands."""

    def __init__(self, cfg: Config, paths: LearnerPaths, run_dir: Path, mailbox):
        """`mailbox`: the run's RolloutQueue, whose actor also carries commands and results."""
        n = cfg.ppo.num_learners
        commands = command_channels(mailbox, n)
        self.results = mailbox.channel("learner-results")
        resources = learner_resources(cfg)
        gpus = resources.get("GPU", 0)
        self.trainer = torch_trainer(
            ppo_train_loop,
            train_loop_config={"cfg": cfg, "paths": paths, "commands": commands, "results": self.results},
            torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
            scaling_config=ScalingConfig(num_workers=n, use_gpu=bool(gpus), resources_per_worker=resources),
            run_config=RunConfig(name="ppo-learners", storage_path=str(Path(run_dir).resolve() / "ray_train"),
                                 failure_config=FailureConfig(max_failures=cfg.ppo.max_learner_restarts),
                                 worker_runtime_env={"env_vars": worker_env(trains_in=cfg.ppo.autocast)}),
        )
        self.client = CommandClient(commands, self.results, RESULT_TIMEOUT_S)
        self._thread = threading.Thread(target=self._fit, daemon=True, name="ppo-learner-group")
        self._thread.start()
        self._on_ready(self.client.wait_ready())

    def _fit(self) -> None:
        error = None
        try:
            self.trainer.fit()
        except BaseException as e:  # reaches the controller through the results channel
            error = e
        post_fit_ended(self.results, error)

    def _on_ready(self, ready: dict) -> None:
        self.pids, self.placement = ready["pids"], ready["placement"]

    def _call(self, name: str, **args) -> dict:
        try:
            return self.client.call(name, **args)
        except LearnerGroupRestarted as restarted:
            self.pids = restarted.pids
            raise

    def wait_restarted(self) -> LearnerGroupRestarted:
        """Block until the group announces its restart (a worker died outside a command)."""
        restarted = LearnerGroupRestarted("the learner group restarted after a worker failure", self.client.wait_ready())
        self.pids = restarted.pids
        return restarted

    def train(self, batch_ref, iteration: int) -> tuple[dict, list[float]]:
        """One PPO update on a rollout batch (an ObjectRef); returns (metrics, the KL of the
        logged samples)."""
        msg = self._call("train", batch=[batch_ref], iteration=iteration)
        return msg["metrics"], msg["sample_kl"]

    def publish(self) -> list:
        """[ObjectRef] to the policy's current weights."""
        return self._call("publish")

    def broadcast(self, version: int, workers: list) -> dict:
        """Send the policy to the generation `workers` (actor handles), which hold `version` after."""
        return self._call("broadcast", version=version, workers=workers)

    def checkpoint(self, root: Path, step: int, controller_state: dict) -> Path:
        return Path(self._call("checkpoint", root=str(root), step=step, controller_state=controller_state)["path"])

    def restore(self, path: Path) -> list:
        """Load a checkpoint's policy, critic and optimizers into the running group; returns [weights ref]."""
        return self._call("restore", path=str(path))["weights"]

    def save(self, path: Path) -> Path:
        """Write policy/ and critic/ HF folders into `path`."""
        return Path(self._call("save", path=str(path))["path"])

    def shutdown(self) -> None:
        """Stop the workers and wait for fit() to return. A worker takes the stop after its
        current command, and Ray Train winds down for seconds more: while a KeyboardInterrupt
        (Ctrl-C, or SIGTERM through the CLI) unwinds the run, wait only briefly; the CLI then
        ends the actors with Ray (hh_ray/orchestration/cli.py, Interrupts)."""
        import queue
        import sys

        interrupted = isinstance(sys.exc_info()[1], KeyboardInterrupt)
        self.client.stop()
        self._thread.join(timeout=1.0 if interrupted else 120)
        if self._thread.is_alive():
            # fit() ends only when Ray does; its fit_ended notice then has no reader and the
            # queue actor is gone: it goes into a local queue, not into a traceback.
            self.results = queue.Queue()
