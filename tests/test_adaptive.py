"""gen.policy=adaptive: the stopping rule (pure), its plan of rounds, and runs on the tiny coder in real vLLM."""

from __future__ import annotations

import json
import math
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

from gen.config import ExecutionConfig, GenConfig, SamplingConfig
from gen.plan import make_plan, sample_seed
import gen.policy as gen_policy
from gen.policy import AdaptivePlan, AdaptivePolicy, binomial_tail, earliest_stop, replay, stop_reason
from gen.shards import ShardStore


def _policy(budget=64, first_round=1, round_size=1, lo=0.05, hi=0.95, c=0.5) -> AdaptivePolicy:
    return AdaptivePolicy(budget, first_round, round_size, lo, hi, c)


# ---- the stopping rule ---------------------------------------------------------------------------------------

def test_binomial_tail_matches_the_exact_sum():
    for m, p in [(1, 0.5), (7, 0.05), (20, 0.95), (33, 0.3)]:
        for lo in range(m + 1):
            for hi in (lo, m):
                exact = sum(math.comb(m, k) * p**k * (1 - p) ** (m - k) for k in range(lo, hi + 1))
                assert binomial_tail(m, p, lo, hi) == pytest.approx(exact, rel=1e-9, abs=1e-300), (m, p, lo, hi)
    assert binomial_tail(5, 1.0, 5, 5) == 1.0 and binomial_tail(5, 1.0, 0, 4) == 0.0
    assert binomial_tail(5, 0.0, 0, 0) == 1.0 and binomial_tail(5, 0.0, 1, 5) == 0.0
    assert 0.0 < binomial_tail(100_000, 0.5, 50_000, 100_000) < 1.0  # no overflow at large m


@pytest.mark.parametrize("c", [0.2, 0.5, 0.8, 0.9])
def test_a_unanimous_problem_stops_where_the_bound_leaves_the_window(c):
    """All-pass: stop at the first m with 0.95**m < 1 - c (the one-sided Clopper-Pearson lower bound at
    confidence c is then above 0.95); all-fail mirrors it at 0.05."""
    want = next(m for m in range(1, 1000) if 0.95**m < 1 - c)  # 5, 14, 32, 45
    policy = _policy(c=c)
    assert replay(policy, ["PASS"] * 64) == want
    assert replay(policy, ["ASSERTION_FAIL"] * 64) == want
    assert stop_reason(policy, want, want, want) == "too_easy"
    assert stop_reason(policy, want - 1, want - 1, want - 1) is None
    assert stop_reason(policy, want, 0, want) == "too_hard"


def test_stops_fall_on_round_boundaries():
    # c=0.2 would stop an all-pass problem after 5 samples; rounds of 4 make that 8
    policy = _policy(budget=16, first_round=4, round_size=4, c=0.2)
    assert replay(policy, ["PASS"] * 16) == 8
    assert replay(_policy(budget=16, first_round=4, round_size=4, c=0.1), ["PASS"] * 16) == 4  # 0.95**3 < 0.9
    assert replay(_policy(budget=10, first_round=4, round_size=4, c=0.99), ["PASS"] * 10) == 10  # last round: 2


def test_a_problem_with_passes_and_fails_in_the_window_gets_its_whole_budget():
    policy = _policy(budget=40, first_round=4, round_size=4, c=0.9)
    assert replay(policy, ["PASS", "NAME_ERROR"] * 20) == 40
    assert replay(policy, ["PASS"] * 3 + ["TIMEOUT"] + ["PASS"] * 36) == 40  # 1 fail in 40: not sure it is > 0.95


def test_a_problem_far_outside_the_window_stops_even_with_both_outcomes():
    outcomes = ["ASSERTION_FAIL"] + ["PASS"] * 999
    drawn = replay(_policy(budget=1000, c=0.9), outcomes)
    assert drawn < 1000
    assert stop_reason(_policy(budget=1000, c=0.9), drawn, drawn - 1, drawn) == "too_easy"


def test_infra_errors_are_no_evidence():
    """Our faults say nothing about the problem: they spend budget but never stop it."""
    assert replay(_policy(budget=30), ["INFRA_ERROR"] * 30) == 30
    assert replay(_policy(budget=30, c=0.2), ["INFRA_ERROR", "PASS"] * 15) == 10  # 5 passes of 5 scored


