"""PM scores of sampled responses, for the evaluations (the samples come from
hh_ray.orchestration.sampling: vLLM generation workers, as PPO's rollouts)."""

from __future__ import annotations

import numpy as np

from hh_ray.conversation import render_transcript


def score_samples(pm, pm_tokenizer, prompts: list[str], responses: list[list[str]], max_len: int,
                  fmt: str = "hh") -> np.ndarray:
    """[prompts, n] PM scores of sampled responses, rendered in the PM's conversation format;
    one prompt's n responses share its context in one packed row."""
    from hh_ray.models import pm_group_scores

    pm.eval()
    groups = [[render_transcript(p, r, pm_tokenizer, fmt) for r in rs] for p, rs in zip(prompts, responses)]
    return np.array(pm_group_scores(pm, pm_tokenizer, groups, max_len), dtype=np.float32).reshape(len(prompts), -1)
