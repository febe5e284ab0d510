"""OOD detection of harmful requests: the paper's "simplified relative Mahalanobis"
distance on one layer's activations, fitted on helpful prompts only, and a
linear probe for when a few harmful examples are known (Bai et al. 2022, §5.4).

No Ray here: the evaluation fits and saves a detector; serving (`--ood DIR`)
loads it and scores each prompt with it.

Distances are squared Mahalanobis distances to a Gaussian fitted on
in-distribution activations:
- `mahalanobis`: (x - μ)ᵀ Σ⁻¹ (x - μ), full covariance.
- `diagonal_mahalanobis`: Σᵢ (xᵢ - μᵢ)² / σᵢ², the diagonal of the same Σ.
- `relative_mahalanobis` = full − diagonal: the "simplified relative" score.
  Subtracting the diagonal (a background model that knows each unit's scale
  but no correlations) leaves what only the correlations explain, which is
  what separates unusual inputs from merely large ones.

A detector on disk is a folder:
- `detector.json`: {"format": "hh-ray-ood/1", "method": "relative_mahalanobis" | "mahalanobis",
  "layer": L (index into HF `hidden_states`: 0 = embeddings, L = after block L),
  "token": "last_prompt_token" (whose activation is used), "threshold": float
  (score > threshold = flagged), "ridge": float}
- `detector.safetensors`: float64 `mean` [d], `precision` [d, d] (Σ + ridge·I)⁻¹, `variance` [d].
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "hh-ray-ood/1"
METHODS = ("relative_mahalanobis", "mahalanobis")
TOKEN = "last_prompt_token"


class OODError(ValueError):
    pass


# ---------------------------------------------------------------- the math

def auroc(in_scores, out_scores) -> float:
    """P(score of an OOD input > score of an in-distribution one), ties counted half."""
    a, b = np.asarray(in_scores, dtype=float), np.asarray(out_scores, dtype=float)
    if a.size == 0 or b.size == 0:
        raise OODError("auroc needs at least one in-distribution and one OOD score")
    greater = (b[:, None] > a[None, :]).sum()
    ties = (b[:, None] == a[None, :]).sum()
    return float((greater + 0.5 * ties) / (a.size * b.size))


def fit_gaussian(x, ridge: float = 1e-3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, precision (Σ + ridge·I)⁻¹, variance diag Σ) of rows x [n, d]; Σ is the ML (biased) covariance.
    The ridge keeps Σ invertible when d approaches n, as for a wide layer and few prompts."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise OODError(f"fit_gaussian needs a [n >= 2, d] array, got shape {x.shape}")
    mean = x.mean(0)
    cov = np.cov(x.T, bias=True).reshape(x.shape[1], x.shape[1])
    precision = np.linalg.pinv(cov + ridge * np.eye(cov.shape[0]), hermitian=True)
    return mean, precision, np.diag(cov) + ridge


def mahalanobis(x, mean, precision) -> np.ndarray:
    d = np.asarray(x, dtype=np.float64) - mean
    return np.einsum("bi,ij,bj->b", d, precision, d)


def diagonal_mahalanobis(x, mean, variance) -> np.ndarray:
    d = np.asarray(x, dtype=np.float64) - mean
    return (d ** 2 / variance).sum(1)


def relative_mahalanobis(x, mean, precision, variance) -> np.ndarray:
    return mahalanobis(x, mean, precision) - diagonal_mahalanobis(x, mean, variance)


def fit_linear_probe(x, y, l2: float = 1e-2, steps: int = 500, lr: float = 0.5) -> tuple[np.ndarray, float]:
    """Logistic regression (w, b) on standardised features, by gradient descent; y = 1 for OOD.
    Classes are weighted equally, since the harmful examples are few."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    mu, sd = x.mean(0), x.std(0) + 1e-8
    z = (x - mu) / sd
    weight = np.where(y == 1, 0.5 / max(y.sum(), 1), 0.5 / max((1 - y).sum(), 1))
    w, b = np.zeros(x.shape[1]), 0.0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(z @ w + b)))
        g = weight * (p - y)
        w -= lr * (z.T @ g + l2 * w)
        b -= lr * g.sum()
    # Back to raw features: w·(x - mu)/sd + b.
    return w / sd, float(b - (w / sd) @ mu)