def test_a_window_of_everything_never_stops_early():
    assert replay(_policy(budget=50, lo=0.0, hi=1.0, c=0.99), ["PASS"] * 50) == 50
    assert replay(_policy(budget=50, lo=0.0, hi=1.0, c=0.99), ["NO_CODE"] * 50) == 50


def test_a_problem_with_enough_distinct_texts_per_side_stops_inside_the_window():
    """gen.enough_per_side=k: a problem whose pass rate is in the window and that holds k distinct passing and k
    distinct rejectable failing texts stops at the end of that round ("enough"). No side: NO_CODE (or whatever
    enough_exclude names), INFRA_ERROR, a repeated text, a text seen with two verdicts. Outside the window it does
    not stop for enough (pairs would drop the problem); k=0 never stops this way."""
    def pol(k=2, lo=0.05, hi=0.95, exclude=("NO_CODE",), c=0.2, first=4):
        return AdaptivePolicy(16, first, 4, lo, hi, c, k, exclude)

    mixed = ["PASS", "ASSERTION_FAIL"] * 8
    assert replay(pol(), mixed) == 4
    assert replay(pol(k=3), mixed) == 8  # 2 + 2 after round 1
    assert replay(pol(k=0), mixed) == 16  # off: the window only
    wide = dict(lo=0.0, hi=1.0)  # no window stop, to see the sides alone
    for filler in ("NO_CODE", "INFRA_ERROR"):
        assert replay(pol(**wide), ["PASS", filler] * 8) == 16
    assert replay(pol(**wide, exclude=("NO_CODE", "TIMEOUT")), ["PASS", "TIMEOUT"] * 8) == 16
    assert replay(pol(**wide, exclude=()), ["PASS", "NO_CODE"] * 8) == 4
    # distinct texts: the same passing text 8 times is one pass for pairs' dedup (whitespace does not count)
    same = [b"a"] * 16
    keys = [gen_policy.text_key("return  x\n" if i % 4 == 0 else "return x") if i % 2 == 0 else bytes([i])
            for i in range(16)]
    assert replay(pol(**wide), mixed, keys) == 16  # one distinct passing text (all "return x" up to whitespace)
    assert replay(pol(**wide, k=1), mixed, keys) == 4
    two_verdicts = [b"t", b"t", b"u", b"v"] * 4  # "t" both PASS and failing: no side; u passes, v fails
    assert replay(pol(**wide, k=1), mixed, two_verdicts) == 4  # u, v
    assert replay(pol(**wide, k=2), mixed, two_verdicts) == 16
    assert replay(pol(**wide, k=1), ["PASS", "VALUE_ERROR"] * 8, same) == 16
    # the window: 3 of 4 pass with k=1 is enough only if 0.75 is inside it
    lop = ["PASS", "PASS", "PASS", "TYPE_ERROR"] * 4
    assert replay(pol(k=1, lo=0.3, hi=0.8, c=0.5), lop) == 4
    assert replay(pol(k=1, lo=0.3, hi=0.7, c=0.5), lop) == 12  # not enough at 4; at 12 the window test stops it
    # NO_CODE counts in the pass rate (as in pairs) though not as a side: 2 of 8 passing is outside 0.3..0.7
    nc = ["PASS", "ASSERTION_FAIL", "PASS", "ASSERTION_FAIL"] + ["NO_CODE"] * 4
    assert replay(pol(k=2, lo=0.3, hi=0.7, c=0.5, first=8), nc * 2) == 12  # not at 8; at 12: 4 of 12 pass
    # a problem the window test stops is labelled by it, not "enough"
    assert stop_reason(AdaptivePolicy(64, 4, 4, 0.05, 0.95, 0.5, 1), 60, 59, 60, 59, 1) == "too_easy"
    assert stop_reason(pol(k=2), 4, 2, 4, 2, 2) == "enough" and stop_reason(pol(k=2), 4, 2, 4, 2, 1) is None

    plan = AdaptivePlan(pol(), ["a", "b"], 2, 0)
    with pytest.raises(ValueError, match="needs each row's completion"):
        plan.observe(["a"], [0], ["PASS"])
    texts = [f"t{i}" for i in range(8)]
    plan.observe(["a"] * 4 + ["b"] * 4, [0, 1, 2, 3] * 2, ["PASS", "NAME_ERROR"] * 2 + ["PASS", "NO_CODE"] * 2, texts)
    assert plan.stopped() == {"a": "enough"}
    assert [r.problem_id for r in plan.next_unit(0).requests] == ["b"]


