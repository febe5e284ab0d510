"""The weight codec between learners and generators: a state dict as it travels
through the object store, and back to tensors on arrival. No Ray here."""

from __future__ import annotations

import warnings

import numpy as np
import torch


def weights_for_sync(model: torch.nn.Module) -> dict[str, np.ndarray | torch.Tensor]:
    """What a learner publishes: the full state dict, detached, contiguous, on CPU.

    As numpy arrays where numpy has the dtype: Ray writes those into the object
    store with one copy and a worker reads them without one (SmolLM2's 540 MB,
    measured: put 0.1-0.5 s and read 0.01 s, against 0.9-1.7 s and 0.7-0.9 s
    as torch tensors). bfloat16 has no numpy dtype and stays a tensor.

    A tied `lm_head.weight` is sent too, although it aliases the embedding:
    vLLM's layer-wise `reload_weights` leaves a tied output layer with its old
    weights when only the embedding arrives (SmolLM2, measured: greedy
    log-probs then differ from HF by 1.5 nats; with the alias, 1.3e-5). It is
    the same array object, so pickle stores it once. A LoRA model sends its merged weights."""
    from hh_ray.lora import hf_state_dict

    out, seen = {}, {}
    for k, v in hf_state_dict(model).items():
        t = v.detach().to("cpu").contiguous()
        if t.dtype != torch.bfloat16:
            key = (t.data_ptr(), t.shape, t.dtype)
            t = seen.setdefault(key, t.numpy())
        out[k] = t
    return out


def as_tensors(weights: dict) -> dict:
    """Numpy arrays (zero-copy, read-only views of the object store) as tensors; anything else unchanged."""
    if not isinstance(weights, dict):
        return weights
    with warnings.catch_warnings():  # read-only is fine: reload_weights copies out of them
        warnings.simplefilter("ignore", UserWarning)
        return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in weights.items()}


# ---------------------------------------------------------------- broadcast: buckets over a process group
#
# `generation.weight_sync: broadcast`: learner rank 0 and every generation worker form one
# process group of their own (gloo on CPU, NCCL on GPU; the same code), and rank 0 broadcasts
# the policy's tensors packed into buckets of about `bucket_bytes`: a few large collectives
# instead of one per tensor. Both sides agree on the layout from the same `specs`.

ALIGN = 16  # bytes: every tensor starts aligned in its bucket, so `view(dtype)` is legal


def tensor_specs(named: dict[str, torch.Tensor]) -> tuple[list[list], dict[str, str]]:
    """([[name, dtype name, shape], ...] of the distinct tensors, {alias: name}) of a state dict.

    A tied weight (`lm_head.weight` sharing the embedding's storage) travels once and is
    handed to the receiver under both names (weights_for_sync explains why it must arrive)."""
    specs, aliases, seen = [], {}, {}
    for name, t in named.items():
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        specs.append([name, str(t.dtype).removeprefix("torch."), list(t.shape)])
    return specs, aliases


def _nbytes(spec: list) -> int:
    _, dtype, shape = spec
    n = getattr(torch, dtype).itemsize
    for s in shape:
        n *= s
    return n


def _padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def plan_buckets(specs: list[list], bucket_bytes: int) -> list[list[int]]:
    """Consecutive runs of spec indices whose padded sizes add up to at most `bucket_bytes`
    (a tensor larger than that is a bucket of its own)."""
    buckets, cur, size = [], [], 0
    for i, spec in enumerate(specs):
        n = _padded(_nbytes(spec))
        if cur and size + n > bucket_bytes:
            buckets.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += n
    if cur:
        buckets.append(cur)
    return buckets


