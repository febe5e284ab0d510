"""Sample responses with Hugging Face `generate` and score them with the PM, for the evaluations.

The evaluations (best-of-n, Elo) need a few hundred samples, not a training
stream, so they use HF generate in-process: no actors to start, the same
numbers on CPU and GPU. PPO itself samples with vLLM actors (actors/).
"""

from __future__ import annotations

import numpy as np
import torch

from hh_ray.conversation import end_of_turn_token_ids, render_prompt, render_transcript, stop_strings


def cut_at_stop(response: str, fmt: str) -> str:
    """A response ends where its turn does: before the format's stop string (hh: the next
    human turn), as the vLLM rollouts and serving end it."""
    for stop in stop_strings(fmt):
        cut = response.find(stop)
        response = response if cut < 0 else response[:cut]
    return response


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: list[str], n: int, max_new_tokens: int, temperature: float = 1.0,
                     max_prompt_len: int = 384, seed: int = 0, batch_size: int = 8, fmt: str = "hh") -> list[list[str]]:
    """n sampled responses per HH prompt, [prompts][n], in the policy's conversation format
    (the prompt rendered in it, generation stopped at its end of turn)."""
    model.eval()
    torch.manual_seed(seed)
    tokenizer.padding_side = "left"  # generation continues from the last column
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[list[str]] = []
    for i in range(0, len(prompts), batch_size):
        rendered = [render_prompt(p, tokenizer, fmt) for p in prompts[i: i + batch_size]]
        rows = [ids[-max_prompt_len:] for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(rows):
            ids[j, width - len(r):], mask[j, width - len(r):] = torch.tensor(r), 1
        gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature, top_p=1.0,
                             top_k=0, max_new_tokens=max_new_tokens, num_return_sequences=n, pad_token_id=pad,
                             eos_token_id=end_of_turn_token_ids(tokenizer, fmt) or None)
        texts = tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
        out += [[cut_at_stop(t, fmt) for t in texts[j * n:(j + 1) * n]] for j in range(len(rows))]
    return out


def score_samples(pm, pm_tokenizer, prompts: list[str], responses: list[list[str]], max_len: int,
                  fmt: str = "hh") -> np.ndarray:
    """[prompts, n] PM scores of sampled responses, rendered in the PM's conversation format;
    one prompt's n responses share its context in one packed row."""
    from hh_ray.models import pm_group_scores

    pm.eval()
    groups = [[render_transcript(p, r, pm_tokenizer, fmt) for r in rs] for p, rs in zip(prompts, responses)]
    return np.array(pm_group_scores(pm, pm_tokenizer, groups, max_len), dtype=np.float32).reshape(len(prompts), -1)
