"""Automatic labelers, so online rounds can run with no person present.

A labeler reads (prompt, response a, response b) and answers what a person
would on the collection page: 'a', 'b' or 'tie', with a strength 1–3 for a
preference. Its `labeler_id` goes into the database with every label, so
people's and machines' labels can always be told apart.

- `RuleLabeler`: the synthetic data's rule (hh_ray/data.py: more "kind" words
  is better). A perfect, known judge for tests and offline runs.
- `PMLabeler`: a preference model as judge, e.g. a held-out "gold" PM trained
  on other data than the PM being trained in the loop (the paper's robustness
  setting: train against one PM, judge with another).

No Ray here; the online loop runs a PM labeler in a 1-CPU Ray task.
"""

from __future__ import annotations

import math
from pathlib import Path

from hh_ray.conversation import pm_format
from hh_ray.data import KIND_WORDS, Comparison

_KIND = set(KIND_WORDS)


def kind_count(text: str) -> int:
    """The synthetic rule's score: how many words of `text` are KIND_WORDS."""
    return sum(w.strip(".,!?").lower() in _KIND for w in text.split())


def strength_from_margin(margin: float, cuts: tuple[float, float]) -> int:
    """1 (slightly), 2 (clearly) or 3 (much better) from a non-negative margin and two cut points."""
    return 1 + (margin > cuts[0]) + (margin > cuts[1])


def choice_from_scores(score_a: float, score_b: float, tie_below: float) -> str:
    if not (math.isfinite(score_a) and math.isfinite(score_b)) or abs(score_a - score_b) <= tie_below:
        return "tie"
    return "a" if score_a > score_b else "b"


class RuleLabeler:
    labeler_id = "rule:kind-words"

    def label(self, prompts: list[str], responses_a: list[str], responses_b: list[str]) -> list[dict]:
        out = []
        for a, b in zip(responses_a, responses_b):
            ka, kb = kind_count(a), kind_count(b)
            choice = choice_from_scores(ka, kb, tie_below=0)
            out.append({"choice": choice, "strength": strength_from_margin(abs(ka - kb), (1, 3))
                        if choice != "tie" else None, "labeler": self.labeler_id})
        return out


class PMLabeler:
    """Prefers the response the PM scores higher; a tie when P(a ≻ b) is within
    `tie_margin` of ½. Strength from P: ≤ 0.65 slightly, ≤ 0.85 clearly, else much."""

    def __init__(self, pm_dir: str, max_len: int = 512, tie_margin: float = 0.0, dtype: str = "float32",
                 labeler_id: str = ""):
        from hh_ray.models import load_scalar_head_model

        self.model, self.tokenizer = load_scalar_head_model(pm_dir, dtype)
        self.model.eval()
        self.format = pm_format(pm_dir)
        self.max_len, self.tie_margin = max_len, tie_margin
        self.labeler_id = labeler_id or f"pm:{Path(pm_dir).resolve()}"

    def label(self, prompts: list[str], responses_a: list[str], responses_b: list[str]) -> list[dict]:
        from hh_ray.pm_eval import score_comparisons

        if not prompts:
            return []
        r_a, r_b = score_comparisons(self.model, self.tokenizer,
                                     [Comparison(p, a, b) for p, a, b in zip(prompts, responses_a, responses_b)],
                                     self.max_len, fmt=self.format)
        out = []
        for sa, sb in zip(r_a.tolist(), r_b.tolist()):
            p_a = 1 / (1 + math.exp(-(sa - sb))) if math.isfinite(sa - sb) else 0.5
            choice = "tie" if abs(p_a - 0.5) <= self.tie_margin else choice_from_scores(sa, sb, 0.0)
            strength = strength_from_margin(abs(p_a - 0.5), (0.15, 0.35)) if choice != "tie" else None
            out.append({"choice": choice, "strength": strength, "labeler": self.labeler_id})
        return out


def make_labeler(spec: str, max_len: int = 512, tie_margin: float = 0.0, dtype: str = "float32"):
    """'rule', or 'pm:DIR' (a trained PM folder as judge)."""
    if spec == "rule":
        return RuleLabeler()
    if spec.startswith("pm:"):
        path = spec[3:]
        if not (Path(path) / "config.json").exists():
            raise ValueError(f"labeler {spec!r}: {path} is not a trained PM folder")
        return PMLabeler(path, max_len, tie_margin, dtype)
    raise ValueError(f"labeler must be 'rule' or 'pm:DIR', got {spec!r}")
