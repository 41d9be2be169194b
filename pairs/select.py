"""Choose DPO pairs from a pool's metadata: plain numpy and Python over `pairs.pool.Pool`, no I/O.

A pair is (chosen, rejected) from one group (same problem, model, adapter and prompt): chosen has outcome PASS,
rejected a failure in `PairsConfig.rejectable`. The selection:

1. keeps groups whose pass rate (PASS / non-INFRA rows) is inside the window and that have both sides;
2. splits `num_pairs` over the failure categories present (uniform, proportional or weights; largest remainder);
3. fills the quotas greedily, one pair at a time to the category furthest below its quota. Each category walks
   its rejected rows round-robin over groups (every group's first failure before any group's second), in a seeded
   order of its own; a rejected row is paired with the least-used compatible PASS of its group (length ratio in bounds,
   reuse left, not already paired with it), while its problem is under `max_pairs_per_problem`;
4. when a category runs dry its shortfall goes to the others, by weight, and the report says so.

Every constraint only tightens as pairs are added, so a rejected row that finds no partner never will: when a
category is short, not one more pair of it fits the final selection (the greedy result is maximal per category,
not a maximum b-matching). Keys are hashes of row content and the seed, so the result does not depend on how gen
sharded the pool or on the order of the inputs.

Dedup is lazy (texts are the expensive column): `select_with_dedup` selects, reads the texts of just the groups
the selection touched, drops duplicates there (exact or whitespace-only; a text seen with two verdicts is dropped
entirely), and selects again until the selection touches only checked groups.
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from pairs.config import PairsConfig, category_of
from pairs.pool import INFRA_ERROR, OUTCOMES, PASS, PHASE_NAMES, Pool, hash64, mix64
from tasks.text import coarse_key


def apportion(total: int, weights: dict[str, float], seed: int = 0) -> dict[str, int]:
    """Split `total` into integers proportional to `weights` (largest remainder; ties broken by a seeded hash,
    so no category wins every tie by its name). Zero weights get zero."""
    live = {k: w for k, w in weights.items() if w > 0}
    out = {k: 0 for k in weights}
    if total <= 0 or not live:
        return out
    s = sum(live.values())
    exact = {k: total * w / s for k, w in live.items()}
    for k, x in exact.items():
        out[k] = int(x)
    left = total - sum(out.values())
    order = sorted(live, key=lambda k: (-(exact[k] - int(exact[k])), hash64(seed, "tie", k)))
    for k in order[:left]:
        out[k] += 1
    if sum(out.values()) != total:
        raise RuntimeError(f"apportion({total}, {weights}) -> {out}: shares sum to {sum(out.values())}")
    return out


_WS_RUN = re.compile(r"[ \t\r\x0b\x0c]+")


def normalize_whitespace(text: str) -> str:
    """Whitespace-insensitive form for dedup, keeping what Python gives meaning to (line breaks and leading
    indentation): trailing whitespace and blank lines dropped, CRLF -> LF, runs of spaces/tabs inside a line -> one
    space. Only ASCII whitespace counts (the set tasks.text.coarse_key drops)."""
    out = []
    for line in text.split("\n"):
        line = line.rstrip(" \t\r\x0b\x0c")
        if line:
            body = line.lstrip(" \t")
            out.append(line[: len(line) - len(body)] + _WS_RUN.sub(" ", body))
    return "\n".join(out)


@dataclass
class Plan:
    """What the selection needs per row and per group; depends on the config and seed, not on dedup."""

    cfg: PairsConfig
    categories: list[str]
    cat: np.ndarray  # int16 per row: index into categories, -1 when not a usable rejected row
    is_pass: np.ndarray  # bool per row
    scored: np.ndarray  # bool per row: not INFRA_ERROR
    n_pass: np.ndarray  # int per group
    n_scored: np.ndarray  # int per group
    pass_rate: np.ndarray  # float per group (nan when no scored row)
    in_window: np.ndarray  # bool per group
    chosen_order: np.ndarray  # PASS rows of in-window groups, by (group, seeded key)
    walk_order: np.ndarray  # usable rejected rows of in-window groups, by (category, the order they are tried in)
    tokens: np.ndarray  # float64 per row: max(completion_tokens, 1)


def prepare(pool: Pool, cfg: PairsConfig) -> Plan:
    categories = cfg.categories
    lookup = np.full((len(OUTCOMES), len(PHASE_NAMES)), -1, dtype=np.int16)
    for o in cfg.rejectable:
        for j, ph in enumerate(PHASE_NAMES):
            lookup[OUTCOMES.index(o), j] = categories.index(category_of(o, ph, cfg.category_key))
    scored = pool.outcome != INFRA_ERROR
    is_pass = pool.outcome == PASS
    n_groups = len(pool.groups)
    n_pass = np.bincount(pool.group[is_pass], minlength=n_groups)
    n_scored = np.bincount(pool.group[scored], minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(n_scored > 0, n_pass / np.maximum(n_scored, 1), np.nan)
    in_window = (n_scored > 0) & (rate >= cfg.pass_rate_min) & (rate <= cfg.pass_rate_max)
    seed_mix = mix64(np.array([hash64("pairs", cfg.seed)], dtype=np.uint64))[0]
    cat = lookup[pool.outcome, pool.phase]
    key = mix64(pool.ident ^ seed_mix)
    group_priority = mix64(pool.group_hash ^ mix64(np.array([seed_mix + np.uint64(1)]))[0])

    # PASS rows of each group, in seeded order
    chosen = np.flatnonzero(is_pass & in_window[pool.group])
    chosen = chosen[np.lexsort((key[chosen], pool.group[chosen]))]
    # each category's rejected rows: round-robin over groups (every group's first failure, in seeded order, before
    # any group's second), groups in the category's own seeded order -- so categories spread over problems instead
    # of all starting at the same few (which would fill their caps and cover fewer problems)
    rej = np.flatnonzero((cat >= 0) & in_window[pool.group])
    rc, rg = cat[rej], pool.group[rej]
    o = np.lexsort((key[rej], rg, rc))
    rej, rc, rg = rej[o], rc[o], rg[o]
    new_run = np.ones(len(rej), dtype=bool)
    new_run[1:] = (rc[1:] != rc[:-1]) | (rg[1:] != rg[:-1])
    rank = np.arange(len(rej)) - np.maximum.accumulate(np.where(new_run, np.arange(len(rej)), 0))
    cat_salt = mix64(np.array([hash64("category", name) for name in categories], dtype=np.uint64))
    walk = rej[np.lexsort((key[rej], mix64(group_priority[rg] ^ cat_salt[rc]), rank, rc))]
    return Plan(
        cfg=cfg,
        categories=categories,
        cat=cat,
        is_pass=is_pass,
        scored=scored,
        n_pass=n_pass,
        n_scored=n_scored,
        pass_rate=rate,
        in_window=in_window,
        chosen_order=chosen,
        walk_order=walk,
        tokens=np.maximum(pool.tokens, 1).astype(np.float64),
    )


@dataclass
class Selection:
    pairs: list[tuple[int, int, int]]  # (chosen row, rejected row, category index), in selection order
    categories: list[str]
    pool_counts: dict[str, int]  # usable rejected rows per category (eligible groups, some partner in ratio)
    weights: dict[str, float]
    asked: dict[str, int]
    got: dict[str, int]
    exhausted: list[str]
    notes: list[str]
    eligible_groups: np.ndarray  # bool per group: in window, >=1 PASS and >=1 usable failure
    stats: dict[str, int] = field(default_factory=dict)
    # the rows each category would try next: if dedup drops some of the selected rows, their replacements
    # likely come from these, so their groups are checked in the same round
    next_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def eligible(pool: Pool, plan: Plan, alive: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(chosen rows, rejected rows, eligible-group mask) among the `alive` rows, before length-ratio checks; rows
    in the orders of `plan.chosen_order` and `plan.walk_order`."""
    chosen = plan.chosen_order[alive[plan.chosen_order]]
    rej = plan.walk_order[alive[plan.walk_order]]
    n = len(pool.groups)
    ok = (np.bincount(pool.group[chosen], minlength=n) > 0) & (np.bincount(pool.group[rej], minlength=n) > 0)
    return chosen[ok[pool.group[chosen]]], rej[ok[pool.group[rej]]], ok


