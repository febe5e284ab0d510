"""Context distillation (Bai et al. 2022, App. A.1; Askell et al. 2021) and SFT, as small functions.

The teacher is the initial LM reading an HHH prompt C before each text x; the
student is the same LM reading x alone. Training minimises
KL(p_teacher(· | C, x<t) ‖ p_student(· | x<t)) at every position t of x.
As in the paper, each teacher distribution is kept as its top-k tokens plus one
"everything else" bucket holding the remaining probability, so the teacher can
be computed once and stored: k ids, k log-probs and one rest log-prob per
position instead of a whole vocabulary.

Alignment: student logits at position j of x predict x[j+1]. The teacher reads
x with C's keys/values already cached, so its logits at position j of x also
predict x[j+1]: both sides line up position by position, and the first token
of x (which the student cannot predict) is never a target.

Teacher cache on disk (`teacher_cache/`): one safetensors file per writer
(`shard-<r>.safetensors`: `example` [n] ids of the examples it holds,
`offsets` [n+1] into the flat rows, `ids` [T, k] int32, `logprobs` [T, k]
float32, `rest` [T] float32), and `meta.json`, written last, which says what
the cache was computed from; a cache whose meta differs is recomputed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path

import torch

PROMPT_FILE = Path(__file__).resolve().parent / "prompts" / "hhh_prompt.txt"
CACHE_FORMAT = 1

# ---------------------------------------------------------------- the math (pure)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, accurate at both ends (Mächler 2012).

    x is clamped just below 0: when the top-k hold all the mass in float32 the
    rest bucket gets ~1e-7 instead of 0, which keeps log and its gradient finite.
    """
    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def teacher_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-k token ids, their log-probs, log-prob of everything else) of each position's distribution.

    The rest is summed exactly over the other tokens (not 1 − Σ top-k), so a
    small rest keeps its precision; with k ≥ vocabulary it is −inf (empty).
    """
    logp = logits.float().log_softmax(-1)
    top, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    rest = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return ids, top, rest


def topk_kl(student_logp: torch.Tensor, teacher_ids: torch.Tensor, teacher_logp: torch.Tensor,
            teacher_rest: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) per position over k+1 buckets: the teacher's top-k tokens and the rest.

    student_logp: [..., V] log-softmax of the student; teacher_*: [..., k], [..., k], [...].
    Coarse-graining can only lower a KL, so this is a lower bound on the full KL,
    equal to it when the rest bucket holds at most one token.
    """
    q_top = student_logp.gather(-1, teacher_ids.long())
    q_rest = log1mexp(q_top.logsumexp(-1))
    kl_top = (teacher_logp.exp() * (teacher_logp - q_top)).sum(-1)
    p_rest = teacher_rest.exp()
    # An empty teacher bucket contributes 0 (0 · log 0 = 0), not NaN.
    kl_rest = torch.where(p_rest > 0, p_rest * (teacher_rest - q_rest), torch.zeros_like(p_rest))
    return kl_top + kl_rest


