"""Per-token bit widths under an average-bit budget (token-level mixed precision).

A cache card (cards.py) stores every token's keys and values at one of
`levels` bits (2, 3, 4 or 8 by default) in affine groups of `group_size`
values along the head dimension, each group with one fp16 scale and one
fp16 bias; a few protected tokens may stay at fp16. The budget counts all of
it: a row of `head_dim` values at width w costs `w * head_dim + 32 *
head_dim / group_size` bits (16 * head_dim at fp16), so 2/3/4/8 bits cost
2.5/3.5/4.5/8.5 bits per value with groups of 64. (With 2/4/8 alone, a
budget of 3 or 4 bits must put many tokens at 2 bits, and uniform 3-bit
cards beat such mixes on SmolLM2; with 3 in the levels the mix wins at 3,
4 and 5 bits: bench_results/handoff.md.)

The rule (deterministic; ties go to the earlier token):

1. Every token starts at the lowest level: the cheapest width, hence the
   minimum budget `min_budget` (2.5 with groups of 64). A lower budget is refused.
2. The first `protect_first` tokens (attention sinks) and the last
   `protect_last` (the recent window the receiver attends to most) get 4
   bits first, in position order, while the budget allows; from then on
   they compete as if each were the most important token, and only they
   may reach fp16.
3. The rest is greedy by benefit per bit: raising token i from width w to
   the next level removes importance[i] * (err(w) - err(next)) of expected
   squared error, with err(w) = 1 / (2**w - 1)**2 (the relative step of a
   w-bit affine grid), for `cost(next) - cost(w)` bits. Benefits per bit
   fall with every level, so greedy order is optimal for this concave
   objective up to the last upgrade that fits. An upgrade that does not fit
   is skipped and smaller ones still fill what is left.
4. `cap` (a card's previous widths) bounds each token: re-exporting a card
   never spends bits on precision the tokens no longer have.

`weights` counts how many rows a token is stored in (sliding-window layers
keep only their last `window` tokens), so the average is over the values
actually written. The check `sum(cost) <= budget * values` is done in exact
rational arithmetic.
"""

from __future__ import annotations

import heapq
from fractions import Fraction

import numpy as np

LEVELS = (2, 3, 4, 8)  # 3 bits: see docs/cards.md (2/4/8 alone lose to uniform 3-bit at 3-4 bits)
PROTECTED = 16
GROUP_SIZE = 64
UNIFORM = ((16, 64), (8, 32), (8, 64), (6, 32), (6, 64), (5, 32), (5, 64), (4, 32), (4, 64), (3, 32), (3, 64), (2, 32), (2, 64))


