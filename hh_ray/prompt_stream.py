"""The training prompts: which prompts a run sees, in which order, and where they come from.

`PromptStream` is an endless, epoch-shuffled stream: position k (counted from
the start of the run) is the same prompt in every run with the same seed, so a
resumed run continues onto exactly the prompts an uninterrupted one would have
drawn. `load_prompts` builds the training and held-out prompt lists from the
configured comparison data.
"""

from __future__ import annotations

import random

from hh_ray.config import Config, ConfigError
from hh_ray.conversation import prompt_token_ids
from hh_ray.data import load_comparisons, prompts_of, train_eval_split


class PromptStream:
    """An endless, epoch-shuffled stream of prompts; position k is the same in every run with this seed.

    Epoch e is the prompt list in the order of `random.Random(seed * 7919 + e).shuffle`.
    One draw costs O(n) once its epochs are shuffled; each epoch is shuffled
    once and kept, and only the two most recently used epochs are kept (a
    draw of a batch spans at most two unless n > len(prompts)).
    """

    KEEP_EPOCHS = 2

    def __init__(self, prompts: list[str], seed: int):
        self.prompts, self.seed = prompts, seed
        self._orders: dict[int, list[int]] = {}  # epoch -> permutation, oldest used first

    def _order(self, epoch: int) -> list[int]:
        order = self._orders.pop(epoch, None)
        if order is None:
            order = list(range(len(self.prompts)))
            # The seed formula is kept as it has always been: it defines which prompts a
            # run sees at each position, so existing runs resume onto the same prompts.
            random.Random(self.seed * 7919 + epoch).shuffle(order)
        self._orders[epoch] = order  # (re)inserted as the most recently used
        while len(self._orders) > self.KEEP_EPOCHS:
            del self._orders[next(iter(self._orders))]
        return order

    def take(self, start: int, n: int) -> list[str]:
        """The n prompts at positions start, start + 1, …, start + n - 1."""
        if n <= 0:
            return []
        size = len(self.prompts)
        if size == 0:
            raise ValueError("PromptStream has no prompts to draw from")
        out: list[str] = []
        k, end = start, start + n
        while k < end:
            epoch, i = divmod(k, size)
            j = min(size, i + (end - k))
            order = self._order(epoch)
            out.extend(self.prompts[o] for o in order[i:j])
            k += j - i
        return out


def load_prompts(cfg: Config, tokenizer, conversation_format: str = "hh") -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts) as HH text, keeping those that fit the context with a
    full response once rendered in the policy's conversation format."""
    comparisons = load_comparisons(cfg.data.source, cfg.data.data_dir, cfg.data.split, cfg.data.skip_bad,
                                   cfg.data.num_synthetic, cfg.seed)
    if cfg.data.eval_split:
        train = comparisons
        held_out = load_comparisons(cfg.data.source, cfg.data.data_dir, cfg.data.eval_split, cfg.data.skip_bad)
    else:
        train, held_out = train_eval_split(comparisons, cfg.data.eval_fraction, cfg.seed)
    room = cfg.model.max_seq_len - cfg.generation.max_new_tokens

    def fits(ps):
        return [p for p, ids in zip(ps, prompt_token_ids(ps, tokenizer, conversation_format)) if 0 < len(ids) <= room]

    train_p, eval_p = fits(prompts_of(train)), fits(prompts_of(held_out))[: cfg.ppo.eval_prompts]
    if not train_p:
        raise ConfigError(f"no training prompt fits in model.max_seq_len - generation.max_new_tokens = {room} tokens")
    return train_p, eval_p
