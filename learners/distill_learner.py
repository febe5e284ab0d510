"""Policy initialisation on a Ray Train learner group: context distillation or SFT.

The paper's RL starts from a context-distilled LM (Bai et al. 2022, App. A.1): the
student (the LM alone) learns to match the teacher (the same LM reading an
HHH prompt first) under KL over the teacher's top-k tokens plus an
"everything else" bucket (hh_ray.distill). SFT is the plain alternative:
next-token loss on the chosen response of each HH comparison (the final
Assistant turn and an EOS, so the policy learns to stop); the context is read
but not trained on. One loop runs both; they differ in the per-token loss.

Teacher targets are computed once, before any weight changes, by every worker
for its share of the examples, and stored in RUN/teacher_cache (the paper
stored them too); a resumed run reuses them. `distill.teacher=online` keeps a
frozen teacher copy instead and recomputes targets every step.

Everything else follows learners/pm_learner.py and shares its data order,
position and checkpoints, learners/kit.py (gradient accumulation, reductions,
clip and step, the one checkpoint format) and learners/group.py (trainer, fit
with metrics, checkpoint guard): data order is a pure function of (seed,
epoch), checkpoints in run_dir/checkpoints/step-N hold the position, metrics
go to the driver through a Queue. The loss is the mean over every trained
token of the global batch, whatever the split.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hh_ray.checkpoint import latest_checkpoint, read_state
from hh_ray.config import Config, with_value
from hh_ray.conversation import model_format
from hh_ray.distill import (cache_is_valid, cache_meta, load_cache, load_corpus, loss_mask, loss_tokens,
                            next_token_logp, pad_rows, prompt_kv, read_prompt, save_shard, sft_example,
                            stack_targets, teacher_rows, token_nll, topk_kl, write_meta)
from learners.group import checkpoint_to_resume, fit_and_log, learner_trainer, with_learner_autocast, worker_resources
from learners.kit import adamw, all_reduce_sum, clip_and_step, no_sync_unless, restore_checkpoint, unwrap
from learners.pm_learner import (MAX_GRAD_NORM, chain_digest, checkpoint, epoch_order, resume_point, step_ids,
                                 steps_per_epoch, worker_micro_batches)

STAGES = ("distill", "sft")
TEACHER_CACHE = "teacher_cache"
EVAL_METRIC = {"distill": "heldout_kl", "sft": "heldout_loss"}  # held-out metric, before and after
LOSS_NAME = {"distill": "kl", "sft": "loss"}  # training metric per step


# ---------------------------------------------------------------- one loss for both stages

def batch_loss(model, examples: list[dict], ex_ids: list[int], pad_id: int, targets, device) -> tuple:
    """(summed per-token loss, trained tokens) of one micro-batch.

    targets(ex_ids, width) gives the teacher's top-k rows (distillation);
    None means SFT's next-token loss.
    """
    rows = [examples[i] for i in ex_ids]
    ids, mask = pad_rows([r["ids"] for r in rows], pad_id)
    logp = next_token_logp(model, ids.to(device), mask.to(device))
    if targets is None:
        per_token = token_nll(logp, ids[:, 1:].to(device))
    else:
        per_token = topk_kl(logp, *(t.to(device) for t in targets(ex_ids, ids.shape[1])))
    m = loss_mask(rows, ids.shape[1]).to(device)
    return (per_token * m).sum(), m.sum()


@torch.no_grad()
def evaluate(model, examples, ex_ids, pad_id, targets, micro, rank, world, device) -> float:
    """Mean per-token loss over ex_ids, split across workers (unwrapped model: no DDP collectives)."""
    model = unwrap(model).eval()
    total, tokens = 0.0, 0.0
    mine = ex_ids[rank::world]
    for i in range(0, len(mine), micro):
        s, n = batch_loss(model, examples, mine[i: i + micro], pad_id, targets, device)
        total, tokens = total + s.item(), tokens + n.item()
    model.train()
    total, tokens = all_reduce_sum([total, tokens])
    return total / max(tokens, 1.0)


def train_step(model, opt, examples, micro_batches, pad_id, targets, global_tokens, world, device,
               mixed: str = "none") -> float:
    """One optimizer step on this worker's micro-batches; returns this worker's summed token loss.
    `mixed`: the autocast of the forward passes (distill.autocast / sft.autocast)."""
    from hh_ray.models import autocast

    loss_sum = 0.0
    for k, ex_ids in enumerate(micro_batches):
        with no_sync_unless(model, sync=k == len(micro_batches) - 1):  # all-reduce once per step
            with autocast(mixed, device.type):
                s, _ = batch_loss(model, examples, ex_ids, pad_id, targets, device)
            s = s.float()
            # DDP averages gradients over workers: scaling by world / global tokens
            # makes the step's gradient that of the mean over all trained tokens.
            (s * world / global_tokens).backward()
        loss_sum += s.item()
    clip_and_step(model, opt, MAX_GRAD_NORM)
    return loss_sum


# ---------------------------------------------------------------- teacher targets

@dataclass
class Worker:
    """One worker's place in the group and what its loop reads everywhere."""
    cfg: Config
    stage: str  # "distill" or "sft"
    rank: int
    world: int
    device: torch.device
    pad_id: int
    micro: int  # sequences per forward pass: a worker's share of a step's micro-batch
    queue: Any  # metrics to the driver (ray.util.queue.Queue)

    @property
    def settings(self):
        """cfg.distill or cfg.sft."""
        return getattr(self.cfg, self.stage)