def test_a_plan_with_enough_per_side_rebuilt_from_rows_decides_the_same():
    """Resume under enough_per_side: tallies rebuilt from the shards' rows (texts included, any order) stop the
    same problems for the same reasons as the live plan."""
    policy = AdaptivePolicy(12, 4, 4, 0.05, 0.95, 0.2, 2)
    ids = [f"p{i}" for i in range(4)]
    live = AdaptivePlan(policy, ids, 2, 0)
    rows = []
    for u in live.open_units():
        for r in u.requests:
            for i in r.sample_indices():
                o = "PASS" if i % 2 else "ASSERTION_FAIL"
                text = "same" if r.problem_id == "p1" and o == "PASS" else f"{r.problem_id}-{i}"  # p1: 1 distinct
                rows.append((r.problem_id, i, o, text))
    live.observe(*zip(*rows))
    rebuilt = AdaptivePlan(policy, ids, 2, 0)
    rebuilt.observe(*zip(*reversed(rows)))
    assert rebuilt.stopped() == live.stopped() == {"p0": "enough", "p2": "enough", "p3": "enough"}
    assert rebuilt.open_units() == live.open_units()


def test_pool_value_counts_at_most_cap_pairs_per_problem():
    """pairs.max_pairs_per_problem bounds what a problem gives: with cap 2, a 5-pass/5-fail problem is worth 2."""
    from gen.run import pool_value

    pids = ["a"] * 10 + ["b"] * 3 + ["c"] * 4
    outs = ["PASS", "VALUE_ERROR"] * 5 + ["PASS", "PASS", "NAME_ERROR"] + ["PASS"] * 4  # c: all pass, unusable
    assert pool_value(pids, outs, [1] * 17)["usable_pairs"] == 5 + 1
    capped = pool_value(pids, outs, [1] * 17, cap=2)
    assert capped["usable_pairs"] == 2 + 1 and capped["usable_problems"] == 2
    assert capped["tokens_per_usable_pair"] == 17 / 3


def test_a_setting_where_no_problem_can_stop_early_is_flagged():
    """The trap experiment-cpu.yaml fell into: n=16 in rounds of 8 at c=0.5 stops nothing (an all-pass problem
    needs 14 samples, so it gets 16), adaptive spent as uniform. The config says so; c=0.3 stops after round 1."""
    import warnings

    trap = dict(policy="adaptive", n=16, first_round=8, round_size=8, stop_confidence=0.5)
    assert earliest_stop(_policy(budget=16, first_round=8, round_size=8, c=0.5)) is None
    with pytest.warns(RuntimeWarning, match=r"stop no problem before its budget.*stop_confidence=0.5"):
        GenConfig(**trap)
    fixed = {**trap, "stop_confidence": 0.3}
    assert earliest_stop(AdaptivePolicy.of(GenConfig(**fixed))) == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GenConfig(**fixed)
        GenConfig(n=16, first_round=8, round_size=8, stop_confidence=0.5)  # uniform: nothing to stop
    assert earliest_stop(_policy(budget=16, first_round=4, round_size=4, c=0.2)) == 8
    # enough_per_side stops only mixed problems: the unanimous ones, which the warning is about, still get all 16
    with pytest.warns(RuntimeWarning, match=r"stop no problem before its budget"):
        GenConfig(**trap, enough_per_side=4)


# ---- the plan of rounds --------------------------------------------------------------------------------------

def _observe(plan: AdaptivePlan, unit, outcome_of):
    rows = [(r.problem_id, i, outcome_of(r.problem_id, i)) for r in unit.requests for i in r.sample_indices()]
    plan.observe(*zip(*rows))
    return rows


