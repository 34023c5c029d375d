"""mask_bounds: tile classes and key-loop bounds against brute-force evaluation of the mask.

For every query tile the schedule must (1) never skip a key tile that has a visible entry,
(2) mark a tile full only when every (row, key) in it is visible, and (3) visit no tile twice.
It must also actually prune: the affine masks visit fewer tiles than the dense loop.
"""

from __future__ import annotations

import pytest
import sympy

from attnc.expr import symbols as S
from attnc.frontends.lower import lower
from attnc.frontends.parser import parse
from attnc.passes.mask_bounds import (analyze, monotone, query_segments, query_tile_schedule,
                                      tile_schedule)

MASKS = {
    "causal": "n <= m",
    "window": "n <= m and m - n < 6",
    "prefix": "n <= m or n < 7",
    "chunked": "n <= m and m // 8 == n // 8",
    "sinks": "n <= m and (n < 3 or m - n < 6)",
    "natten": "n >= clamp(m - 3, 0, N - 7) and n < clamp(m - 3, 0, N - 7) + 7",
    "bidirectional": "abs(m - n) <= 4",
    "rows": "m >= 9",
    "not_equal": "n != m",
    "dilated": "n <= m and m - n < 12 and (m - n) % 3 == 0",
    "negated": "not (n > m)",
}
GRIDS = [(37, 53, 8, 4), (64, 64, 16, 16), (20, 45, 4, 8), (50, 10, 16, 4), (33, 33, 16, 32)]


def _mask(text):
    src = f"attention t {{\n  mask = {text}\n}}\n"
    return lower(parse(src), src).mask


def _brute(mask):
    fn = sympy.lambdify((S.m, S.n, S.M, S.N), mask, "math")
    return lambda m, n, M, N: bool(fn(m, n, M, N))


@pytest.mark.parametrize("name", sorted(MASKS))
def test_schedule_matches_brute_force(name):
    mask = _mask(MASKS[name])
    visible = _brute(mask)
    bounds = analyze(mask)
    for M, N, bm, bn in GRIDS:
        for i, visits in enumerate(tile_schedule(bounds.segments, M, N, bm, bn)):
            starts = [s for s, _ in visits]
            assert len(starts) == len(set(starts)), "a key tile is visited twice"
            kind = dict(visits)
            for start in range(0, N, bn):
                cells = [visible(r, c, M, N) for r in range(i * bm, min(i * bm + bm, M))
                         for c in range(start, min(start + bn, N))]
                if start not in kind:
                    assert not any(cells), f"{name}: skipped a visible tile ({M},{N},{i},{start})"
                elif not kind[start]:
                    assert all(cells) and start + bn <= N, f"{name}: tile ({i},{start}) is not full"


@pytest.mark.parametrize("name", sorted(MASKS))
def test_transposed_schedule_matches_brute_force(name):
    """The dk/dv kernel's walk: for each key tile, every query tile with a visible entry is
    visited, once, and a query tile marked full is visible for every (row, key) in it."""
    mask = _mask(MASKS[name])
    visible = _brute(mask)
    rows = query_segments(mask)
    for M, N, bm, bn in GRIDS:
        for j, visits in enumerate(query_tile_schedule(rows, M, N, bm, bn)):
            starts = [s for s, _ in visits]
            assert len(starts) == len(set(starts)), "a query tile is visited twice"
            kind = dict(visits)
            for start in range(0, M, bm):
                cells = [visible(r, c, M, N) for r in range(start, min(start + bm, M))
                         for c in range(j * bn, min(j * bn + bn, N))]
                if start not in kind:
                    assert not any(cells), f"{name}: skipped a visible tile ({M},{N},{start},{j})"
                elif not kind[start]:
                    assert all(cells) and start + bm <= M, f"{name}: tile ({start},{j}) not full"


def test_transposed_causal_prunes():
    """Causal on 64x64 with 8x8 tiles: key tile j is seen by query tiles j..7, the ones below
    the diagonal wholly."""
    plan = query_tile_schedule(query_segments(_mask("n <= m")), 64, 64, 8, 8)
    assert [[s // 8 for s, _ in v] for v in plan] == [list(range(j, 8)) for j in range(8)]
    assert sum(not masked for v in plan for _, masked in v) == 28


@pytest.mark.parametrize("name,visited,full", [
    ("causal", 36, 28),  # row tile i visits key tiles 0..i; those below the diagonal are full
    ("window", 15, 0),  # keys m-5..m: tiles i-1 and i (tile 0 alone for i = 0), none full
    ("sinks", 21, 0),  # window tiles plus tile 0 for the sinks: 1 + 2 + 6 * 3
    ("chunked", 8, 0),  # chunk = tile: only the diagonal tile, which is triangular
    ("natten", 22, 0),  # 7 keys around m, shifted at the borders: 2 + 6 * 3 + 2
    ("prefix", 36, 28)])  # the 7 prefix keys lie inside key tile 0: same tiles as causal
def test_affine_masks_prune_and_skip_mask_evaluation(name, visited, full):
    """On a 64x64 problem with 8x8 tiles (64 tiles), count visited and full tiles; the counts
    are derived by hand from the masks."""
    plan = tile_schedule(analyze(_mask(MASKS[name])).segments, 64, 64, 8, 8)
    assert sum(len(v) for v in plan) == visited
    assert sum(not masked for v in plan for _, masked in v) == full


def test_causal_bounds_are_symbolic_in_the_tile_rows():
    (seg,) = analyze(_mask("n <= m")).segments
    assert seg.lo == 0 and seg.hi == sympy.Min(S.N, S.m_hi + 1)
    assert seg.full_hi == sympy.Min(S.N, S.m_lo + 1)


def test_window_lower_bound_moves_with_the_first_row():
    (seg,) = analyze(_mask("n <= m and m - n < 6")).segments
    assert seg.lo == sympy.Max(0, S.m_lo - 5)
    assert seg.full_lo == sympy.Max(0, S.m_hi - 5)


def test_sinks_give_two_ordered_segments():
    segs = analyze(_mask(MASKS["sinks"])).segments
    assert len(segs) == 2
    assert segs[0].lo == 0 and segs[1].lo == sympy.Max(0, S.m_lo - 5)


def test_data_dependent_masks_fall_back_to_the_whole_range():
    src = "attention t {\n  input doc[b, n]\n  mask = doc[b, m] == doc[b, n] and n <= m\n}\n"
    bounds = analyze(lower(parse(src), src).mask)
    assert not bounds.exact
    (seg,) = bounds.segments
    assert seg.hi == sympy.Min(S.N, S.m_hi + 1)  # the causal part still bounds the loop
    assert seg.full_hi == 0  # but no tile can skip the document test


def test_no_mask_visits_everything_unmasked():
    plan = tile_schedule(analyze(None).segments, 40, 40, 16, 16)
    assert [[m for _, m in v] for v in plan] == [[False, False, True]] * 3


@pytest.mark.parametrize("expr,sign", [
    (S.m, 1), (-S.m, -1), (3 * S.m - S.N, 1), (sympy.Max(S.m - 4, 0), 1),
    (sympy.Min(sympy.Max(S.m - 3, 0), S.N - 7), 1), (sympy.floor(S.m / 8) * 8, 1),
    (S.N, 0), (S.m * S.m, None), (sympy.Mod(S.m, 3), None), (sympy.Max(S.m - 5, 5 - S.m), None)])
def test_monotone(expr, sign):
    assert monotone(expr, S.m) == sign