def cached_teacher(model, config: dict, examples, w: Worker) -> dict:
    """Compute this worker's share of the teacher cache (unless the driver found it valid), then load all of it."""
    import torch.distributed as dist

    folder = Path(config["teacher_cache"])
    if not config["teacher_cache_valid"]:
        t0 = time.perf_counter()
        kv = prompt_kv(model, config["prompt_ids"])
        mine = list(range(w.rank, len(examples), w.world))
        rows = []
        for i in range(0, len(mine), w.micro):
            rows += teacher_rows(model, kv, [examples[j] for j in mine[i: i + w.micro]], w.pad_id, w.cfg.distill.top_k)
        save_shard(folder, w.rank, mine, rows)
        seconds = time.perf_counter() - t0
        if dist.is_initialized() and w.world > 1:
            dist.barrier()
        if w.rank == 0:
            write_meta(folder, config["cache_meta"], w.world)  # last: marks the cache complete
            w.queue.put({"event": "teacher", "sequences": len(examples), "seconds_rank0": seconds,
                         "tokens": sum(len(e["ids"]) - 1 for e in examples)})
        if dist.is_initialized() and w.world > 1:
            dist.barrier()
    return load_cache(folder)


def make_targets(model, config: dict, examples, w: Worker):
    """targets(ex_ids, width) for distillation, None for SFT."""
    if w.stage == "sft":
        return None
    if w.cfg.distill.teacher == "online":
        teacher = copy.deepcopy(model).eval().requires_grad_(False)  # frozen before any update
        kv = prompt_kv(teacher, config["prompt_ids"])
        return lambda ex_ids, width: stack_targets(
            teacher_rows(teacher, kv, [examples[i] for i in ex_ids], w.pad_id, w.cfg.distill.top_k), width)
    cache = cached_teacher(model, config, examples, w)
    return lambda ex_ids, width: stack_targets([cache[i] for i in ex_ids], width)


# ---------------------------------------------------------------- the learner (one per Ray Train worker)