def test_rounds_keep_the_uniform_plans_unit_names_and_seeds():
    """A block's round is the uniform plan's unit of that (problem block, sample block), less the problems that
    stopped: the same id, and each sample index with the seed it has under uniform."""
    ids = [f"p{i}" for i in range(5)]
    policy = _policy(budget=12, first_round=4, round_size=4, lo=0.3, hi=0.7, c=0.5)
    plan = AdaptivePlan(policy, ids, problems_per_unit=2, run_seed=7)
    uniform = {u.unit_id: u for u in make_plan(ids, 12, 7, problems_per_unit=2, samples_per_unit=4)}
    first = plan.open_units()
    assert [u.unit_id for u in first] == ["p000000-s0000000", "p000002-s0000000", "p000004-s0000000"]
    assert all(u == uniform[u.unit_id] for u in first)
    easy = {"p0", "p3"}  # these pass everything: they stop after the first round; the rest alternate

    def outcome(pid, i):
        return "PASS" if pid in easy or i % 2 else "SYNTAX_ERROR"

    seen = []
    queue = list(first)
    while queue:
        u = queue.pop(0)
        seen.append(u)
        _observe(plan, u, outcome)
        nxt = plan.next_unit(plan.block_of_unit(u))
        if nxt is not None:
            queue.append(nxt)
    for u in seen:
        want = uniform[u.unit_id]
        assert u.requests == tuple(r for r in want.requests if r.problem_id in {q.problem_id for q in u.requests})
        for r in u.requests:
            assert r.seed == sample_seed(7, r.problem_id, r.start)
    assert plan.samples_per_problem() == {"p0": 4, "p1": 12, "p2": 12, "p3": 4, "p4": 12}
    assert plan.stopped() == {"p0": "too_easy", "p1": "budget", "p2": "budget", "p3": "too_easy", "p4": "budget"}
    assert plan.open_units() == [] and plan.planned_samples() == 44


def test_a_plan_rebuilt_from_recorded_rows_makes_the_same_decisions():
    """Resume: tallies rebuilt from the shards (in any order) give the same next rounds as the live plan."""
    ids = [f"p{i}" for i in range(4)]
    policy = _policy(budget=12, first_round=4, round_size=4, lo=0.3, hi=0.7, c=0.5)
    live = AdaptivePlan(policy, ids, 2, 0)
    rows = []
    for u in live.open_units():
        rows += _observe(live, u, lambda pid, i: "PASS" if pid == "p1" else ("PASS" if i % 2 else "NO_CODE"))
    rebuilt = AdaptivePlan(policy, ids, 2, 0)
    rebuilt.observe(*zip(*reversed(rows)))
    assert rebuilt.open_units() == live.open_units()
    (b0, b1) = live.open_units()
    assert [r.problem_id for r in b0.requests] == ["p0"] and b0.unit_id == "p000000-s0000004"
    assert [r.problem_id for r in b1.requests] == ["p2", "p3"]
    assert live.planned_samples() == 4 + 12 * 3


# ---- config --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("values,msg", [
    ({"policy": "greedy"}, "gen.policy must be one of"),
    ({"policy": "adaptive", "n": 0}, r"gen.n must be > 0, got 0"),
    ({"policy": "adaptive", "n": -4}, r"gen.n must be > 0, got -4"),
    ({"policy": "adaptive", "first_round": 0}, r"gen.first_round must be > 0, got 0"),
    ({"policy": "adaptive", "round_size": -1}, r"gen.round_size must be > 0, got -1"),
    ({"policy": "adaptive", "n": 8, "first_round": 9}, r"gen.first_round=9 is above the budget gen.n=8"),
    ({"policy": "adaptive", "n": 8, "first_round": 4, "round_size": 16},
     r"gen.round_size=16 is above the budget gen.n=8"),
    ({"policy": "adaptive", "stop_confidence": 0.0}, r"gen.stop_confidence must be in \(0, 1\), got 0.0"),
    ({"policy": "adaptive", "stop_confidence": 1.0}, r"gen.stop_confidence must be in \(0, 1\), got 1.0"),
    ({"policy": "adaptive", "stop_confidence": 1.5}, r"gen.stop_confidence must be in \(0, 1\), got 1.5"),
    ({"policy": "adaptive", "pass_rate_min": 0.9, "pass_rate_max": 0.1}, r"gen.pass_rate_min/pass_rate_max"),
    ({"policy": "adaptive", "samples_per_unit": 4}, r"gen.samples_per_unit=4 is for policy=uniform"),
    ({"policy": "adaptive", "execution": {"execute": False}}, r"needs gen.execution.execute=true"),
    ({"policy": "adaptive", "enough_per_side": -1}, r"gen.enough_per_side must be >= 0 \(0 = off\), got -1"),
    ({"enough_per_side": 4}, r"gen.enough_per_side=4 needs gen.policy=adaptive"),
    ({"policy": "adaptive", "enough_exclude": ["NOCODE"]}, r"gen.enough_exclude: unknown outcome\(s\) \['NOCODE'\]"),
])
def test_config_rejects_bad_adaptive_values(values, msg):
    from pairloop.config import build_config

    with pytest.raises(ValueError, match=msg):
        build_config(GenConfig, values, "gen")


