"""Preference-model training on a Ray Train learner group (Bai et al. 2022, §3 and App. A.2).

One `TorchTrainer` runs every stage: the optional PM pretraining (PMP) on a
generic comparison set at `pm.pmp_lr`, then finetuning on HH comparisons at
`pm.lr`, each with a fresh AdamW. The loss is −log σ(r_chosen − r_rejected),
the score read at the appended end-of-context token (hh_ray.models).

Data order is a pure function of (seed, stage, epoch) and the pairs' lengths
(length-grouped batches), so a checkpoint only
needs the *position* (stage, epoch, step) to resume exactly: the same pairs
are never seen twice and none are skipped. A running digest of every trained
pair id proves it (`seen_digest` in metrics.jsonl).

Checkpoints (every `pm.checkpoint_every` optimizer steps) are the project's
one format (hh_ray.checkpoint), written by learners.kit into
run_dir/checkpoints/step-N: model.safetensors, model.optimizer.safetensors +
model.optimizer.json, state.json (the position). Every worker starts from the
newest one there: the --resume checkpoint, or after a worker-group restart the
newest this run wrote. On a multi-node cluster run_dir must be on shared
storage (as for the final PM).

Metrics travel from rank 0 through a `ray.util.queue.Queue` to the driver's
Tracker and progress bar, not through `ray.train.report`: Ray Train V2 keeps
no metrics without a checkpoint, and each report is a barrier that cost ~2 s
here, 10× a tiny-model step.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import time
from pathlib import Path

import torch

from hh_ray.checkpoint import latest_checkpoint, prune_checkpoints, read_state, resume_checkpoint
from hh_ray.config import with_value
from hh_ray.conversation import model_format, pm_format
from hh_ray.data import DataError, load_comparisons
from hh_ray.lora import add_lora, hf_state_dict
from hh_ray.packing import length_grouped, packed_length
from learners.group import checkpoint_to_resume, fit_and_log, learner_trainer, with_learner_autocast, worker_resources
from learners.kit import (adamw, all_reduce_sum, clip_and_step, full_model_state, no_sync_unless,
                          restore_checkpoint, save_checkpoint, unwrap)

MAX_GRAD_NORM = 1.0  # clipping keeps the tiny test model's high LR stable; harmless at paper LRs


# ---------------------------------------------------------------- data order (pure)

def epoch_order(n: int, seed: int, stage: int, epoch: int) -> list[int]:
    """The permutation of pair ids for one epoch of one stage; same on every worker and every resume."""
    ids = list(range(n))
    random.Random(f"{seed}/{stage}/{epoch}").shuffle(ids)
    return ids


def steps_per_epoch(n: int, batch_size: int, min_batch: int) -> int:
    """Full batches, plus the tail when every micro-batch of every worker still gets a pair.

    A smaller tail (< workers × grad_accum pairs) is dropped: a worker with an
    empty micro-batch would leave DDP's gradient all-reduce hanging.
    """
    return n // batch_size + (1 if n % batch_size >= min_batch else 0)


def step_ids(order: list[int], step: int, batch_size: int) -> list[int]:
    return order[step * batch_size: (step + 1) * batch_size]


def worker_micro_batches(batch: list[int], rank: int, world: int, grad_accum: int) -> list[list[int]]:
    """This worker's share of one optimizer step's pairs, cut into grad_accum micro-batches."""
    mine = batch[rank::world]
    return [mine[k::grad_accum] for k in range(grad_accum)]


def chain_digest(previous: str, ids: list[int]) -> str:
    """A running hash over the ordered pair ids trained on: equal digests, equal data seen."""
    return hashlib.sha256((previous + ":" + ",".join(map(str, ids))).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- position and checkpoints (shared with distillation)

def fresh_position() -> dict:
    return {"stage": 0, "epoch": 0, "step_in_epoch": 0, "global_step": 0, "examples_seen": 0,
            "seen_digest": "", "optimizer_stage": -1, "done": False}


def resume_point(root: Path) -> tuple[Path | None, dict]:
    """(checkpoint to restore or None, data position) for a worker starting up.

    The newest checkpoint under root that verifies is the one to continue from in
    every case: on a fresh run there is none (checkpoint_to_resume refused a used
    folder), with --resume it is the one named, and after a Ray Train worker-group
    restart it is the newest this run wrote (a corrupt newer one is skipped).
    """
    folder = resume_checkpoint(root)
    return folder, (read_state(folder) if folder else fresh_position())


def checkpoint(root: Path, model, opt, pos: dict, rank: int, keep: int = 3) -> None:
    """Save the learner at pos["global_step"] (collective: every rank calls it), keeping the newest
    `keep` (the section's keep_checkpoints; 0 = all)."""
    if save_checkpoint(root, pos["global_step"], {"model": model}, {"model": opt}, pos, rank):
        prune_checkpoints(root, keep)


# ---------------------------------------------------------------- the learner (one per Ray Train worker)

def train_step(model, opt, rows, micro_batches, global_n, world, pad_id, mixed) -> tuple[float, float]:
    """One optimizer step over this worker's micro-batches; returns (summed loss, correct pairs).
    rows[i] holds pair i's [chosen, rejected] token rows (hh_ray.models.pm_group_rows); each pair
    is one packed row whose two transcripts share the context (hh_ray.packing)."""
    from hh_ray.models import packed_values
    from hh_ray.packing import pack_groups
    from hh_ray.pm_eval import pairwise_loss

    loss_sum, correct = 0.0, 0.0
    for k, ids in enumerate(micro_batches):
        # Gradients are all-reduced only on the last micro-batch.
        with no_sync_unless(model, sync=k == len(micro_batches) - 1):
            with mixed():
                scores = packed_values(model, pack_groups([rows[i] for i in ids], pad_id)).float()
            r_c, r_r = scores[0::2], scores[1::2]
            loss = pairwise_loss(r_c, r_r)
            # DDP averages gradients over workers: scale so the step's gradient
            # is that of the mean loss over the whole global batch.
            (loss * len(ids) * world / global_n).backward()
        loss_sum += loss.item() * len(ids)
        correct += ((r_c > r_r).float() + 0.5 * (r_c == r_r).float()).sum().item()
    clip_and_step(model, opt, MAX_GRAD_NORM)
    return loss_sum, correct


def stage_order(cfg, si: int, epoch: int, lengths: list[int]) -> list[int]:
    """The pair order of one epoch of one stage: shuffled, then length-grouped (pm.group_by_length)."""
    order = epoch_order(len(lengths), cfg.seed, si, epoch)
    if cfg.pm.group_by_length:
        order = length_grouped(order, lengths, cfg.pm.batch_size, f"{cfg.seed}/{si}/{epoch}")
    return order


def train_stage(model, opt, tok, stage: dict, si: int, pos: dict, config: dict, rank: int, world: int,
                mixed) -> bool:
    """Train one stage from pos (updated in place) to its end; True when stop_after_steps stopped it."""
    from hh_ray.models import pm_group_rows
    from hh_ray.pm_eval import comparison_groups

    cfg, pairs = config["cfg"], stage["comparisons"]
    pm, root, stop_after = cfg.pm, Path(config["checkpoint_root"]), config["stop_after_steps"]
    # Tokenised once per stage; the lengths order the batches.
    rows = pm_group_rows(tok, comparison_groups(pairs, tok, cfg.model.conversation_format), cfg.model.max_seq_len)
    lengths = [packed_length(r) for r in rows]
    n_steps = steps_per_epoch(len(pairs), pm.batch_size, world * pm.grad_accum)
    for epoch in range(pos["epoch"], pm.epochs):
        order = stage_order(cfg, si, epoch, lengths)
        for step in range(pos["step_in_epoch"], n_steps):
            ids = step_ids(order, step, pm.batch_size)
            t0 = time.perf_counter()
            loss_sum, correct = train_step(model, opt, rows, worker_micro_batches(ids, rank, world, pm.grad_accum),
                                           len(ids), world, tok.pad_token_id, mixed)
            loss_sum, correct = all_reduce_sum([loss_sum, correct])
            dt = time.perf_counter() - t0
            pos.update(step_in_epoch=step + 1, global_step=pos["global_step"] + 1,
                       examples_seen=pos["examples_seen"] + len(ids), seen_digest=chain_digest(pos["seen_digest"], ids))
            if rank == 0:
                config["metrics_queue"].put({
                    "stage": stage["name"], "global_step": pos["global_step"], "epoch": epoch, "stage_step": step + 1,
                    "loss": loss_sum / len(ids), "accuracy": correct / len(ids), "lr": stage["lr"],
                    "batch_pairs": len(ids), "examples_seen": pos["examples_seen"], "examples_per_s": len(ids) / dt,
                    "seen_digest": pos["seen_digest"], "batch_digest": chain_digest("", ids)})
            stopping = stop_after is not None and pos["global_step"] >= stop_after
            if stopping or pos["global_step"] % pm.checkpoint_every == 0:
                checkpoint(root, model, opt, pos, rank, pm.keep_checkpoints)
            if stopping:
                return True
        pos.update(step_in_epoch=0, epoch=epoch + 1)
    return False


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: every stage from the resume point, then rank 0 saves the PM.
    config: {"cfg": Config, "stages": [ObjectRef], "init_path", "checkpoint_root", "pm_dir",
    "metrics_queue", "stop_after_steps"}."""
    import ray
    import ray.train
    import ray.train.torch

    import transformers

    from hh_ray.models import autocast, enable_checkpointing, load_scalar_head_model, save_model, set_attention_for

    transformers.logging.set_verbosity_error()  # the "score.weight newly initialised" report is expected
    cfg = config["cfg"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)  # same head init on every rank (DDP broadcasts rank 0's anyway)
    model, tok = load_scalar_head_model(config["init_path"], cfg.model.dtype)
    set_attention_for([model], cfg.pm.autocast, device.type)
    mixed = functools.partial(autocast, cfg.pm.autocast, device.type)
    if cfg.model.lora_rank:  # adapters and the score head train; the backbone stays
        add_lora(model, cfg.model.lora_rank, head="score")
    enable_checkpointing(model, cfg.model.gradient_checkpointing, frozen_embeddings=bool(cfg.model.lora_rank))
    model = ray.train.torch.prepare_model(model, parallel_strategy=cfg.pm.strategy)

    resume, pos = resume_point(Path(config["checkpoint_root"]))
    stages = ray.get(config["stages"][0])  # wrapped in a list so Ray does not resolve it on the way
    for si in range(pos["stage"], len(stages)):
        opt = adamw([p for p in model.parameters() if p.requires_grad], lr=stages[si]["lr"],
                    weight_decay=cfg.pm.weight_decay)
        if resume is not None:
            # Checkpoints fall inside a stage, so the first stage entered is the saved one:
            # its weights always, its optimizer state when that stage's optimizer was saved.
            restore_checkpoint(resume, {"model": model}, {"model": opt} if pos["optimizer_stage"] == si else None)
            resume = None
        pos["optimizer_stage"] = si
        if train_stage(model, opt, tok, stages[si], si, pos, config, rank, world, mixed):
            return
        pos.update(stage=si + 1, epoch=0)

    # collective under FSDP; with LoRA (DDP only) the adapters merged under the plain names
    full = hf_state_dict(unwrap(model)) if cfg.model.lora_rank else full_model_state(model)
    if rank == 0:
        final, _ = load_scalar_head_model(config["init_path"], cfg.model.dtype)
        final.load_state_dict(full)
        save_model(final, tok, config["pm_dir"], conversation_format=cfg.model.conversation_format)
        config["metrics_queue"].put({"done": True, "global_step": pos["global_step"],
                                     "examples_seen": pos["examples_seen"], "seen_digest": pos["seen_digest"]})


# ---------------------------------------------------------------- the driver

def count_truncated(tok, comparisons, max_len: int, fmt: str = "hh") -> int:
    """Transcripts that lose their start to max_len tokens (end-of-context token included):
    a comparison's context is cut once for both (hh_ray.packing.truncate_group)."""
    from hh_ray.models import pm_group_rows
    from hh_ray.packing import truncate_group
    from hh_ray.pm_eval import comparison_groups

    full = pm_group_rows(tok, comparison_groups(comparisons, tok, fmt), 10**9)  # tokenised once, uncut
    return sum(len(a) != len(b) for g in full for a, b in zip(g, truncate_group(g, max_len)))


def build_stages(cfg) -> tuple[list[dict], list, dict]:
    """([{name, comparisons, lr}], held-out comparisons, skip counts). Refuses empty data."""
    from hh_ray.pm_eval import pm_comparisons

    counts: dict = {}
    train, held_out = pm_comparisons(cfg, counts)
    stages = []
    if cfg.pm.pmp_source:
        pmp_counts: dict = {}
        pmp = load_comparisons(cfg.pm.pmp_source, split="train", skip_bad=cfg.data.skip_bad,
                               num_synthetic=cfg.data.num_synthetic, seed=cfg.seed + 1,
                               counter=pmp_counts, skip_identical=True)
        counts.update({f"pmp_{k}": v for k, v in pmp_counts.items()})
        stages.append({"name": "pmp", "comparisons": pmp, "lr": cfg.pm.pmp_lr})
    stages.append({"name": "finetune", "comparisons": train, "lr": cfg.pm.lr})
    return stages, held_out, counts


def check_settings(cfg, stages) -> None:
    """What the config alone cannot tell (hh_ray.config.validate checked the rest as it loaded):
    that every stage's data makes at least one optimizer step."""
    per_step = cfg.pm.num_workers * cfg.pm.grad_accum
    for s in stages:
        if steps_per_epoch(len(s["comparisons"]), cfg.pm.batch_size, per_step) == 0:
            raise DataError(f"{s['name']}: {len(s['comparisons'])} comparisons make no optimizer step of "
                            f"{per_step}+ pairs; lower pm.batch_size or add data")


def evaluate_saved_pm(pm_dir: str, comparisons, max_len: int, dtype: str, out_dir: str) -> dict:
    """Held-out metrics of a PM folder, loaded as the scoring service will load it."""
    from hh_ray.models import load_scalar_head_model
    from hh_ray.pm_eval import evaluate_pm

    model, tok = load_scalar_head_model(pm_dir, dtype)
    t0 = time.perf_counter()
    results = evaluate_pm(model, tok, comparisons, max_len, Path(out_dir), fmt=pm_format(pm_dir))
    results["seconds_per_1000_pairs_scored"] = (time.perf_counter() - t0) / len(comparisons) * 1000
    (Path(out_dir) / "pm_eval.json").write_text(json.dumps(results, indent=2))
    return results


def prepare_data(cfg) -> tuple[list[dict], list, str, dict]:
    """(stages, held-out comparisons, PM init path, counts to log), refused when a stage makes no step;
    logs the plan and how many transcripts the context length cuts. `cfg.model.conversation_format`
    must be resolved (train_pm does it)."""
    from hh_ray.models import load_pm_tokenizer, resolve_model

    stages, held_out, counts = build_stages(cfg)
    check_settings(cfg, stages)
    init_path = resolve_model(cfg.model.pm or cfg.model.policy, cfg.model.cache_dir)
    tok = load_pm_tokenizer(init_path)
    truncated = count_truncated(tok, [c for s in stages for c in s["comparisons"]] + held_out, cfg.model.max_seq_len,
                                cfg.model.conversation_format)
    plan = " → ".join(f"{s['name']} {len(s['comparisons'])} pairs (lr {s['lr']:g})" for s in stages)
    print(f"PM data: {plan}; "
          f"held out {len(held_out)}; skipped {counts or 'none'}; {truncated} transcripts over "
          f"{cfg.model.max_seq_len} tokens truncated from the left (end-of-context token kept)")
    info = {"train_pairs": len(stages[-1]["comparisons"]), "held_out_pairs": len(held_out),
            "truncated_transcripts": truncated, **{f"skipped_{k}": v for k, v in counts.items()}}
    return stages, held_out, init_path, info


def total_pairs(cfg, stages) -> int:
    """Pairs the whole run trains on (dropped tails left out): the progress bar's length."""
    per_step = cfg.pm.num_workers * cfg.pm.grad_accum
    return cfg.pm.epochs * sum(min(len(s["comparisons"]), cfg.pm.batch_size * steps_per_epoch(
        len(s["comparisons"]), cfg.pm.batch_size, per_step)) for s in stages)


def fit_with_progress(trainer, queue, tracker, total: int, start: int) -> dict:
    """Run the fit, logging each worker message and advancing a progress bar; returns the last message."""
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, unit="pair", desc="PM", dynamic_ncols=True)
    last: dict = {}

    def on_message(m: dict) -> None:
        last.update(m)
        stage = "pm_" + m.get("stage", "done")
        tracker.log(int(m.get("global_step", 0)), {k: v for k, v in m.items() if k not in ("stage", "global_step")},
                    stage=stage)
        if "loss" in m:
            bar.update(m["batch_pairs"])
            bar.set_postfix(stage=m["stage"], loss=f"{m['loss']:.3f}", acc=f"{m['accuracy']:.2f}")

    try:
        fit_and_log(trainer, queue, on_message)
    finally:
        bar.close()
    return last