def train_epochs(model, opt, examples, n_train: int, targets, pos: dict, config: dict, w: Worker) -> bool:
    """Train from pos (updated in place) to the last epoch; True when stop_after_steps stopped it."""
    s, root, stop_after = w.settings, Path(config["checkpoint_root"]), config["stop_after_steps"]
    n_steps = steps_per_epoch(n_train, s.batch_size, w.world * s.grad_accum)
    for epoch in range(pos["epoch"], s.epochs):
        order = epoch_order(n_train, w.cfg.seed, 0, epoch)
        for step in range(pos["step_in_epoch"], n_steps):
            ids = step_ids(order, step, s.batch_size)
            t0 = time.perf_counter()
            # Every worker knows the whole step's token count: no collective needed to normalise.
            global_tokens = sum(loss_tokens(examples[i]) for i in ids)
            loss_sum = train_step(model, opt, examples, worker_micro_batches(ids, w.rank, w.world, s.grad_accum),
                                  w.pad_id, targets, global_tokens, w.world, w.device, s.autocast)
            (loss_sum,) = all_reduce_sum([loss_sum])
            dt = time.perf_counter() - t0
            pos.update(step_in_epoch=step + 1, global_step=pos["global_step"] + 1,
                       examples_seen=pos["examples_seen"] + len(ids), seen_digest=chain_digest(pos["seen_digest"], ids))
            if w.rank == 0:
                w.queue.put({"event": "step", "global_step": pos["global_step"], "epoch": epoch,
                             LOSS_NAME[w.stage]: loss_sum / global_tokens, "tokens": global_tokens,
                             "batch_sequences": len(ids), "sequences_per_s": len(ids) / dt, "lr": s.lr,
                             "examples_seen": pos["examples_seen"], "seen_digest": pos["seen_digest"]})
            stopping = stop_after is not None and pos["global_step"] >= stop_after
            if stopping or pos["global_step"] % s.checkpoint_every == 0:
                checkpoint(root, model, opt, pos, w.rank, s.keep_checkpoints)
            if stopping:
                return True
        pos.update(step_in_epoch=0, epoch=epoch + 1)
    return False


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: teacher targets, the epochs from the resume point, then rank 0 saves the policy.
    config: {"cfg": Config, "stage", "data": [ObjectRef], "prompt_ids", "init_path", "teacher_cache",
    "teacher_cache_valid", "cache_meta", "checkpoint_root", "policy_dir", "metrics_queue", "stop_after_steps"}."""
    import ray
    import ray.train
    import ray.train.torch

    from hh_ray.models import enable_checkpointing, load_policy, load_tokenizer, save_model, set_attention_for

    cfg, ctx = config["cfg"], ray.train.get_context()
    torch.manual_seed(cfg.seed)
    model, tok = load_policy(config["init_path"], cfg.model.dtype), load_tokenizer(config["init_path"])
    s = getattr(cfg, config["stage"])
    w = Worker(cfg, config["stage"], ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(),
               tok.pad_token_id, s.batch_size // (ctx.get_world_size() * s.grad_accum), config["metrics_queue"])
    model.to(w.device)  # the teacher pass below runs before prepare_model would move it (GPU)
    data = ray.get(config["data"][0])  # wrapped in a list so Ray does not resolve it on the way
    examples, n_train = data["train"] + data["held_out"], len(data["train"])
    held_out = list(range(n_train, len(examples)))

    # The teacher is the *initial* model: targets come before any checkpoint is loaded.
    targets = make_targets(model, config, examples, w)
    model.config.use_cache = False  # the student never decodes; no key/value copies
    set_attention_for([model], s.autocast, w.device.type)
    enable_checkpointing(model, cfg.model.gradient_checkpointing)
    resume, pos = resume_point(Path(config["checkpoint_root"]))

    def report_eval(when: str) -> None:
        if held_out:
            value = evaluate(model, examples, held_out, w.pad_id, targets, w.micro, w.rank, w.world, w.device)
            if w.rank == 0:
                w.queue.put({"event": "eval", "when": when, "global_step": pos["global_step"],
                             EVAL_METRIC[w.stage]: value, "sequences": len(held_out)})

    if resume is None:
        report_eval("before")
    model = ray.train.torch.prepare_model(model)
    opt = adamw(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    if resume is not None:
        restore_checkpoint(resume, {"model": model}, {"model": opt})
    if train_epochs(model, opt, examples, n_train, targets, pos, config, w):
        return
    report_eval("after")
    if w.rank == 0:
        save_model(unwrap(model), tok, config["policy_dir"], conversation_format=cfg.model.conversation_format)
        w.queue.put({"event": "done", "global_step": pos["global_step"], "examples_seen": pos["examples_seen"]})


# ---------------------------------------------------------------- the driver: data, checks, fit

def distill_examples(cfg, tok) -> tuple[list[dict], list[dict], list[int], dict]:
    """(train, held-out, prompt ids, info): corpus texts as token ids (first model.max_seq_len tokens)."""
    from hh_ray.data import DataError, train_eval_split

    d = cfg.distill
    texts = load_corpus(d.corpus, num_synthetic=cfg.data.num_synthetic, seed=cfg.seed)
    if d.num_texts:
        texts = texts[: d.num_texts]
    prompt_ids = tok(read_prompt(d.prompt_file), add_special_tokens=False)["input_ids"]
    if d.max_prompt_tokens:
        prompt_ids = prompt_ids[-d.max_prompt_tokens:]  # the end: the dialogue nearest the text
    rows = [ids[: cfg.model.max_seq_len] for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    rows = [r for r in rows if len(r) >= 2]  # one token predicts nothing
    if not rows:
        raise DataError(f"distill.corpus {d.corpus}: no text of 2 or more tokens")
    train, held_out = train_eval_split([{"ids": r} for r in rows], cfg.data.eval_fraction, seed=cfg.seed)
    return train, held_out, prompt_ids, {"texts": len(texts), "short_texts_dropped": len(texts) - len(rows),
                                          "prompt_tokens": len(prompt_ids)}


def sft_examples(cfg, tok) -> tuple[list[dict], list[dict], list[int], dict]:
    """(train, held-out, [], info): the config's comparisons as prompt + chosen response + the
    format's end-of-turn token (hh: EOS), the prompt rendered in the policy's conversation format."""
    from hh_ray.conversation import end_of_turn_token_ids, prompt_token_ids
    from hh_ray.pm_eval import pm_comparisons

    counts: dict = {}
    train, held_out = pm_comparisons(cfg, counts)
    fmt = cfg.model.conversation_format
    end = end_of_turn_token_ids(tok, fmt)[0]
    # The chat template puts the response right after the generation prompt; HH text after a space.
    response = (lambda c: c.chosen) if fmt == "hh" else (lambda c: c.chosen.strip())

    def encode(pairs):
        p = prompt_token_ids([c.prompt for c in pairs], tok, fmt)
        r = tok([response(c) for c in pairs], add_special_tokens=False)["input_ids"]
        return [sft_example(a, b, end, cfg.model.max_seq_len) for a, b in zip(p, r)]

    return encode(train), encode(held_out), [], {f"skipped_{k}": v for k, v in counts.items()}


def check_settings(cfg, stage: str, s, n_train: int, prompt_ids: list[int], init_path: str) -> None:
    """What the config alone cannot tell (hh_ray.config checked the rest as it loaded):
    that the data makes an optimizer step, and that the teacher's input fits the model."""
    from transformers import AutoConfig

    from hh_ray.data import DataError

    per_step = s.num_workers * s.grad_accum
    if steps_per_epoch(n_train, s.batch_size, per_step) == 0:
        raise DataError(f"{stage}: {n_train} training sequences make no optimizer step of {per_step}+; "
                        f"lower {stage}.batch_size or add data")
    if stage == "distill":
        positions = getattr(AutoConfig.from_pretrained(init_path), "max_position_embeddings", None)
        if positions and len(prompt_ids) + cfg.model.max_seq_len > positions:
            raise ValueError(f"the teacher reads {len(prompt_ids)} prompt + {cfg.model.max_seq_len} text tokens, more "
                             f"than the model's {positions} positions: set distill.max_prompt_tokens or "
                             "model.max_seq_len lower")