def test_uniform_ignores_the_round_sizes():
    """Rounds belong to adaptive: n=4 with the default first_round=8 is a valid uniform run."""
    assert GenConfig(n=4).first_round > 4


def test_adaptive_settings_are_in_the_run_identity_and_uniforms_identity_is_unchanged(tiny_model, toy_problems,
                                                                                     tmp_path):
    from gen.engine import EngineConfig
    from gen.run import prepare_run

    engine = EngineConfig(model=tiny_model, max_model_len=512)
    base = dict(out=str(tmp_path / "x"), problems=toy_problems, n=8)
    uniform = prepare_run(GenConfig(**base), engine, tiny_model)
    assert "policy" not in uniform.identity  # so a uniform run resumes into folders written before policies
    ids = {uniform.run_id}
    for change in [{}, {"first_round": 4}, {"round_size": 4}, {"pass_rate_min": 0.1}, {"pass_rate_max": 0.9},
                   {"stop_confidence": 0.8}, {"enough_per_side": 4}]:
        spec = prepare_run(GenConfig(**base, policy="adaptive", **change), engine, tiny_model)
        assert spec.identity["policy"]["name"] == "adaptive"
        # off, it is not in the identity: adaptive runs made before the setting existed resume
        assert ("enough_per_side" in spec.identity["policy"]) == bool(change.get("enough_per_side"))
        ids.add(spec.run_id)
    assert len(ids) == 8


# ---- real engines: the tiny coder ----------------------------------------------------------------------------

IMPOSSIBLE = {"task_id": "toy/impossible", "prompt": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n",
              "entry_point": "add", "test": "def check(candidate):\n    assert candidate(1, 2) == 4\n",
              "canonical_solution": "    return a + b\n"}  # no answer passes: every sample fails


