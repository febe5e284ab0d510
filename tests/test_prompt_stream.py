"""The prompt stream: same prompts at the same positions as the original algorithm, one shuffle per epoch."""

import random

import pytest

from hh_ray.prompt_stream import PromptStream


def reference_take(prompts: list[str], seed: int, start: int, n: int) -> list[str]:
    """The original algorithm (one full reshuffle per prompt): defines what a run sees at each position."""
    out = []
    for k in range(start, start + n):
        epoch, i = divmod(k, len(prompts))
        order = list(range(len(prompts)))
        random.Random(seed * 7919 + epoch).shuffle(order)
        out.append(prompts[order[i]])
    return out


PROMPTS = [f"prompt {i}" for i in range(37)]


@pytest.mark.parametrize("seed", [0, 1, 42])
@pytest.mark.parametrize("start,n", [
    (0, 1), (0, 8), (5, 10), (0, 37),          # inside the first epoch, and all of it
    (30, 10), (36, 2), (37, 5), (70, 8),       # spans crossing an epoch boundary, and later epochs
    (3, 100), (0, 200), (111, 37),             # n > len(prompts): several epochs in one draw
    (0, 0),
])
def test_take_equals_the_original_algorithm(seed, start, n):
    assert PromptStream(PROMPTS, seed).take(start, n) == reference_take(PROMPTS, seed, start, n)


def test_consecutive_draws_equal_the_original_algorithm():
    """A run draws batch after batch from one stream; the cache must not change what it sees."""
    stream = PromptStream(PROMPTS, 7)
    pos = 0
    for n in (8, 8, 8, 20, 3, 50, 8, 1, 37):
        assert stream.take(pos, n) == reference_take(PROMPTS, 7, pos, n)
        pos += n
    # going back (a rollback to a checkpoint) gives the same prompts again
    assert stream.take(0, 8) == reference_take(PROMPTS, 7, 0, 8)
    assert stream.take(30, 12) == reference_take(PROMPTS, 7, 30, 12)


def test_one_shuffle_per_epoch_touched(monkeypatch):
    calls = []
    original = random.Random.shuffle

    def counting_shuffle(self, x):
        calls.append(len(x))
        return original(self, x)

    monkeypatch.setattr(random.Random, "shuffle", counting_shuffle)
    stream = PromptStream(PROMPTS, 3)

    stream.take(0, 30)                 # epoch 0
    assert len(calls) == 1
    stream.take(30, 7)                 # still epoch 0: cached
    assert len(calls) == 1
    stream.take(37, 20)                # epoch 1
    assert len(calls) == 2
    stream.take(57, 30)                # the rest of epoch 1 (cached) and epoch 2
    assert len(calls) == 3
    stream.take(87, 3 * 37)            # epochs 2 (cached), 3, 4, 5
    assert len(calls) == 6
    assert all(c == len(PROMPTS) for c in calls)


def test_keeps_at_most_two_epochs():
    stream = PromptStream(PROMPTS, 0)
    stream.take(0, 10 * len(PROMPTS))
    assert len(stream._orders) <= PromptStream.KEEP_EPOCHS


def test_a_batch_of_512_from_160k_prompts():
    """At full scale the draw is one shuffle plus a slice (the original took tens of seconds per draw)."""
    prompts = [f"p{i}" for i in range(160_000)]
    stream = PromptStream(prompts, 0)
    batch = stream.take(159_800, 512)  # crosses into epoch 1
    assert len(batch) == 512 and len(set(batch[:200])) == 200
    assert batch[:3] == reference_take(prompts, 0, 159_800, 3)
    assert batch[200:203] == reference_take(prompts, 0, 160_000, 3)
    assert stream.take(160_312, 512) == stream.take(160_312, 512)


def test_no_prompts():
    assert PromptStream([], 0).take(0, 0) == []
    with pytest.raises(ValueError):
        PromptStream([], 0).take(0, 1)
