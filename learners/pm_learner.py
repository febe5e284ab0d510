"""Preference-model training on a Ray Train learner group (Bai et al. 2022, §4).

One `TorchTrainer` runs every stage: the optional PM pretraining (PMP) on a
generic comparison set at `pm.pmp_lr`, then finetuning on HH comparisons at
`pm.lr`, each with a fresh AdamW. The loss is −log σ(r_chosen − r_rejected),
the score read at the appended end-of-context token (hh_ray.models).

Data order is a pure function of (seed, stage, epoch), so a checkpoint only
needs the *position* (stage, epoch, step) to resume exactly: the same pairs
are never seen twice and none are skipped. A running digest of every trained
pair id proves it (`seen_digest` in metrics.jsonl).

Checkpoints (every `pm.checkpoint_every` optimizer steps) are plain files:
model.safetensors, optimizer.safetensors + optimizer.json, state.json. Ray
Train persists them under run_dir/checkpoints/<attempt>/step_N; on a
multi-node cluster run_dir must be on shared storage (as for the final PM).

Metrics travel from rank 0 through a `ray.util.queue.Queue` to the driver's
Tracker and progress bar. Not through `ray.train.report`: Ray Train V2 keeps no
metrics without a checkpoint (DESIGN.md §3), and each report is a barrier that
cost ~2 s here, 10× a tiny-model step; reports carry checkpoints only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from hh_ray.data import DataError, load_comparisons
from learners.group import adamw, checkpoint_to_resume, fit_and_log, latest_checkpoint, learner_trainer  # noqa: F401 (latest_checkpoint re-exported)

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


# ---------------------------------------------------------------- checkpoints (safetensors + JSON)

def _state_dict_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Full (unsharded) tensors gathered on rank 0 on the CPU: the same files
    # whether DDP or FSDP wrote them, and flat names safetensors can hold.
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def optimizer_to_files(optim_sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors as "<param name>/<key>", the JSON-able rest) of a full optimizer state dict keyed by names."""
    tensors, scalars = {}, {}
    for name, state in optim_sd["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{name}/{k}"] = v.detach().cpu().contiguous().clone()
            else:
                scalars[f"{name}/{k}"] = v
    return tensors, {"param_groups": optim_sd["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        name, k = key.rsplit("/", 1)
        state.setdefault(name, {})[k] = v
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def write_checkpoint(folder: Path, model_sd: dict, optim_sd: dict, state: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous().clone() for k, v in model_sd.items()}, str(folder / "model.safetensors"))
    tensors, meta = optimizer_to_files(optim_sd)
    save_file(tensors, str(folder / "optimizer.safetensors"))
    (folder / "optimizer.json").write_text(json.dumps(meta))
    # state.json last: a folder without it is an unfinished save.
    (folder / "state.json").write_text(json.dumps(state, indent=1))


def read_checkpoint(folder: Path) -> tuple[dict, dict, dict]:
    """(model tensors, flat optimizer state, training state) of a checkpoint folder."""
    from safetensors.torch import load_file

    optim = optimizer_from_files(load_file(str(folder / "optimizer.safetensors")),
                                 json.loads((folder / "optimizer.json").read_text()))
    return (load_file(str(folder / "model.safetensors")), optim,
            json.loads((folder / "state.json").read_text()))


# ---------------------------------------------------------------- the learner (one per Ray Train worker)

def fresh_position() -> dict:
    return {"stage": 0, "epoch": 0, "step_in_epoch": 0, "global_step": 0, "examples_seen": 0,
            "seen_digest": "", "optimizer_stage": -1, "done": False}


def restore(model, resume_from: str | None) -> tuple[dict | None, dict]:
    """Load the checkpoint this worker should start from into `model`: Ray's own
    after a worker-group restart within this fit(), else the one --resume named
    (Ray Train V2 deprecates resume_from_checkpoint). Returns (optimizer state
    or None, data position)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    with ckpt.as_directory() if ckpt else contextlib.nullcontext(resume_from) as d:
        if not d:
            return None, fresh_position()
        model_sd, optim_sd, pos = read_checkpoint(Path(d))
        model.load_state_dict(model_sd)
        return optim_sd, pos


def train_step(model, opt, tok, pairs, micro_batches, max_len, global_n, world, device) -> tuple[float, float]:
    """One optimizer step over this worker's micro-batches; returns (summed loss, correct pairs)."""
    from hh_ray.models import encode_for_pm
    from hh_ray.pm_eval import pairwise_loss

    opt.zero_grad(set_to_none=True)
    loss_sum, correct = 0.0, 0.0
    for k, ids in enumerate(micro_batches):
        batch = [pairs[i] for i in ids]
        enc = encode_for_pm(tok, [c.prompt + c.chosen for c in batch] + [c.prompt + c.rejected for c in batch], max_len)
        # Gradients are all-reduced only on the last micro-batch.
        sync = k == len(micro_batches) - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if sync else model.no_sync():
            # The model's own forward pools at the last non-pad token, which is
            # the end-of-context token because the PM pad is a token of its own.
            scores = model(input_ids=enc["input_ids"].to(device),
                           attention_mask=enc["attention_mask"].to(device)).logits.squeeze(-1).float()
            r_c, r_r = scores[: len(batch)], scores[len(batch):]
            loss = pairwise_loss(r_c, r_r)
            # DDP averages gradients over workers: scale so the step's gradient
            # is that of the mean loss over the whole global batch.
            (loss * len(batch) * world / global_n).backward()
        loss_sum += loss.item() * len(batch)
        correct += ((r_c > r_r).float() + 0.5 * (r_c == r_r).float()).sum().item()
    if hasattr(model, "clip_grad_norm_"):  # FSDP: the norm over all shards
        model.clip_grad_norm_(MAX_GRAD_NORM)
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    opt.step()
    return loss_sum, correct


def _all_reduce(values: list[float]) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
    return t.cpu().tolist()


def _checkpoint(metrics: dict, model, opt, pos: dict, rank: int) -> None:
    import ray.train
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    # Gathering full state dicts is collective under FSDP: every rank takes part.
    model_sd = get_model_state_dict(model, options=_state_dict_options())
    optim_sd = get_optimizer_state_dict(model, opt, options=_state_dict_options())
    tmp = None
    if rank == 0:
        tmp = Path(tempfile.mkdtemp(prefix="pm-ckpt-"))
        write_checkpoint(tmp, model_sd, optim_sd, pos)
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)) if tmp else None,
                     checkpoint_dir_name=f"step_{pos['global_step']:06d}")
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