@pytest.fixture(scope="module")
def problems_with_an_impossible_one(tmp_path_factory, toy_problems) -> str:
    path = tmp_path_factory.mktemp("adaptive") / "problems.jsonl"
    path.write_text(Path(toy_problems).read_text() + json.dumps(IMPOSSIBLE) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def coder(ray_local, tiny_coder):
    """An engine on the tiny coder: at temperature 1 its samples mix passes and fails, greedily it passes."""
    from gen.engine import EngineConfig, EnginePool

    # float32: the tiny coder's standard is checked in float32; `auto` would pick bf16 on a bf16 CPU
    cfg = EngineConfig(model=tiny_coder, dtype="float32", max_model_len=512, cpu_kv_cache_gib=0.25,
                       max_num_seqs=64)
    pool = EnginePool(cfg, tiny_coder, use_gpu=False)
    yield cfg, pool
    pool.shutdown()


def _gen(out, problems, **kw) -> GenConfig:
    sampling = SamplingConfig(max_tokens=64, temperature=kw.pop("temperature", 1.0), top_p=1.0)
    return GenConfig(out=str(out), problems=problems, progress=False, problems_per_unit=3, sampling=sampling,
                     execution=ExecutionConfig(workers=1, cpu_timeout_s=2.0), **kw)


ADAPTIVE = dict(policy="adaptive", n=8, first_round=2, round_size=2, pass_rate_min=0.3, pass_rate_max=0.7,
                stop_confidence=0.5)  # a unanimous problem stops after 2 samples (0.7**2 < 0.5)


def _rows(out) -> dict[tuple[str, int], dict]:
    t = ShardStore(str(out)).read_table(columns=["problem_id", "sample_index", "seed", "completion", "outcome",
                                                 "unit_id"])
    return {(r["problem_id"], r["sample_index"]): r for r in t.to_pylist()}


@pytest.fixture(scope="module")
def uniform_and_adaptive(tmp_path_factory, coder, problems_with_an_impossible_one):
    from gen.run import run_generation

    engine_cfg, pool = coder
    tmp = tmp_path_factory.mktemp("runs")
    uni = run_generation(_gen(tmp / "uniform", problems_with_an_impossible_one, n=8, samples_per_unit=2),
                         engine_cfg, pool=pool)
    ada = run_generation(_gen(tmp / "adaptive", problems_with_an_impossible_one, **ADAPTIVE), engine_cfg, pool=pool)
    assert uni.complete and ada.complete, (uni.failed_units, ada.failed_units)
    return uni, ada


def test_adaptive_draws_what_its_rule_says_and_the_same_completions_as_uniform(uniform_and_adaptive):
    """Every sample adaptive drew is uniform's sample of that index (same seed, same completion, same verdict),
    and each problem got exactly what the stopping rule, replayed on uniform's outcomes, gives it."""
    uni, ada = uniform_and_adaptive
    u, a = _rows(uni.out), _rows(ada.out)
    assert set(a) <= set(u)
    for key, row in a.items():
        assert (row["seed"], row["completion"], row["outcome"]) == \
            (u[key]["seed"], u[key]["completion"], u[key]["outcome"]), key
    by_problem = defaultdict(list)
    for (pid, i), row in sorted(u.items()):
        by_problem[pid].append(row["outcome"])
    policy = AdaptivePolicy.of(_gen("x", "humaneval", **ADAPTIVE))
    want = {pid: replay(policy, outcomes) for pid, outcomes in by_problem.items()}
    assert ada.summary["samples_per_problem"] == want
    assert want["toy/impossible"] == 2  # all-fail: stopped after its first round
    assert any(k == 8 for k in want.values()), f"no problem kept sampling to its budget: {want}"
    assert ada.summary["policy"] == "adaptive" and uni.summary["policy"] == "uniform"
    assert ada.rows == sum(want.values()) < uni.rows == 8 * 7
    m = ShardStore(ada.out).read_manifest()
    assert m.complete and m.identity["policy"]["first_round"] == 2
    assert m.summary["samples_per_problem"] == want and sum(m.summary["stopped"].values()) == 7


def test_an_all_pass_problem_stops_after_its_first_round(tmp_path, coder, toy_problems):
    """Greedy, the tiny coder passes every toy problem (its fixture checks that): each problem is all-pass, so
    adaptive gives it its first round and nothing more."""
    from gen.run import run_generation

    engine_cfg, pool = coder
    res = run_generation(_gen(tmp_path / "greedy", toy_problems, temperature=0.0, **ADAPTIVE), engine_cfg, pool=pool)
    rows = _rows(res.out)
    passing = {pid for pid, _ in rows} - {pid for (pid, _), r in rows.items() if r["outcome"] != "PASS"}
    assert passing, f"greedy passed no problem: {sorted((k, r['outcome']) for k, r in rows.items())}"
    assert res.summary["samples_per_problem"] == {pid: 2 for pid, _ in rows}  # greedy: every problem unanimous
    assert res.summary["stopped"]["too_easy"] == len(passing)
    assert res.complete and res.summary["usable_problems"] == 0 and res.summary["usable_pairs"] == 0


def test_a_rerun_after_an_interruption_yields_the_same_rows(uniform_and_adaptive, coder, tmp_path,
                                                             problems_with_an_impossible_one):
    """What a kill leaves: the manifest lists a prefix of each block's rounds (rounds of a block run one after
    another), and later shards may lie there unlisted. The rerun recomputes its decisions from the listed shards
    and ends with exactly the uninterrupted run's rows, keeping the shards it had."""
    from gen.run import run_generation

    engine_cfg, pool = coder
    _, ada = uniform_and_adaptive
    out = tmp_path / "resumed"
    shutil.copytree(ada.out, out)
    store = ShardStore(str(out))
    m = store.read_manifest()
    assert len(m.units) > 3
    keep = {uid for uid in m.units if uid.endswith("-s0000000")} | {"p000000-s0000002"}
    m.units = {uid: v for uid, v in m.units.items() if uid in keep}
    m.complete = False
    store.write_manifest(m)
    kept = {uid: (out / v["file"]).stat().st_mtime_ns for uid, v in m.units.items()}
    res = run_generation(_gen(out, problems_with_an_impossible_one, **ADAPTIVE), engine_cfg, pool=pool)
    assert res.complete
    assert _rows(out) == _rows(ada.out)
    assert set(store.read_manifest().units) == set(ShardStore(ada.out).read_manifest().units)
    assert {uid: (out / m.units[uid]["file"]).stat().st_mtime_ns for uid in kept} == kept