def pack_bucket(tensors: list[torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
    """The tensors' bytes end to end (each but the last padded to ALIGN) in one uint8 buffer on
    `device`. A bucket of one contiguous tensor on `device` is that tensor's own bytes: no copy."""
    raws = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    if len(raws) == 1 and raws[0].device == torch.device(device):
        return raws[0]
    sizes = [_padded(r.numel()) for r in raws[:-1]] + [raws[-1].numel()]
    buf = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
    offset = 0
    for raw, n in zip(raws, sizes):
        buf[offset: offset + raw.numel()].copy_(raw)
        offset += n
    return buf


def unpack_bucket(buf: torch.Tensor, specs: list[list]) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) views into a buffer `pack_bucket` filled, in `specs` order."""
    out, offset = [], 0
    for name, dtype, shape in specs:
        n = _nbytes([name, dtype, shape])
        out.append((name, buf[offset: offset + n].view(getattr(torch, dtype)).reshape(shape)))
        offset += _padded(n)
    return out


def bucket_size(specs: list[list], bucket: list[int]) -> int:
    """Bytes of a packed bucket: every tensor padded to ALIGN but the last."""
    return sum(_padded(_nbytes(specs[i])) for i in bucket[:-1]) + _nbytes(specs[bucket[-1]])


def rendezvous(host: str, port: int, world_size: int, is_host: bool, timeout_s: float):
    """The store a weight group meets through; the host (rank 0) may pass port 0 for any free
    port and read it from `.port`."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    return TCPStore(host, port, world_size, is_host, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def join_group(store, rank: int, world_size: int, backend: str, timeout_s: float):
    """A process group of its own (not torch.distributed's default one, which the learners'
    DDP and vLLM each use) over `store`; blocks until all `world_size` ranks have joined."""
    from datetime import timedelta

    from torch.distributed import PrefixStore

    timeout, prefixed = timedelta(seconds=timeout_s), PrefixStore("hh-ray-weights", store)
    if backend == "gloo":
        from torch.distributed.distributed_c10d import ProcessGroupGloo

        return ProcessGroupGloo(prefixed, rank, world_size, timeout)
    if backend == "nccl":
        from torch.distributed.distributed_c10d import ProcessGroupNCCL

        opts = ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return ProcessGroupNCCL(prefixed, rank, world_size, opts)
    raise ValueError(f"weight broadcast backend {backend!r}: expected 'gloo' or 'nccl'")


def _start_broadcast(group, buf: torch.Tensor):
    """Post a broadcast from rank 0 of `buf`; returns its work handle (`.wait()`)."""
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    return group.broadcast([buf], opts)


def send_weights(group, named: dict[str, torch.Tensor], specs: list[list], bucket_bytes: int,
                 device: torch.device | str = "cpu") -> int:
    """Rank 0: broadcast the tensors `specs` names, bucket by bucket, the next bucket packed
    while the previous one is on the wire. Returns the bytes sent."""
    sent, in_flight = 0, None
    for bucket in plan_buckets(specs, bucket_bytes):
        buf = pack_bucket([named[specs[i][0]] for i in bucket], device)
        work = _start_broadcast(group, buf)
        if in_flight is not None:
            in_flight[0].wait()
        in_flight, sent = (work, buf), sent + buf.numel()
    if in_flight is not None:
        in_flight[0].wait()
    return sent


def receive_weights(group, specs: list[list], aliases: dict[str, str], bucket_bytes: int,
                    device: torch.device | str = "cpu"):
    """Every other rank: yield (name, tensor) as each bucket arrives, aliases after their
    tensor; the next bucket is received while the caller loads this one."""
    by_name = {}
    for alias, name in aliases.items():
        by_name.setdefault(name, []).append(alias)
    buckets = plan_buckets(specs, bucket_bytes)

    def post(k):
        buf = torch.empty(bucket_size(specs, buckets[k]), dtype=torch.uint8, device=device)
        return _start_broadcast(group, buf), buf

    nxt = post(0) if buckets else None
    for k, bucket in enumerate(buckets):
        work, buf = nxt
        work.wait()
        nxt = post(k + 1) if k + 1 < len(buckets) else None
        for name, t in unpack_bucket(buf, [specs[i] for i in bucket]):
            yield name, t
            for alias in by_name.get(name, ()):
                yield alias, t