# ---------------------------------------------------------------- a fitted detector

@dataclass
class OODDetector:
    layer: int
    mean: np.ndarray
    precision: np.ndarray
    variance: np.ndarray
    threshold: float = float("inf")
    method: str = "relative_mahalanobis"
    ridge: float = 1e-3

    def __post_init__(self):
        if self.method not in METHODS:
            raise OODError(f"OOD method must be one of {METHODS}, got {self.method!r}")
        d = self.mean.shape[-1]
        if self.precision.shape != (d, d) or self.variance.shape != (d,):
            raise OODError(f"mean [d], precision [d, d], variance [d] expected; got {self.mean.shape}, "
                           f"{self.precision.shape}, {self.variance.shape}")

    @classmethod
    def fit(cls, x_in, layer: int, ridge: float = 1e-3, method: str = "relative_mahalanobis") -> "OODDetector":
        """Fit on in-distribution (helpful) activations only; set `threshold` afterwards."""
        mean, precision, variance = fit_gaussian(x_in, ridge)
        return cls(layer=layer, mean=mean, precision=precision, variance=variance, method=method, ridge=ridge)

    @property
    def dim(self) -> int:
        return self.mean.shape[-1]

    def score(self, x) -> np.ndarray:
        """[n, d] activations -> [n] scores; larger = further out of distribution."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise OODError(f"activations must be [n, {self.dim}], got shape {x.shape}")
        if self.method == "mahalanobis":
            return mahalanobis(x, self.mean, self.precision)
        return relative_mahalanobis(x, self.mean, self.precision, self.variance)

    def flags(self, scores) -> np.ndarray:
        return np.asarray(scores) > self.threshold

    def save(self, out: str | Path) -> Path:
        import torch
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64))
                   for k, v in (("mean", self.mean), ("precision", self.precision), ("variance", self.variance))},
                  str(out / "detector.safetensors"))
        (out / "detector.json").write_text(json.dumps(
            {"format": FORMAT, "method": self.method, "layer": self.layer, "token": TOKEN,
             "threshold": self.threshold, "ridge": self.ridge}, indent=2))
        return out

    @classmethod
    def load(cls, folder: str | Path) -> "OODDetector":
        from safetensors.torch import load_file

        folder = Path(folder)
        meta_path, tensor_path = folder / "detector.json", folder / "detector.safetensors"
        if not meta_path.exists() or not tensor_path.exists():
            raise OODError(f"{folder}: not an OOD detector folder (needs detector.json and detector.safetensors)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise OODError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("token", TOKEN) != TOKEN:
            raise OODError(f"{meta_path}: token {meta.get('token')!r}; only {TOKEN!r} is supported")
        t = {k: v.numpy() for k, v in load_file(str(tensor_path)).items()}
        missing = {"mean", "precision", "variance"} - t.keys()
        if missing or "layer" not in meta:
            raise OODError(f"{folder}: missing {sorted(missing) + ([] if 'layer' in meta else ['layer'])}")
        return cls(layer=int(meta["layer"]), mean=t["mean"], precision=t["precision"], variance=t["variance"],
                   threshold=float(meta.get("threshold", float("inf"))),
                   method=meta.get("method", "relative_mahalanobis"), ridge=float(meta.get("ridge", 0.0)))


def last_prompt_token_activations(model, tokenizer, texts: list[str], layer: int, max_len: int = 512,
                                  batch_size: int = 8) -> np.ndarray:
    """[n, hidden] activations of a causal LM at `hidden_states[layer]` on each prompt's
    last token (prompts truncated from the left, as generation does)."""
    import torch

    n_states = model.config.num_hidden_layers + 1
    if not 0 <= layer < n_states:
        raise OODError(f"layer {layer} out of range: this model has hidden_states 0..{n_states - 1}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for s in range(0, len(texts), batch_size):
        rows = [ids[-max_len:] or [tokenizer.eos_token_id]
                for ids in tokenizer(texts[s: s + batch_size], add_special_tokens=False)["input_ids"]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # right padding: the last real token sits at len - 1
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer]
        out.append(hidden[torch.arange(len(rows)), mask.sum(-1) - 1].double().numpy())
    return np.concatenate(out)