def train_pm(cfg, run_dir, resume: bool = False, stop_after_steps: int | None = None) -> Path:
    """Train the PM (PMP, then finetuning) and evaluate it on the held-out split.

    Returns run_dir/pm, or — when stop_after_steps stops it early — the
    checkpoint it wrote, which `resume=True` continues from.
    """
    from ray.util.queue import Queue

    from hh_ray.pm_eval import flat_summary, format_table
    from hh_ray.tracking import Tracker

    from hh_ray.models import load_pm_tokenizer, resolve_model

    run_dir = Path(run_dir).resolve()
    ckpt_root, latest = checkpoint_to_resume(run_dir, resume)
    # The PM reads conversations as the policy it will score writes them: in its backbone's format.
    init = resolve_model(cfg.model.pm or cfg.model.policy, cfg.model.cache_dir)
    cfg = with_value(cfg, "model.conversation_format",
                     model_format(init, cfg.model.conversation_format, load_pm_tokenizer(init)))
    stages, held_out, init_path, info = prepare_data(cfg)
    import ray  # connected by the caller (hh_ray.orchestration.cluster.ensure_ray)

    cfg = with_learner_autocast(cfg, "pm.autocast", worker_resources(cfg.pm.num_workers, cfg.pm.cpus_per_worker))

    tracker = Tracker(run_dir, cfg, stage="pm")
    tracker.log(0, info, stage="pm_data")
    queue = Queue()
    trainer = learner_trainer(
        train_loop_per_worker, num_workers=cfg.pm.num_workers, cpus_per_worker=cfg.pm.cpus_per_worker,
        ckpt_root=ckpt_root, autocast=cfg.pm.autocast, config={
            "cfg": cfg, "stages": [ray.put(stages)], "init_path": init_path, "checkpoint_root": str(ckpt_root),
            "pm_dir": str(run_dir / "pm"), "metrics_queue": queue, "stop_after_steps": stop_after_steps})
    last = fit_with_progress(trainer, queue, tracker, total_pairs(cfg, stages),
                             read_state(latest)["examples_seen"] if latest else 0)
    if not last.get("done"):
        tracker.close()
        return latest_checkpoint(ckpt_root)

    pm_dir = run_dir / "pm"
    # A 1-CPU Ray task, not the driver: Ray gives it one thread, and on a
    # shared small machine torch's default of one thread per core ran 15×
    # slower than that (spinning OpenMP threads under oversubscription).
    results = ray.get(ray.remote(num_cpus=1)(evaluate_saved_pm).remote(
        str(pm_dir), held_out, cfg.model.max_seq_len, cfg.model.dtype, str(run_dir / "pm_eval")))
    summary = flat_summary(results)
    tracker.log(int(last["global_step"]), summary, stage="pm_eval")
    tracker.summary({f"pm_eval/{k}": v for k, v in summary.items()})
    tracker.close()
    print(format_table(results))
    return pm_dir