def select(pool: Pool, plan: Plan, alive: np.ndarray) -> Selection:
    """One greedy selection over the rows still `alive` (see the module docstring)."""
    cfg = plan.cfg
    lo_ratio, hi_ratio = cfg.length_ratio_min, cfg.length_ratio_max
    cap, reuse = cfg.max_pairs_per_problem, cfg.max_reuse
    chosen_rows, rej_rows, ok_groups = eligible(pool, plan, alive)
    tok = plan.tokens
    cg = pool.group[chosen_rows].astype(np.int64)

    # drop rejected rows with no PASS of their group inside the length-ratio bounds (never pairable): one
    # searchsorted over (group, tokens); bounds widened a little so float rounding never drops a pairable row
    ct = pool.tokens[chosen_rows].clip(1).astype(np.int64)
    comp = np.sort((cg << 32) + ct)
    rt = tok[rej_rows]
    rgk = pool.group[rej_rows].astype(np.int64) << 32
    lo = np.floor(rt * lo_ratio * (1 - 1e-9)).clip(0, 2**32 - 1).astype(np.int64)
    hi = np.ceil(rt * hi_ratio * (1 + 1e-9)).clip(0, 2**32 - 1).astype(np.int64)
    in_ratio = np.searchsorted(comp, rgk + hi, side="right") > np.searchsorted(comp, rgk + lo, side="left")
    ratio_dropped = int((~in_ratio).sum())
    rej_rows = rej_rows[in_ratio]

    names = plan.categories
    counts = np.bincount(plan.cat[rej_rows], minlength=len(names))
    present = [i for i in range(len(names)) if counts[i] > 0]
    if cfg.balance == "uniform":
        weights = {names[i]: 1.0 for i in present}
    elif cfg.balance == "proportional":
        weights = {names[i]: float(counts[i]) for i in present}
    else:
        weights = {names[i]: float(cfg.weights.get(names[i], 1.0)) for i in present}
    asked = apportion(cfg.num_pairs, weights, cfg.seed)

    bounds = np.searchsorted(plan.cat[rej_rows], np.arange(len(names) + 1))  # walk_order is by category first
    walk = {i: rej_rows[bounds[i]:bounds[i + 1]].tolist() for i in present}

    starts = np.searchsorted(cg, np.arange(len(pool.groups) + 1))
    group_state: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, int]]] = {}
    group_of, problem_of = pool.group, pool.group_problem
    per_problem = np.zeros(len(pool.problems), dtype=np.int64)
    used: dict[int, int] = {}
    partners: dict[int, list[int]] = {}
    dead = bytearray(len(pool))
    pairs: list[tuple[int, int, int]] = []

    def take(r: int, c: int) -> bool:
        g = int(group_of[r])
        p = problem_of[g]
        if per_problem[p] >= cap:
            return False
        st = group_state.get(g)
        if st is None:
            rows = chosen_rows[starts[g]:starts[g + 1]]
            st = group_state[g] = (rows, tok[rows], np.zeros(len(rows), dtype=np.int64),
                                   {int(x): j for j, x in enumerate(rows)})
        rows, ctok, uses, pos = st
        ratio = ctok / tok[r]
        ok = (ratio >= lo_ratio) & (ratio <= hi_ratio) & (uses < reuse)
        for x in partners.get(r, ()):
            ok[pos[x]] = False
        cand = np.flatnonzero(ok)
        if len(cand) == 0:
            return False
        j = cand[np.argmin(uses[cand])]  # least used; ties: seeded order
        uses[j] += 1
        chosen = int(rows[j])
        used[chosen] = used.get(chosen, 0) + 1
        used[r] = used.get(r, 0) + 1
        partners.setdefault(r, []).append(chosen)
        per_problem[p] += 1
        pairs.append((chosen, r, c))
        return True

    cursor = {i: [0, 0] for i in present}  # category -> [reuse pass, position]

    def next_pair(c: int) -> bool:
        cur, rows = cursor[c], walk[c]
        while cur[0] < reuse:
            while cur[1] < len(rows):
                r = rows[cur[1]]
                cur[1] += 1
                if dead[r]:
                    continue
                if take(r, c):  # in reuse pass k, a live rejected row has taken exactly k pairs
                    if used[r] >= reuse:
                        dead[r] = 1
                    return True
                dead[r] = 1  # constraints only tighten: it will never fit
            cur[0] += 1
            cur[1] = 0
        return False

    index = {names[i]: i for i in present}
    quota = dict(asked)
    got = {k: 0 for k in weights}
    active = [k for k in weights if weights[k] > 0]
    exhausted: list[str] = []
    total = 0
    heap = [(0.0, index[k], k) for k in active if quota[k] > 0]
    heapq.heapify(heap)
    while total < cfg.num_pairs:
        if not heap:
            if not active:
                break
            extra = apportion(cfg.num_pairs - total, {k: weights[k] for k in active}, cfg.seed + total)
            for k, e in extra.items():
                quota[k] += e
            heap = [(got[k] / quota[k], index[k], k) for k in active if got[k] < quota[k]]
            heapq.heapify(heap)
            continue
        _, _, k = heapq.heappop(heap)
        if next_pair(index[k]):
            got[k] += 1
            total += 1
            if got[k] < quota[k]:
                heapq.heappush(heap, (got[k] / quota[k], index[k], k))
        else:
            active.remove(k)
            exhausted.append(k)

    notes = []
    for k in exhausted:
        if got[k] < asked[k]:
            notes.append(f"{k}: asked {asked[k]}, got {got[k]}: no further {k} pair fits the window, caps, "
                         f"length ratio and reuse limits ({int(counts[index[k]])} usable rejected rows)")
    for k in weights:
        if got[k] > asked[k]:
            notes.append(f"{k}: got {got[k]}, {got[k] - asked[k]} over its quota of {asked[k]}, filling the shortfall")
    if cfg.balance == "weights":
        for k, w in sorted(cfg.weights.items()):
            if w > 0 and k not in weights:
                notes.append(f"{k}: weighted {w:g} but absent from the eligible pool; its share went to the others")
    if total < cfg.num_pairs:
        notes.append(f"asked for {cfg.num_pairs} pairs; the pool supports {total} under these constraints")
    return Selection(
        pairs=pairs,
        categories=names,
        pool_counts={names[i]: int(counts[i]) for i in present},
        weights=weights,
        asked=asked,
        got=got,
        exhausted=exhausted,
        notes=notes,
        eligible_groups=ok_groups,
        stats={"rejected_rows_no_length_match": ratio_dropped},
        next_rows=np.array([r for i in present if got[names[i]] > 0
                            for r in walk[i][cursor[i][1]:cursor[i][1] + 5 + got[names[i]] // 10]], dtype=np.int64),
    )


def find_duplicates(
    group: np.ndarray, ident: np.ndarray, verdict: np.ndarray, texts: list[str]
) -> tuple[np.ndarray, dict[str, int]]:
    """Rows (of one or more groups) to drop so that no two kept rows of a group share a whitespace-normalised
    text. A text seen with two verdicts (outcome, phase) in one group is not reproducible: all its rows go.
    The kept copy is the one with the smallest identity hash (independent of layout and seed)."""
    coarse: dict[tuple[int, bytes], list[int]] = {}
    for i, (g, t) in enumerate(zip(group.tolist(), texts)):
        coarse.setdefault((g, coarse_key(t)), []).append(i)
    drop = np.zeros(len(texts), dtype=bool)
    counts = {"exact_duplicates": 0, "whitespace_duplicates": 0, "inconsistent_verdicts": 0}
    for candidates in coarse.values():
        if len(candidates) == 1:
            continue
        clusters: dict[str, list[int]] = {}
        for i in candidates:
            clusters.setdefault(normalize_whitespace(texts[i]), []).append(i)
        for members in clusters.values():
            if len(members) == 1:
                continue
            if len({int(verdict[i]) for i in members}) > 1:
                drop[members] = True
                counts["inconsistent_verdicts"] += len(members)
                continue
            keep = min(members, key=lambda i: int(ident[i]))
            drop[[i for i in members if i != keep]] = True
            distinct = len({texts[i] for i in members})
            counts["exact_duplicates"] += len(members) - distinct
            counts["whitespace_duplicates"] += distinct - 1
    return drop, counts


def select_with_dedup(
    pool: Pool, plan: Plan, fetch_texts: Callable[[np.ndarray], list[str]]
) -> tuple[Selection, dict[str, int]]:
    """`select`, then dedup the groups it touched, until it touches only deduped groups (see module docstring)."""
    alive = np.ones(len(pool), dtype=bool)
    checked = np.zeros(len(pool.groups), dtype=bool)
    stats = {"exact_duplicates": 0, "whitespace_duplicates": 0, "inconsistent_verdicts": 0,
             "groups_checked": 0, "texts_read": 0, "rounds": 0}
    while True:
        sel = select(pool, plan, alive)
        stats["rounds"] += 1
        if not plan.cfg.dedup or not sel.pairs:
            return sel, stats
        touched = np.unique(pool.group[[r for _, r, _ in sel.pairs]])
        if not checked[touched].all():  # a round reads texts anyway: read those of the likely next groups too
            touched = np.union1d(touched, pool.group[sel.next_rows])
        new = touched[~checked[touched]]
        if len(new) == 0:
            return sel, stats
        rows = np.flatnonzero(np.isin(pool.group, new) & plan.scored)
        texts = fetch_texts(rows)
        verdict = pool.outcome[rows].astype(np.int64) * 16 + pool.phase[rows]
        drop, counts = find_duplicates(pool.group[rows], pool.ident[rows], verdict, texts)
        alive[rows[drop]] = False
        checked[new] = True
        for k, v in counts.items():
            stats[k] += v
        stats["groups_checked"] += len(new)
        stats["texts_read"] += len(rows)