def prepare_teacher_cache(cfg, stage: str, run_dir: Path, init_path: str, prompt_ids, examples) -> tuple:
    """(cache folder, its expected meta or None, whether it is valid): a cache from another
    corpus, prompt or model is deleted, so workers recompute it."""
    folder = run_dir / TEACHER_CACHE
    if stage != "distill" or cfg.distill.teacher != "cached":
        return folder, None, False
    meta = cache_meta(init_path, prompt_ids, cfg.distill.top_k, examples)
    valid = cache_is_valid(folder, meta)
    if not valid:
        shutil.rmtree(folder, ignore_errors=True)
    return folder, meta, valid


def fit_with_progress(trainer, queue, tracker, stage: str, total: int, start: int) -> tuple[dict, dict]:
    """Run the fit, logging each worker message and advancing a progress bar;
    returns ({"before"/"after": held-out metric}, the "done" message or {})."""
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, unit="seq", desc=stage, dynamic_ncols=True)
    evals, done = {}, {}

    def on_message(m: dict) -> None:
        event, step = m.pop("event"), int(m.pop("global_step", 0))
        if event == "step":
            bar.update(m["batch_sequences"])
            bar.set_postfix({k: f"{m[k]:.3f}" for k in ("kl", "loss") if k in m})
            tracker.log(step, m, stage=stage)
        elif event == "eval":
            evals[m["when"]] = m[EVAL_METRIC[stage]]
            tracker.log(step, m, stage=f"{stage}_eval")
        elif event == "teacher":
            # Workers compute their shares side by side: rank 0's time is the wall time.
            m["seconds_per_1000_sequences"] = m["seconds_rank0"] / max(m["sequences"], 1) * 1000
            tracker.log(step, m, stage=f"{stage}_teacher")
        elif event == "done":
            done.update(m, global_step=step)

    try:
        fit_and_log(trainer, queue, on_message)
    finally:
        bar.close()
    return evals, done