def row_bits(width: int, head_dim: int, group_size: int = GROUP_SIZE) -> int:
    """Bits of one row of `head_dim` values at `width`, scales and biases included."""
    if width == 16:
        return 16 * head_dim
    if head_dim % group_size:
        raise ValueError(f"head_dim {head_dim} is not a multiple of the group size {group_size}")
    return width * head_dim + 32 * (head_dim // group_size)


def bits_per_value(widths, head_dim: int, group_size: int = GROUP_SIZE, weights=None) -> float:
    """Average stored bits per value of tokens at `widths` (every scale and bias counted)."""
    widths = np.asarray(widths)
    w = np.ones(len(widths), dtype=np.int64) if weights is None else np.asarray(weights, dtype=np.int64)
    if not len(widths) or not w.sum():
        return 0.0
    total = sum(int(c) * row_bits(int(b), head_dim, group_size) for b, c in zip(widths, w))
    return total / (int(w.sum()) * head_dim)


def min_budget(head_dim: int = GROUP_SIZE, group_size: int = GROUP_SIZE) -> float:
    """The smallest feasible average: every token at 2 bits."""
    return row_bits(LEVELS[0], head_dim, group_size) / head_dim


def _err(width: int) -> float:
    return 0.0 if width >= 16 else 1.0 / (2**width - 1) ** 2


def allocate(
    importance: np.ndarray,
    budget_bits: float,
    head_dim: int,
    protect_first: int = 4,
    protect_last: int = 16,
    weights: np.ndarray | None = None,
    cap: np.ndarray | None = None,
    group_size: int = GROUP_SIZE,
    levels: tuple[int, ...] = LEVELS,
) -> np.ndarray:
    """Widths (int array, one of `levels` or 16 per token) whose average cost is at
    most `budget_bits` per value (see module doc). Raises ValueError below the minimum."""
    levels = tuple(sorted(levels))
    if len(levels) < 2 or not set(levels) <= {2, 3, 4, 5, 6, 8}:
        raise ValueError(f"levels must be two or more of 2, 3, 4, 5, 6, 8 bits, got {levels}")
    imp = np.asarray(importance, dtype=np.float64)
    n = len(imp)
    if imp.ndim != 1 or not np.isfinite(imp).all() or (imp < 0).any():
        raise ValueError("importance must be one finite, non-negative score per token")
    weights = np.ones(n, dtype=np.int64) if weights is None else np.asarray(weights, dtype=np.int64)
    if weights.shape != (n,) or (weights < 0).any():
        raise ValueError("weights must be one non-negative count per token")
    lo = row_bits(levels[0], head_dim, group_size) / head_dim
    if not budget_bits >= lo:  # also refuses NaN
        raise ValueError(f"a budget of {budget_bits} bits per value is below the minimum of {lo:g} (every token at {levels[0]} bits)")
    cap = np.full(n, PROTECTED) if cap is None else np.asarray(cap)
    if cap.shape != (n,):
        raise ValueError("cap must be one width per token")
    widths = np.full(n, levels[0], dtype=np.int64)
    allowed = Fraction(budget_bits).limit_denominator(1 << 20) * head_dim * int(weights.sum())
    spent = int(weights.sum()) * row_bits(levels[0], head_dim, group_size)
    cost = {b: row_bits(b, head_dim, group_size) for b in (*levels, PROTECTED)}
    chain = dict(zip(levels, (*levels[1:], PROTECTED)))
    protect = np.zeros(n, dtype=bool)
    protect[: max(protect_first, 0)] = True
    if protect_last > 0:
        protect[max(n - protect_last, 0) :] = True

    def step(i: int) -> tuple | None:
        """(priority, i, next width, extra bits) of token i's next upgrade, or None."""
        w = int(widths[i])
        nxt = chain.get(w)
        if nxt is None or (nxt == PROTECTED and not protect[i]) or nxt > cap[i]:
            return None
        extra = int(weights[i]) * (cost[nxt] - cost[w])
        if protect[i] and w < 4:  # every protected token has 4 bits before anyone competes
            return ((0, w, i), i, nxt, extra)
        gain = (top if protect[i] else imp[i]) * int(weights[i]) * (_err(w) - _err(nxt)) / max(extra, 1)
        return ((1, -gain, i), i, nxt, extra)

    top = float(imp.max()) if n else 0.0  # protected tokens compete as the most important one
    heap = [s for s in (step(i) for i in range(n)) if s is not None]
    heapq.heapify(heap)
    while heap:
        _, i, nxt, extra = heapq.heappop(heap)
        if spent + extra > allowed:
            continue  # this token's further upgrades cost even more: it stays
        widths[i] = nxt
        spent += extra
        s = step(i)
        if s is not None:
            heapq.heappush(heap, s)
    return widths


def uniform(budget_bits: float, head_dim: int) -> tuple[int, int]:
    """The single (width, group size) with the most bits that fits `budget_bits`
    per value: the uniform-precision baseline at the same bytes (2-bit groups of
    32 give 3.0, 3-bit groups of 32 give 4.0, 4-bit groups of 32 give 5.0;
    16 is fp16, a lossless copy)."""
    for width, g in UNIFORM:
        if head_dim % g == 0 and row_bits(width, head_dim, g) <= Fraction(budget_bits).limit_denominator(1 << 20) * head_dim:
            return width, g
    raise ValueError(f"a budget of {budget_bits} bits per value is below the minimum of {min_budget(head_dim):g}")
