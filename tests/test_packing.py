"""Shared-prefix packing (hh_ray.packing): the token arithmetic by hand, and on the tiny
model the scores and gradients of a packed comparison equal the two-transcript ones."""

import pytest
import torch

from hh_ray.packing import (length_grouped, pack_groups, packed_length, shared_prefix_length,
                            truncate_group)


def test_shared_prefix_leaves_every_row_a_token_of_its_own():
    assert shared_prefix_length([[1, 2, 3, 9], [1, 2, 4, 9]]) == 2
    assert shared_prefix_length([[1, 2, 9], [1, 2, 9, 5, 9]]) == 2  # a row that is the other's prefix
    assert shared_prefix_length([[1, 2, 9], [1, 2, 9]]) == 2  # identical rows keep their last token
    assert shared_prefix_length([[5, 9], [6, 9]]) == 0
    assert shared_prefix_length([[1, 2, 9]]) == 0  # a group of one is a plain row
    assert packed_length([[1, 2, 3, 9], [1, 2, 4, 9]]) == 6


def test_pack_groups_by_hand():
    b = pack_groups([[[1, 2, 3, 9], [1, 2, 4, 4, 9]], [[7, 9]]], pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 3, 9, 4, 4, 9], [7, 9, 0, 0, 0, 0, 0]]
    # each suffix continues from the end of the shared prefix
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4], [0, 1, 0, 0, 0, 0, 0]]
    assert b.segment.tolist() == [[0, 0, 1, 1, 2, 2, 2], [1, 1, -1, -1, -1, -1, -1]]
    assert b.read_at.tolist() == [[0, 3], [0, 6], [1, 1]]  # last token of each transcript
    assert b.tokens == 9
    a = b.allowed()[0].int().tolist()
    assert a[4] == [1, 1, 0, 0, 1, 0, 0]  # the second suffix sees the prefix and itself, not the first
    assert a[3] == [1, 1, 1, 1, 0, 0, 0]
    assert b.allowed()[1, 4].int().tolist() == [0, 0, 0, 0, 1, 0, 0]  # padding sees only itself


def test_truncate_group_cuts_the_shared_context_once():
    rows = [[1, 2, 3, 4, 5, 9], [1, 2, 3, 4, 6, 6, 6, 9]]
    # the longer row needs 3 tokens off; both lose the same 3, so they still share [4]
    assert truncate_group(rows, 5) == [[4, 5, 9], [4, 6, 6, 6, 9]]
    # a suffix longer than max_len loses its own start after the whole shared part
    assert truncate_group(rows, 3) == [[5, 9], [6, 6, 9]]
    assert truncate_group(rows, 100) == rows


def test_length_grouped_keeps_the_items_and_groups_like_lengths():
    lengths = [i % 7 for i in range(100)]
    order = list(range(100))[::-1]
    got = length_grouped(order, lengths, batch_size=10, key="k", batches_per_group=5)
    assert sorted(got) == list(range(100))
    assert set(got[:50]) == set(order[:50])  # runs follow the given order
    for b in range(10):
        batch = [lengths[i] for i in got[b * 10:(b + 1) * 10]]
        assert max(batch) - min(batch) <= 2
    assert got == length_grouped(order, lengths, batch_size=10, key="k", batches_per_group=5)
    assert got != length_grouped(order, lengths, batch_size=10, key="other", batches_per_group=5)
    tail = length_grouped(list(range(25)), [0] * 25, batch_size=10, key="k")
    assert tail[20:] == [20, 21, 22, 23, 24]  # a short last batch stays last


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_scores_and_gradients_equal_the_two_transcript_ones(tiny_model, attention):
    from hh_ray.data import synthetic_comparisons
    from hh_ray.models import encode_for_pm, load_scalar_head_model, packed_values, pm_group_rows, pm_scores
    from hh_ray.pm_eval import comparison_groups, pairwise_loss

    torch.manual_seed(0)
    model, tok = load_scalar_head_model(tiny_model)
    model.set_attn_implementation(attention)
    pairs = synthetic_comparisons(6, seed=3)
    groups = comparison_groups(pairs, tok, "hh")

    def grads():
        g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        return g

    enc = encode_for_pm(tok, [g[0] for g in groups] + [g[1] for g in groups], 128)
    s = pm_scores(model, enc["input_ids"], enc["attention_mask"])
    pairwise_loss(s[:6], s[6:]).backward()
    want = grads()
    batch = pack_groups(pm_group_rows(tok, groups, 128), tok.pad_token_id)
    assert batch.tokens < int(enc["attention_mask"].sum())  # the context is computed once
    v = packed_values(model, batch)
    pairwise_loss(v[0::2], v[1::2]).backward()
    got = grads()
    torch.testing.assert_close(torch.stack([v[0::2], v[1::2]]), torch.stack([s[:6], s[6:]]), atol=1e-5, rtol=1e-5)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-4, msg=name)


def test_group_scores_equal_one_by_one_scores_in_any_batching(tiny_model):
    from hh_ray.models import load_scalar_head_model, pm_group_scores

    model, tok = load_scalar_head_model(tiny_model)
    model.eval()
    prompt = "\n\nHuman: how do I bake bread?\n\nAssistant:"
    groups = [[prompt + " Flour, water, salt.", prompt + " Ask a baker!", prompt + " No."], [prompt + " Knead it."]]
    alone = [[pm_group_scores(model, tok, [[t]], 128)[0][0] for t in g] for g in groups]
    for batch_size in (1, 2, 16):
        got = pm_group_scores(model, tok, groups, 128, batch_size=batch_size)
        assert [len(g) for g in got] == [3, 1]
        torch.testing.assert_close(torch.tensor(sum(got, [])), torch.tensor(sum(alone, [])), atol=1e-5, rtol=1e-5)