def train_policy_init(cfg, run_dir, stage: str, resume: bool = False, stop_after_steps: int | None = None) -> Path:
    """`hh-ray distill` / `hh-ray sft`: train, evaluate before/after on held-out text, write RUN/policy.

    Returns run_dir/policy, or — when stop_after_steps stops it early — the
    checkpoint it wrote, which resume=True continues from.
    """
    from ray.util.queue import Queue

    from hh_ray.models import load_tokenizer, resolve_model
    from hh_ray.tracking import Tracker

    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: expected one of {STAGES}")
    s = getattr(cfg, stage)
    run_dir = Path(run_dir).resolve()
    ckpt_root, latest = checkpoint_to_resume(run_dir, resume)

    init_path = resolve_model(cfg.model.policy, cfg.model.cache_dir)
    # The policy keeps the conversation format of the model it starts from.
    cfg = with_value(cfg, "model.conversation_format",
                     model_format(init_path, cfg.model.conversation_format, load_tokenizer(init_path)))
    train, held_out, prompt_ids, info = (distill_examples if stage == "distill" else sft_examples)(
        cfg, load_tokenizer(init_path))
    if s.eval_texts:
        held_out = held_out[: s.eval_texts]
    check_settings(cfg, stage, s, len(train), prompt_ids, init_path)
    cfg = with_learner_autocast(cfg, f"{stage}.autocast", worker_resources(s.num_workers))
    teacher_cache, meta, valid = prepare_teacher_cache(cfg, stage, run_dir, init_path, prompt_ids, train + held_out)
    print(f"{stage}: {len(train)} training and {len(held_out)} held-out sequences from {init_path}; {info}"
          + (f"; teacher cache {'reused' if valid else 'to compute'}" if meta else ""))

    import ray  # connected by the caller (hh_ray.orchestration.cluster.ensure_ray)

    tracker = Tracker(run_dir, cfg, stage=stage)
    tracker.log(0, {"train_sequences": len(train), "held_out_sequences": len(held_out), **info}, stage=f"{stage}_data")
    queue = Queue()
    trainer = learner_trainer(
        train_loop_per_worker, num_workers=s.num_workers, ckpt_root=ckpt_root, autocast=s.autocast, config={
            "cfg": cfg, "stage": stage, "data": [ray.put({"train": train, "held_out": held_out})],
            "prompt_ids": prompt_ids, "init_path": init_path, "teacher_cache": str(teacher_cache),
            "teacher_cache_valid": valid, "cache_meta": meta, "checkpoint_root": str(ckpt_root),
            "policy_dir": str(run_dir / "policy"), "metrics_queue": queue, "stop_after_steps": stop_after_steps})
    total = s.epochs * min(len(train), s.batch_size * steps_per_epoch(len(train), s.batch_size, s.num_workers * s.grad_accum))
    evals, done = fit_with_progress(trainer, queue, tracker, stage, total,
                                    read_state(latest)["examples_seen"] if latest else 0)
    eval_metric = EVAL_METRIC[stage]
    summary = {f"{eval_metric}_{k}": v for k, v in evals.items()}
    tracker.summary(summary)
    tracker.close()
    if not done:
        return latest_checkpoint(ckpt_root)
    (run_dir / f"{stage}_eval.json").write_text(json.dumps({**summary, "held_out_sequences": len(held_out),
                                                            "steps": done["global_step"]}, indent=1))
    print(f"{stage}: held-out {eval_metric} " + " → ".join(f"{k} {v:.4f}" for k, v in evals.items()))
    return run_dir / "policy"
