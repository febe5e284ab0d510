"""What every process of a run sets up the same way: the environment Ray hands to
actors and learners, torch's thread count, and seeds derived from the run's seed.

No Ray here: the environment is plain data, passed to Ray by the caller.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os

KEPT_ENV = ("HH_RAY_CACHE", "WANDB_MODE", "HF_HUB_OFFLINE", "HF_HOME", "TOKENIZERS_PARALLELISM", "MALLOC_CONF",
            "GLIBC_TUNABLES")
TRAINING_MALLOC = "HH_RAY_TRAINING_MALLOC"  # the learners' allocator: 'auto' (default), 'glibc' or 'jemalloc'


def worker_env(trains_in: str | None = None) -> dict[str, str]:
    """Environment every actor and learner needs, passed through Ray's runtime_env.

    The allocator. Actors that only infer (vLLM, the PM service, serving) get Ray's jemalloc,
    handing freed pages back after 1 s from a background thread: they hold less than under
    glibc. A learner (`trains_in`: the autocast it trains in, resolved) allocates and frees
    every micro-batch's activations, gradients and logits, and under bf16 autocast also a
    bf16 copy of every weight it multiplies; under jemalloc the pages it handed back are
    faulted in again at the next micro-batch, 4 KiB at a time. So a learner in bf16 on a CPU
    gets glibc with transparent huge pages for its heap (`glibc.malloc.hugetlb=1`): faster
    steps for somewhat more memory; in fp32 that bought no time and cost memory, so it stays
    on jemalloc (bench/RESULTS.md, "the learners' allocator"). HH_RAY_TRAINING_MALLOC=glibc or
    =jemalloc sets the learners' allocator whatever their precision."""
    env = {k: os.environ[k] for k in KEPT_ENV if k in os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "LD_PRELOAD" in os.environ:  # the user's own choice, for every process
        return env
    choice = os.environ.get(TRAINING_MALLOC, "auto") if trains_in is not None else "jemalloc"
    if choice == "glibc" or (choice == "auto" and trains_in == "bfloat16"):
        env["LD_PRELOAD"] = ""  # not the job's jemalloc (ensure_ray sets it for every worker)
        env.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
        return env
    jemalloc = ray_jemalloc()
    if jemalloc:
        env["LD_PRELOAD"] = jemalloc
        env.setdefault("MALLOC_CONF", "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0")
    return env


def malloc_in_use() -> str:
    """'jemalloc' when this process runs on a preloaded jemalloc, else 'glibc' (the placement row
    says which allocator each part of a run got, worker_env)."""
    try:
        with open("/proc/self/maps") as maps:
            return "jemalloc" if any("libjemalloc" in line for line in maps) else "glibc"
    except OSError:  # not Linux
        return "glibc"


def ray_jemalloc() -> str | None:
    """Ray's bundled libjemalloc.so, found without importing Ray."""
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.origin:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "core", "libjemalloc.so")
    return path if os.path.exists(path) else None


def set_torch_threads(n: float) -> int:
    """torch's intra-op threads from a CPU share. Call it before a vLLM engine starts:
    vLLM turns `torch.set_num_threads` into a no-op in its process."""
    import torch

    n = max(1, int(n))
    torch.set_num_threads(n)
    return n


def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed for one use of the run's seed, e.g. derive_seed(seed, "rollouts", iteration).
    Different keys give independent streams; the same keys the same seed in every process and run."""
    text = "/".join(map(str, (seed, *keys)))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


# ---------------------------------------------------------------- devices

def device():
    """The torch device this process computes on: its GPU where Ray gave it one (Ray sets
    CUDA_VISIBLE_DEVICES to the GPUs an actor or Ray Train worker was assigned), else the
    CPU. The one place that asks whether CUDA is there."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def gpus_for(requested: float, cluster_gpus: float, when_auto: float) -> float:
    """GPUs to ask Ray for: `requested` when set (>= 0); -1 (auto) = `when_auto` on a cluster
    that has GPUs, 0 on one that has none."""
    if requested >= 0:
        return requested
    return when_auto if cluster_gpus > 0 else 0


# ---------------------------------------------------------------- precision for the hardware

def resolve_autocast(value: str, cache_dir: str = "", workers_on_gpu: bool = False) -> tuple[str, str]:
    """(the autocast a run uses, why). 'auto' means bf16 only where the device runs bf16
    matmuls fast: CUDA with bf16, or a CPU whose measured bf16 matmul is at least as fast
    as fp32 (with AVX512-BF16/AMX it is ~2x faster; with AVX2 alone it was ~50x slower).
    The CPU measurement is cached per processor and instruction set. Call it where the
    work runs (learners.group.with_learner_autocast runs it on a learner's node);
    `workers_on_gpu` is for a process that decides for workers elsewhere: they get GPUs,
    so its own processor does not count."""
    if value != "auto":
        return value, "set in the config"
    import torch

    if workers_on_gpu and device().type != "cuda":
        return "bfloat16", "the workers get GPUs (this process has none to test; set autocast: none for GPUs without bf16)"
    if device().type == "cuda":
        return ("bfloat16", "CUDA with bf16") if torch.cuda.is_bf16_supported() else ("none", "CUDA without bf16")
    fp32, bf16 = cpu_matmul_seconds(cache_dir)
    why = f"CPU matmul 512x512: fp32 {fp32 * 1e3:.2f} ms, bf16 {bf16 * 1e3:.2f} ms"
    return ("bfloat16" if bf16 <= fp32 else "none"), why


def processor_name() -> str:
    """The processor this runs on, and whether it has bf16 matmul units: speeds differ by
    machine, so every benchmark names it."""
    import platform
    from pathlib import Path

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.processor() or platform.machine())
    flags = [f for f in ("avx512_bf16", "amx_bf16") if f in info.split()]
    return f"{name} ({', '.join(flags) or 'no bf16 units'})"


def cpu_matmul_seconds(cache_dir: str = "") -> tuple[float, float]:
    """(fp32, bf16) seconds of one 512x512 matmul on this processor, measured once per processor."""
    import json
    import platform
    from pathlib import Path

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else platform.processor()
    # The instruction set the kernels may use is part of the key: ATEN_CPU_CAPABILITY and
    # ONEDNN_MAX_CPU_ISA narrow it below what the processor has.
    import torch

    isa = f"{torch.backends.cpu.get_cpu_capability()}/{os.environ.get('ONEDNN_MAX_CPU_ISA', '')}"
    key = hashlib.sha256((isa + "".join(line for line in info.splitlines(True)
                                        if line.startswith(("model name", "flags")))).encode()).hexdigest()[:16]
    cache = Path(cache_dir or os.environ.get("HH_RAY_CACHE") or Path.home() / ".cache" / "hh-ray") / "cpu_matmul.json"
    known = json.loads(cache.read_text()) if cache.exists() else {}
    if key not in known:
        known[key] = [_matmul_seconds(dtype) for dtype in ("float32", "bfloat16")]
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(known))
    return tuple(known[key])


def _matmul_seconds(dtype: str, n: int = 512, reps: int = 5) -> float:
    import time

    import torch

    a = torch.randn(n, n).to(getattr(torch, dtype))
    a @ a  # warm-up: the first call pays for kernel selection
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - t0)
    return sorted(times)[reps // 2]
