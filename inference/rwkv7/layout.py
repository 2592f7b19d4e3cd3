"""How the tokens of one pass are laid out: B sequences' tokens flat, one after another."""

from typing import List, NamedTuple

import torch
from torch import Tensor


class Layout(NamedTuple):
    """The tokens of B sequences read together, flat, one sequence after
    another: M = sum(lengths) positions. Built by `layout()`.

    The recurrence takes every sequence's first token in one batched step,
    then the later tokens of the sequences that have more ("readers"),
    longest first, so that at each later step the sequences still reading
    are the first few readers.

    A sequence may also ask for a snapshot: its state after its first n
    tokens (0 < n < its length), taken inside the pass (so a reply that
    keeps the state before its last prompt token needs no pass of its own
    to get there). Snapshot j is of sequence `snap_seq[j]`, after flat
    position `snap_pos[j]`.
    """

    single: bool  # one token per sequence: position b is sequence b (the rest is empty)
    first: Tensor  # [B] position of each sequence's first token
    last: Tensor  # [B] position of each sequence's last token
    readers: Tensor  # [R] the sequences with more than one token, longest first
    readers_in_place: bool  # the readers are exactly sequences 0..B-1 in order (e.g. a uniform chunk)
    # [T-1, R] position of reader r's t-th token (its last one once it has no more), and the
    # positions the later steps produce, in step order; both empty for one sequence, whose later
    # tokens are positions 1.. in order (_recurrence takes them as slices)
    later: Tensor
    later_flat: Tensor
    # Runs of later steps [start, end, readers still reading, reader, snapshot]: after the run,
    # reader `reader`'s state is snapshot `snapshot` (both -1: none); a run may be empty.
    segments: List[List[int]]
    snap_pos: Tensor  # [J] the flat position after which snapshot j is taken
    snap_seq: Tensor  # [J] the sequence of snapshot j
    first_snaps: List[List[int]]  # [sequence, snapshot] for snapshots after a sequence's first token


def layout(lengths, device, snapshot_after=None):
    """The Layout of sequences of these lengths; `snapshot_after` (optional,
    one per sequence): take a snapshot after that many of its tokens
    (0 or None: none; else 0 < n < its length)."""
    if not lengths or min(lengths) < 1:
        raise ValueError("every sequence needs at least one token")
    snapshot_after = [n or 0 for n in snapshot_after] if snapshot_after else [0] * len(lengths)
    if len(snapshot_after) != len(lengths) or any(not 0 <= n < length for n, length in zip(snapshot_after, lengths)):
        raise ValueError("a snapshot is taken after 0 < n < length of a sequence's tokens")
    empty = torch.empty(0, dtype=torch.long, device=device)
    if len(lengths) == sum(lengths):
        return Layout(True, empty, empty, empty, False, empty.view(0, 0), empty, [], empty, empty, [])
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    readers = sorted((b for b, n in enumerate(lengths) if n > 1), key=lambda b: -lengths[b])
    later = range(1, max(lengths))
    active = [sum(1 for b in readers if lengths[b] > t) for t in later]
    snapping = [b for b, n in enumerate(snapshot_after) if n]
    # Later step t (0-based) reads token t + 1: a snapshot after n >= 2 tokens follows step n - 2.
    snaps_after_step = {}
    for j, b in enumerate(snapping):
        if snapshot_after[b] >= 2:
            snaps_after_step.setdefault(snapshot_after[b] - 2, []).append([readers.index(b), j])
    segments = []
    for t, n in enumerate(active):
        if segments and segments[-1][2] == n and segments[-1][3] < 0:
            segments[-1][1] = t + 1
        else:
            segments.append([t, t + 1, n, -1, -1])
        for reader, j in snaps_after_step.get(t, []):
            if segments[-1][3] >= 0:
                segments.append([t + 1, t + 1, n, -1, -1])
            segments[-1][3:] = [reader, j]

    def tensor(values):
        return torch.tensor(values, dtype=torch.long, device=device)

    alone = len(lengths) == 1  # one sequence: _recurrence slices its later tokens, no gathers

    return Layout(
        single=False,
        first=tensor(starts),
        last=tensor([s + n - 1 for s, n in zip(starts, lengths)]),
        readers=tensor(readers),
        readers_in_place=readers == list(range(len(lengths))),
        later=empty.view(0, 0) if alone else tensor([[starts[b] + min(t, lengths[b] - 1) for b in readers]
                                                     for t in later]),
        later_flat=empty if alone else tensor([starts[b] + t for t, n in zip(later, active) for b in readers[:n]]),
        segments=segments,
        snap_pos=tensor([starts[b] + snapshot_after[b] - 1 for b in snapping]) if snapping else empty,
        snap_seq=tensor(snapping) if snapping else empty,
        first_snaps=[[b, j] for j, b in enumerate(snapping) if snapshot_after[b] == 1],
    )