def train_loop_per_worker(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_optimizer_state_dict

    import transformers

    from hh_ray.models import load_scalar_head_model, save_model

    transformers.logging.set_verbosity_error()  # the "score.weight newly initialised" report is expected
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config["seed"])  # same head init on every rank (DDP broadcasts rank 0's anyway)
    model, tok = load_scalar_head_model(config["init_path"], config["dtype"])
    if config["gradient_checkpointing"]:
        model.gradient_checkpointing_enable()

    optim_sd, pos = restore(model, config["resume_from"])
    model = ray.train.torch.prepare_model(model, parallel_strategy=config["strategy"])

    stages = ray.get(config["stages"][0])  # wrapped in a list so Ray does not resolve it on the way
    batch_size, grad_accum, every = config["batch_size"], config["grad_accum"], config["checkpoint_every"]
    stop_after, metrics_queue = config["stop_after_steps"], config["metrics_queue"]
    for si in range(pos["stage"], len(stages)):
        stage = stages[si]
        pairs = stage["comparisons"]
        opt = adamw(model.parameters(), lr=stage["lr"], weight_decay=config["weight_decay"])
        if optim_sd is not None and pos["optimizer_stage"] == si:
            set_optimizer_state_dict(model, opt, optim_sd, options=_state_dict_options())
        pos["optimizer_stage"] = si
        n_steps = steps_per_epoch(len(pairs), batch_size, world * grad_accum)
        for epoch in range(pos["epoch"], config["epochs"]):
            order = epoch_order(len(pairs), config["seed"], si, epoch)
            for step in range(pos["step_in_epoch"], n_steps):
                ids = step_ids(order, step, batch_size)
                t0 = time.perf_counter()
                loss_sum, correct = train_step(model, opt, tok, pairs, worker_micro_batches(ids, rank, world, grad_accum),
                                               config["max_len"], len(ids), world, device)
                loss_sum, correct = _all_reduce([loss_sum, correct])
                dt = time.perf_counter() - t0
                pos.update(step_in_epoch=step + 1, global_step=pos["global_step"] + 1,
                           examples_seen=pos["examples_seen"] + len(ids),
                           seen_digest=chain_digest(pos["seen_digest"], ids))
                stopping = stop_after is not None and pos["global_step"] >= stop_after
                metrics = {"stage": stage["name"], "global_step": pos["global_step"], "epoch": epoch,
                           "stage_step": step + 1, "loss": loss_sum / len(ids), "accuracy": correct / len(ids),
                           "lr": stage["lr"], "batch_pairs": len(ids), "examples_seen": pos["examples_seen"],
                           "examples_per_s": len(ids) / dt, "seen_digest": pos["seen_digest"],
                           "batch_digest": chain_digest("", ids)}
                if rank == 0:
                    metrics_queue.put(metrics)
                if stopping or pos["global_step"] % every == 0:
                    _checkpoint(metrics, model, opt, pos, rank)
                if stopping:
                    return
            pos["step_in_epoch"] = 0
            pos["epoch"] = epoch + 1
        pos.update(stage=si + 1, epoch=0)

    full = get_model_state_dict(model, options=_state_dict_options())
    if rank == 0:
        final, _ = load_scalar_head_model(config["init_path"], config["dtype"])
        final.load_state_dict(full)
        save_model(final, tok, config["pm_dir"])
        metrics_queue.put({"done": True, "global_step": pos["global_step"], "examples_seen": pos["examples_seen"],
                           "seen_digest": pos["seen_digest"]})


