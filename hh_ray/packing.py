"""Shared-prefix packing: transcripts that begin alike scored in one row.

The chosen and the rejected transcript of a comparison share their whole
context, and so do the n samples of one prompt (best-of-n, samples_per_prompt).
Run separately, that context is computed once per transcript. Packed, a row
holds the shared tokens once and then each transcript's own suffix:

    [ shared prefix | suffix 1 | suffix 2 | ... ]

A block attention mask lets a suffix token see the prefix and the earlier
tokens of its own suffix, nothing else, and its position id continues from the
end of the prefix. Every transcript's hidden states are then those of its own
forward pass (up to float summation order), and so are the gradients, at
len(prefix) + Σ len(suffix) tokens instead of Σ len(transcript).

Pure token arithmetic; the model call is hh_ray.models.packed_values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def shared_prefix_length(rows: list[list[int]]) -> int:
    """Tokens every row begins with, leaving each row at least one token of its own
    (its last, where it is read)."""
    if len(rows) < 2:
        return 0
    n = min(len(r) for r in rows) - 1
    first = rows[0]
    for i in range(max(n, 0)):
        if any(r[i] != first[i] for r in rows[1:]):
            return i
    return max(n, 0)


def packed_length(rows: list[list[int]]) -> int:
    """Tokens of the packed row for one group."""
    return sum(len(r) for r in rows) - (len(rows) - 1) * shared_prefix_length(rows)


def truncate_group(rows: list[list[int]], max_len: int) -> list[list[int]]:
    """A group cut to max_len tokens per row, from the left as for one transcript, but
    the shared prefix cut once for all, so every row keeps the same context (cut one
    by one, rows of different lengths would start at different tokens and share
    nothing). A row whose own suffix is still too long then loses its own start."""
    if not rows:
        return rows
    cut = min(shared_prefix_length(rows), max(0, max(len(r) for r in rows) - max_len))
    return [r[cut:][-max_len:] for r in rows]


@dataclass
class PackedBatch:
    """One padded batch of packed rows.

    input_ids, position_ids, segment: [B, S]; segment is 0 on a shared prefix, k on the
    k-th suffix of its row (1-based) and -1 on padding. read_at: [N, 2] (row, column)
    of each transcript's last token, in the order the groups and their rows were given.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment: torch.Tensor
    read_at: torch.Tensor

    def allowed(self) -> torch.Tensor:
        """[B, S, S] bool: query i may attend to key j. Causal; a suffix sees the prefix and
        itself; a padding query sees only itself (a row with no key gives NaN in softmax,
        and NaN reaches the weights through the backward pass even where unread)."""
        s = self.segment
        width = s.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        same = (s[:, :, None] == s[:, None, :]) | (s[:, None, :] == 0)
        allowed = causal & same & (s[:, None, :] >= 0) & (s[:, :, None] >= 0)
        return allowed | torch.eye(width, dtype=torch.bool)

    @property
    def tokens(self) -> int:
        """Real (non-padding) tokens in the batch."""
        return int((self.segment >= 0).sum())


def pack_groups(groups: list[list[list[int]]], pad_id: int) -> PackedBatch:
    """One packed row per group of token rows that share a prefix (a group of one is a
    plain row), right-padded with pad_id."""
    packed, positions, segments, read_at = [], [], [], []
    for g, rows in enumerate(groups):
        p = shared_prefix_length(rows)
        ids, pos, seg = list(rows[0][:p]), list(range(p)), [0] * p
        for k, r in enumerate(rows, start=1):
            ids += r[p:]
            pos += range(p, len(r))
            seg += [k] * (len(r) - p)
            read_at.append((g, len(ids) - 1))
        packed.append(ids)
        positions.append(pos)
        segments.append(seg)
    width = max(len(r) for r in packed)
    shape = (len(packed), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment = torch.full(shape, -1, dtype=torch.long)
    for i, (ids, pos, seg) in enumerate(zip(packed, positions, segments)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        position_ids[i, : len(pos)] = torch.tensor(pos)
        segment[i, : len(seg)] = torch.tensor(seg)
    return PackedBatch(input_ids, position_ids, segment, torch.tensor(read_at, dtype=torch.long))


def length_grouped(order: list[int], lengths: list[int], batch_size: int, key: str,
                   batches_per_group: int = 32) -> list[int]:
    """`order` rearranged so that each batch of batch_size holds items of similar length (less
    padding): every run of batches_per_group batches is sorted by length, cut into batches, and
    its full batches put in an order drawn from `key` (no short-to-long drift within a run).
    Which items fall in which run still follows `order`, and a short last batch stays last.
    A pure function of its arguments, so a resumed run sees the same batches."""
    import random

    run = batch_size * batches_per_group
    out: list[int] = []
    for start in range(0, len(order), run):
        items = sorted(order[start: start + run], key=lambda i: (lengths[i], i))
        batches = [items[b: b + batch_size] for b in range(0, len(items), batch_size)]
        full = [b for b in batches if len(b) == batch_size]
        random.Random(f"{key}/{start}").shuffle(full)
        for b in full + [b for b in batches if len(b) < batch_size]:
            out += b
    return out