def token_nll(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """SFT: −log p(target) per position."""
    return -logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


def next_token_logp(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, L−1, V] float32 log-probs; row j predicts ids[:, j+1]."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    return logits.float().log_softmax(-1)


# ---------------------------------------------------------------- examples and batches


def pad_rows(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, L] ids and attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def sft_example(prompt_ids: list[int], response_ids: list[int], eos_id: int, max_len: int) -> dict:
    """prompt + response + EOS, trained only on the response and EOS (the Assistant's tokens).

    EOS is a target so the policy learns to stop. Too long: the prompt loses its
    start (the latest turns matter most); the response is cut only if it alone
    leaves no room for one prompt token.
    """
    response = (response_ids + [eos_id])[: max_len - 1]
    prompt = prompt_ids[-(max_len - len(response)):]
    return {"ids": prompt + response, "start": len(prompt)}


def loss_mask(examples: list[dict], width: int) -> torch.Tensor:
    """[B, width−1] 1 where the target ids[j+1] is trained on: from `start` (SFT) or 1 (distillation)."""
    m = torch.zeros((len(examples), width - 1))
    for i, e in enumerate(examples):
        m[i, max(e.get("start", 1), 1) - 1: len(e["ids"]) - 1] = 1
    return m


def loss_tokens(example: dict) -> int:
    return len(example["ids"]) - max(example.get("start", 1), 1)


# ---------------------------------------------------------------- the teacher


def read_prompt(path: str = "") -> str:
    """The HHH prompt text; trailing newlines dropped so a text's own "\\n\\nHuman:" follows it."""
    p = Path(path).expanduser() if path else PROMPT_FILE
    if not p.is_file():
        raise FileNotFoundError(f"distill.prompt_file: {p}: no such file")
    text = p.read_text(encoding="utf-8").rstrip("\n")
    if not text.strip():
        raise ValueError(f"distill.prompt_file: {p} is empty")
    return text


@torch.no_grad()
def prompt_kv(model, prompt_ids: list[int]):
    """Keys/values of the prompt, computed once and reused for every batch of texts."""
    return model(input_ids=torch.tensor([prompt_ids], device=model.device), use_cache=True).past_key_values


@torch.no_grad()
def teacher_logits(model, kv, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, L, V] logits of prompt + text at the text's positions, from the cached prompt.

    Equal (to float tolerance) to a forward over the concatenation, for a
    fraction of its cost when the prompt is long: the prompt is not re-read
    for every text. The texts are right-padded, so positions need no shift.
    """
    cache = copy.deepcopy(kv)  # forward appends to the cache; keep the prompt's clean
    cache.batch_repeat_interleave(ids.shape[0])
    ids, mask = ids.to(model.device), mask.to(model.device)
    full_mask = torch.cat([mask.new_ones(ids.shape[0], cache.get_seq_length()), mask], dim=1)
    return model(input_ids=ids, attention_mask=full_mask, past_key_values=cache, use_cache=True).logits


def teacher_rows(model, kv, examples: list[dict], pad_id: int, k: int) -> list[tuple]:
    """Per example: (ids [n−1, k], log-probs [n−1, k], rest [n−1]) for its n−1 predicted tokens, on the CPU."""
    ids, mask = pad_rows([e["ids"] for e in examples], pad_id)
    t_ids, t_logp, t_rest = (t.cpu() for t in teacher_topk(teacher_logits(model, kv, ids, mask)[:, :-1], k))
    return [(t_ids[i, : len(e["ids"]) - 1].to(torch.int32), t_logp[i, : len(e["ids"]) - 1],
             t_rest[i, : len(e["ids"]) - 1]) for i, e in enumerate(examples)]


def stack_targets(rows: list[tuple], width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher rows padded to [B, width−1, ...]; padding is a harmless finite target (masked out)."""
    k = rows[0][0].shape[-1]
    ids = torch.zeros((len(rows), width - 1, k), dtype=torch.long)
    logp = torch.full((len(rows), width - 1, k), -math.log(k))
    rest = torch.full((len(rows), width - 1), float("-inf"))
    for i, (a, b, c) in enumerate(rows):
        ids[i, : len(a)], logp[i, : len(a)], rest[i, : len(a)] = a, b, c
    return ids, logp, rest


# ---------------------------------------------------------------- the teacher cache (format above)


def cache_meta(model_path: str, prompt_ids: list[int], k: int, examples: list[dict]) -> dict:
    """What a cache depends on; a cache is reused only when this matches exactly."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update((",".join(map(str, e["ids"])) + ";").encode())
    return {"format": CACHE_FORMAT, "model": str(model_path), "top_k": k,
            "prompt_sha256": hashlib.sha256(",".join(map(str, prompt_ids)).encode()).hexdigest(),
            "examples_sha256": digest.hexdigest(), "examples": len(examples)}


def cache_is_valid(folder: Path, meta: dict) -> bool:
    f = Path(folder) / "meta.json"
    if not f.exists():
        return False
    saved = json.loads(f.read_text())
    return all(saved.get(key) == v for key, v in meta.items())


def save_shard(folder: Path, shard: int, example_ids: list[int], rows: list[tuple]) -> None:
    from safetensors.torch import save_file

    lengths = [len(r[2]) for r in rows]
    offsets = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)
    k = rows[0][0].shape[-1] if rows else 1
    cat = (lambda i, shape: torch.cat([r[i] for r in rows]) if rows else torch.zeros(shape))
    Path(folder).mkdir(parents=True, exist_ok=True)
    save_file({"example": torch.tensor(example_ids, dtype=torch.int64), "offsets": offsets,
               "ids": cat(0, (0, k)).to(torch.int32).contiguous(), "logprobs": cat(1, (0, k)).contiguous(),
               "rest": cat(2, (0,)).contiguous()}, str(Path(folder) / f"shard-{shard}.safetensors"))


def write_meta(folder: Path, meta: dict, shards: int) -> None:
    (Path(folder) / "meta.json").write_text(json.dumps({**meta, "shards": shards}, indent=1))


def load_cache(folder: Path) -> dict[int, tuple]:
    """{example id: (ids, log-probs, rest)} from every shard of a complete cache."""
    from safetensors.torch import load_file

    meta = json.loads((Path(folder) / "meta.json").read_text())
    out = {}
    for s in range(meta["shards"]):
        t = load_file(str(Path(folder) / f"shard-{s}.safetensors"))
        o = t["offsets"].tolist()
        for j, ex in enumerate(t["example"].tolist()):
            out[ex] = (t["ids"][o[j]: o[j + 1]], t["logprobs"][o[j]: o[j + 1]], t["rest"][o[j]: o[j + 1]])
    if len(out) != meta["examples"]:
        raise ValueError(f"{folder}: teacher cache holds {len(out)} of {meta['examples']} examples")
    return out


# ---------------------------------------------------------------- the corpus


def load_corpus(source: str, num_synthetic: int = 4000, seed: int = 0) -> list[str]:
    """Texts to distill on: 'synthetic', a .txt file or a .jsonl file.

    A .txt file holds one text per non-empty line; a literal backslash-n in it
    stands for a newline, so multi-turn HH dialogues fit on one line.

    A .jsonl record gives its 'text' field, or an HH record its 'chosen'
    transcript. Errors name the file (and line).
    """
    from hh_ray.data import DataError, read_jsonl, synthetic_comparisons

    if source == "synthetic":
        return [c.prompt + c.chosen for c in synthetic_comparisons(num_synthetic, seed=seed)]
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"distill.corpus: {path}: no such file")
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        texts = []
        for lineno, rec in read_jsonl(path):
            text = rec.get("text", rec.get("chosen"))
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: no string field 'text' or 'chosen'")
            texts.append(text)
    else:
        texts = [line.replace("\\n", "\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise DataError(f"distill.corpus: {path} holds no texts")
    return texts
