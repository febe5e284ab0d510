"""OOD detection of harmful requests, measured per layer (Bai et al. 2022, §5.4).

The math and the saved detector live in hh_ray/ood.py (serving loads the
detector from there): activations at the **last prompt token** (the ":" of
the final "\\n\\nAssistant:", where the model has read the whole request and
not yet answered), a Gaussian fitted on helpful prompts only, and the
simplified relative Mahalanobis distance (full-covariance minus
diagonal-covariance) or plain Mahalanobis. This module measures it: AUROC of
helpful vs harmful prompts per layer, for both distances and for the
few-shot linear probe trained on k harmful prompts.

The ridge is given relative to the layer's mean activation variance, because
hidden-state scales differ by orders of magnitude between layers; it is
turned into hh_ray.ood's absolute ridge per layer.
"""

from __future__ import annotations

import numpy as np

from hh_ray.ood import OODDetector, auroc, fit_linear_probe


def absolute_ridge(x: np.ndarray, relative: float) -> float:
    """ridge · mean per-unit variance of x: the same regularisation strength at every layer.

    Floored above 0: at layer 0 (the embeddings) every prompt's last token is
    the same ":", so the activations are constant and their variance is 0;
    the floor turns 0/0 into a score of 0 for all, i.e. AUROC ½, the truth."""
    return max(relative * float(np.asarray(x, dtype=np.float64).var(0).mean()), 1e-12)


# ---------------------------------------------------------------- one layer, all methods

def evaluate_layer(h_in: np.ndarray, h_out: np.ndarray, num_fit: int, shots: list[int], ridge: float = 1e-2,
                   seed: int = 0) -> dict:
    """AUROC of helpful (in) vs harmful (out) prompts at one layer.

    The Gaussian is fitted on the first num_fit helpful prompts; AUROC is
    measured on the other helpful prompts against the harmful ones. The
    k-shot probe also trains on k harmful prompts, which are then left out of
    its test set.
    """
    fit, test_in = h_in[:num_fit], h_in[num_fit:]
    out = {}
    for method in ("relative_mahalanobis", "mahalanobis"):
        det = OODDetector.fit(fit, layer=-1, ridge=absolute_ridge(fit, ridge), method=method)
        out[f"auroc_{method}"] = auroc(det.score(test_in), det.score(h_out))
    rng = np.random.default_rng(seed)
    for k in shots:
        if k >= len(h_out):
            continue
        pick = rng.permutation(len(h_out))
        w, b = fit_linear_probe(np.concatenate([fit, h_out[pick[:k]]]), np.r_[np.zeros(len(fit)), np.ones(k)])
        out[f"auroc_probe_{k}shot"] = auroc(test_in @ w + b, h_out[pick[k:]] @ w + b)
    return out