# ---------------------------------------------------------------- the driver

def count_truncated(tok, comparisons, max_len: int) -> int:
    """Transcripts longer than max_len tokens (end-of-context token included); they lose their start."""
    texts = [c.prompt + r for c in comparisons for r in (c.chosen, c.rejected)]
    lengths = [len(ids) + 1 for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    return sum(n > max_len for n in lengths)


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
    pm = cfg.pm
    if pm.strategy not in ("ddp", "fsdp"):
        raise ValueError(f"pm.strategy: expected 'ddp' or 'fsdp', got {pm.strategy!r}")
    per_step = pm.num_workers * pm.grad_accum
    if pm.batch_size % per_step:
        raise ValueError(f"pm.batch_size={pm.batch_size} must be a multiple of pm.num_workers × pm.grad_accum = {per_step}")
    for s in stages:
        if steps_per_epoch(len(s["comparisons"]), pm.batch_size, per_step) == 0:
            raise DataError(f"{s['name']}: {len(s['comparisons'])} comparisons make no optimizer step of "
                            f"{per_step}+ pairs; lower pm.batch_size or add data")


def evaluate_saved_pm(pm_dir: str, comparisons, max_len: int, dtype: str, out_dir: str) -> dict:
    """Held-out metrics of a PM folder, loaded as the scoring service will load it."""
    from hh_ray.models import load_scalar_head_model
    from hh_ray.pm_eval import evaluate_pm

    model, tok = load_scalar_head_model(pm_dir, dtype)
    t0 = time.perf_counter()
    results = evaluate_pm(model, tok, comparisons, max_len, Path(out_dir))
    results["seconds_per_1000_pairs_scored"] = (time.perf_counter() - t0) / len(comparisons) * 1000
    (Path(out_dir) / "pm_eval.json").write_text(json.dumps(results, indent=2))
    return results


def train_pm(cfg, run_dir, resume: bool = False, stop_after_steps: int | None = None) -> Path:
    """Train the PM (PMP, then finetuning) and evaluate it on the held-out split.

    Returns run_dir/pm, or — when stop_after_steps stops it early — the
    checkpoint it wrote, which `resume=True` continues from.
    """
    from ray.util.queue import Queue
    from tqdm import tqdm

    from hh_ray.models import load_pm_tokenizer, resolve_model
    from hh_ray.pm_eval import flat_summary, format_table
    from hh_ray.tracking import Tracker

    run_dir = Path(run_dir).resolve()
    ckpt_root, latest = checkpoint_to_resume(run_dir, resume)

    stages, held_out, counts = build_stages(cfg)
    check_settings(cfg, stages)
    init_path = resolve_model(cfg.model.pm or cfg.model.policy, cfg.model.cache_dir)
    tok = load_pm_tokenizer(init_path)
    truncated = count_truncated(tok, [c for s in stages for c in s["comparisons"]] + held_out, cfg.model.max_seq_len)
    plan = " → ".join(f"{s['name']} {len(s['comparisons'])} pairs (lr {s['lr']:g})" for s in stages)
    print(f"PM data: {plan}; "
          f"held out {len(held_out)}; skipped {counts or 'none'}; {truncated} transcripts over "
          f"{cfg.model.max_seq_len} tokens truncated from the left (end-of-context token kept)")

    import ray  # connected by the caller (hh_ray.orchestration.cluster.ensure_ray)

    tracker = Tracker(run_dir, cfg, stage="pm")
    tracker.log(0, {"train_pairs": len(stages[-1]["comparisons"]), "held_out_pairs": len(held_out),
                    "truncated_transcripts": truncated, **{f"skipped_{k}": v for k, v in counts.items()}},
                stage="pm_data")
    per_step = cfg.pm.num_workers * cfg.pm.grad_accum
    total = cfg.pm.epochs * sum(min(len(s["comparisons"]), cfg.pm.batch_size * steps_per_epoch(
        len(s["comparisons"]), cfg.pm.batch_size, per_step)) for s in stages)
    start = json.loads((latest / "state.json").read_text())["examples_seen"] if resume else 0

    queue = Queue()
    trainer = learner_trainer(
        train_loop_per_worker, num_workers=cfg.pm.num_workers, cpus_per_worker=cfg.pm.cpus_per_worker,
        ckpt_root=ckpt_root, config={
            "stages": [ray.put(stages)], "init_path": init_path, "dtype": cfg.model.dtype,
            "gradient_checkpointing": cfg.model.gradient_checkpointing, "strategy": cfg.pm.strategy,
            "seed": cfg.seed, "epochs": cfg.pm.epochs, "batch_size": cfg.pm.batch_size,
            "grad_accum": cfg.pm.grad_accum, "weight_decay": cfg.pm.weight_decay,
            "checkpoint_every": cfg.pm.checkpoint_every, "max_len": cfg.model.max_seq_len,
            "stop_after_steps": stop_after_steps, "pm_dir": str(run_dir / "pm"), "metrics_queue": queue,
            "resume_from": str(latest) if latest else None})

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
