"""pairs/: properties of the selector over generated pools, bad input, and TRL reading the output as-is.

Pools are real gen run folders (gen.shards.ShardStore) written to temp dirs; every test runs the real stage
(`pairs.run.run`) and checks the Parquet it wrote against the pool it was given, recomputing everything the
property needs (pass rates, categories, duplicates, caps) independently of the selector.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.fs  # noqa: F401 (pa.fs)
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gen.shards import ROW_SCHEMA, ShardStore, rows_to_table
from pairs.config import PairsConfig, category_names, category_of, rejectable_outcomes
from pairs.output import PAIRS_SCHEMAS, check_pairs_schema
from pairloop.cli import main as cli
from pairs.run import run
from pairs.select import apportion, normalize_whitespace

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
OUTCOME_CHOICES = ["PASS", "PASS", "PASS", "PASS", "ASSERTION_FAIL", "NAME_ERROR", "TYPE_ERROR", "SYNTAX_ERROR",
                   "TIMEOUT", "NO_CODE", "INFRA_ERROR"]
NO_PHASE = ("PASS", "NO_CODE", "INFRA_ERROR")
TOKENS = [0, 1, 3, 5, 8, 12, 20, 30, 7, 9, 14, 40]  # per text id: duplicates of one text share a length


# ---------------------------------------------------------------------------------------------------- pools


def sample_row(problem: str, model: str, adapter: str | None, outcome: str, phase: str | None, text_id: int,
               variant: int) -> dict:
    """One pool row. `variant` changes only whitespace (trailing spaces, blank lines, inner runs, CRLF)."""
    code = ["def f(x):\n    return x + {t}\n", "def f(x):\n    return x +  {t}   \n\n",
            "def f(x):\r\n    return x + {t}\r\n", "\ndef f(x):\n\n    return x\t+ {t}\n"][variant].format(t=text_id)
    return {"problem_id": problem, "model": model, "adapter": adapter, "outcome": outcome,
            "phase": None if outcome in NO_PHASE else phase, "completion": code,
            "completion_tokens": TOKENS[text_id % len(TOKENS)]}


def default_prompt(problem_id: str) -> str:
    return f"def {problem_id.replace('/', '_')}(x):\n"


def write_run(root: Path | str, rows: list[dict], run_id: str = "run-a", shards: int = 2, identity: dict | None = None,
              order_seed: int | None = None, complete: bool = True) -> str:
    """A gen run folder holding `rows` (dicts from sample_row) in `shards` shard files, round-robin. Sample indices
    follow the order of `rows`; `order_seed` then shuffles the rows across shards (same content, other layout).
    `complete`: what the manifest, written last as gen writes it, says."""
    store = ShardStore(str(root))
    manifest = store.open_run(run_id, identity or {"prompt_style": "base", "response_prefix": ""})
    seen: Counter = Counter()
    full = []
    for r in rows:
        k = (r["problem_id"], r["model"], r["adapter"])
        full.append({
            "run_id": run_id, "unit_id": "", "problem_id": r["problem_id"], "sample_index": seen[k],
            "run_seed": 7, "seed": 7_000_000 + 1000 * seen[k] + len(full), "model": r["model"],
            "adapter": r["adapter"], "prompt": r.get("prompt") or default_prompt(r["problem_id"]),
            "completion": r["completion"], "completion_tokens": r["completion_tokens"],
            "finish_reason": r.get("finish_reason", "stop"), "cumulative_logprob": -1.0, "outcome": r["outcome"],
            "phase": r["phase"], "error_type": None, "error_message": None, "exec_time_s": 0.01,
        })
        seen[k] += 1
    if order_seed is not None:
        random.Random(order_seed).shuffle(full)
    for s in range(shards):
        part = [dict(x, unit_id=f"u{s}") for x in full[s::shards]]
        if part:
            store.write_unit(manifest, f"u{s}", rows_to_table(part))
    manifest.complete = complete
    store.write_manifest(manifest)
    return str(root)


PAIRABLE = "p/pairable"


def pairable_group() -> list[dict]:
    """A group every config of `configs()` can pair: 2 PASS and 2 failures (two categories, so a zero weight on
    one leaves the other), distinct texts, equal lengths (ratio 1 is inside every length-ratio range), pass rate
    0.5 (inside every pass-rate window)."""
    rows = [sample_row(PAIRABLE, "m", None, o, "test", 100 + i, 0) | {"completion_tokens": 10}
            for i, o in enumerate(["PASS", "PASS", "ASSERTION_FAIL", "NAME_ERROR"])]
    return rows


@st.composite
def pools(draw) -> list[dict]:
    """1-8 random groups (problem x model x adapter) of 1-12 samples each plus `pairable_group`, interleaved in a
    random order. Without the pairable group ~40% of drawn pools gave no pair at all, and every property held
    vacuously on them."""
    n_problems = draw(st.integers(1, 4))
    variants = draw(st.sampled_from([[("m", None)], [("m", None), ("m2", None)], [("m", None), ("m", "lora-1")]]))
    sample = st.tuples(st.sampled_from(OUTCOME_CHOICES), st.sampled_from(["definition", "test"]), st.integers(0, 11),
                       st.integers(0, 3))
    rows = []
    for p in range(n_problems):
        for model, adapter in variants:
            for o, ph, t, v in draw(st.lists(sample, min_size=1, max_size=12)):
                rows.append(sample_row(f"p/{p}", model, adapter, o, ph, t, v))
    rows += pairable_group()
    order = draw(st.permutations(range(len(rows))))
    return [rows[i] for i in order]


@st.composite
def configs(draw) -> dict:
    key = draw(st.sampled_from(["outcome", "outcome+phase"]))
    exclude = draw(st.sampled_from([["NO_CODE"], [], ["NO_CODE", "TIMEOUT"]]))
    balance = draw(st.sampled_from(["uniform", "proportional", "weights"]))
    weights = {}
    if balance == "weights":
        names = category_names(key, rejectable_outcomes(exclude))
        weights = draw(st.dictionaries(st.sampled_from(names), st.sampled_from([0.0, 0.5, 1.0, 3.0]), max_size=4))
    lo = draw(st.sampled_from([0.0, 0.1, 0.25]))
    ratio = draw(st.sampled_from([(0.5, 2.0), (0.2, 5.0), (1.0, 1.0), (0.9, 1.5), (0.01, 100.0)]))
    return dict(
        num_pairs=draw(st.integers(1, 40)), balance=balance, weights=weights, category_key=key,
        exclude_outcomes=exclude, max_pairs_per_problem=draw(st.sampled_from([1, 1, 2, 3, 6])),
        pass_rate_min=lo, pass_rate_max=draw(st.sampled_from([0.6, 0.9, 1.0])),
        length_ratio_min=ratio[0], length_ratio_max=ratio[1], max_reuse=draw(st.integers(1, 3)),
        dedup=draw(st.booleans()), seed=draw(st.integers(0, 3)),
    )


def select(rows: list[dict], opts: dict, shards: int = 2, split_runs: bool = False, order_seed: int | None = None,
           reverse_inputs: bool = False) -> tuple[list[dict] | None, dict]:
    """Run the stage on a fresh pool; (pairs as dicts, report), or (None, {"error": msg}) for 'no pairs' errors.
    split_runs: rows alternate between two run folders (two inputs)."""
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        if split_runs:
            inputs = [write_run(d / "a", rows[0::2], "run-a", shards, order_seed=order_seed),
                      write_run(d / "b", rows[1::2], "run-b", shards, order_seed=order_seed)]
        else:
            inputs = [write_run(d / "a", rows, "run-a", shards, order_seed=order_seed)]
        if reverse_inputs:
            inputs.reverse()
        cfg = PairsConfig(allow_no_eval_set=True, inputs=inputs, out=str(d / "out"), progress=False, **opts)
        try:
            report = run(cfg)
        except ValueError as e:
            if "no problem has both" in str(e) or "no pair fits" in str(e):
                return None, {"error": str(e)}
            raise
        return pq.read_table(d / "out" / "pairs.parquet").to_pylist(), report


class Reference:
    """The pool as the tests see it, computed without the selector."""

    def __init__(self, rows: list[dict], opts: dict, split_runs: bool = False) -> None:
        self.cfg = PairsConfig(allow_no_eval_set=True, inputs=["x"], **opts)
        self.rows: dict[tuple, dict] = {}  # (run_id, problem, model, adapter, sample_index) -> row
        self.group_rows = defaultdict(list)  # (problem, model, adapter) -> [(row key, row)]
        runs = [rows[0::2], rows[1::2]] if split_runs else [rows]
        for run_id, rs in zip(("run-a", "run-b"), runs):
            seen: Counter = Counter()
            for r in rs:
                g = (r["problem_id"], r["model"], r["adapter"])
                key = (run_id, *g, seen[g])
                seen[g] += 1
                self.rows[key] = r
                self.group_rows[g].append((key, r))
        self.rate = {}
        for g, items in self.group_rows.items():
            scored = [r for _, r in items if r["outcome"] != "INFRA_ERROR"]
            self.rate[g] = sum(r["outcome"] == "PASS" for r in scored) / len(scored) if scored else float("nan")

    def row(self, pair: dict, side: str) -> dict:
        return self.rows[self.key(pair, side)]

    @staticmethod
    def key(pair: dict, side: str) -> tuple:
        return (pair[f"{side}_run_id"], pair["problem_id"], pair["model"], pair["adapter"],
                pair[f"{side}_sample_index"])

    def in_window(self, g) -> bool:
        return self.cfg.pass_rate_min <= self.rate[g] <= self.cfg.pass_rate_max

    def category(self, r: dict) -> str | None:
        if r["outcome"] not in self.cfg.rejectable:
            return None
        return category_of(r["outcome"], r["phase"], self.cfg.category_key)

    def unit(self, key: tuple, text: str):
        """What reuse limits count: a whitespace-normalised text of a group under dedup, else the row itself."""
        return (key[1:4], norm(text)) if self.cfg.dedup else key

    def clusters(self, g) -> dict:
        """Non-INFRA rows of a group by `unit`."""
        out = defaultdict(list)
        for key, r in self.group_rows[g]:
            if r["outcome"] != "INFRA_ERROR":
                out[self.unit(key, r["completion"])].append(r)
        return out

    def ratio_ok(self, chosen_tokens: int, rejected_tokens: int) -> bool:
        ratio = max(chosen_tokens, 1) / max(rejected_tokens, 1)
        return self.cfg.length_ratio_min <= ratio <= self.cfg.length_ratio_max


def norm(text: str) -> str:
    return normalize_whitespace(text)


# --------------------------------------------------------------------------------------------- properties


@PROPERTY
@given(pools(), configs())
def test_every_pair_is_one_problem_and_one_model(rows, opts):
    pairs, _ = select(rows, opts, split_runs=True)
    assume(pairs)  # pools() always holds a pairable group; only zero weights on both its categories empty it
    ref = Reference(rows, opts, split_runs=True)
    for p in pairs:
        for side in ("chosen", "rejected"):
            r = ref.row(p, side)  # the provenance names a row of this very problem, model and adapter...
            assert r["completion"] == p[side], (p, r)  # ...and it is the text written
            assert p["prompt"] == default_prompt(p["problem_id"])


@PROPERTY
@given(pools(), configs())
def test_chosen_passes_and_rejected_fails_with_an_allowed_outcome(rows, opts):
    pairs, _ = select(rows, opts)
    assume(pairs)
    ref = Reference(rows, opts)
    for p in pairs:
        chosen, rejected = ref.row(p, "chosen"), ref.row(p, "rejected")
        assert chosen["outcome"] == "PASS", p
        assert rejected["outcome"] in ref.cfg.rejectable and rejected["outcome"] not in ("PASS", "INFRA_ERROR"), p
        assert (p["rejected_outcome"], p["rejected_phase"]) == (rejected["outcome"], rejected["phase"])
        assert p["category"] == ref.category(rejected)


@PROPERTY
@given(pools(), configs())
def test_caps_window_length_ratio_and_reuse_hold(rows, opts):
    pairs, _ = select(rows, opts)
    assume(pairs)
    ref = Reference(rows, opts)
    per_problem = Counter(p["problem_id"] for p in pairs)
    assert max(per_problem.values(), default=0) <= ref.cfg.max_pairs_per_problem, per_problem
    uses = Counter()
    for p in pairs:
        g = (p["problem_id"], p["model"], p["adapter"])
        assert ref.in_window(g) and p["problem_pass_rate"] == ref.rate[g], (p, ref.rate[g])
        assert ref.ratio_ok(p["chosen_tokens"], p["rejected_tokens"]), p
        for side in ("chosen", "rejected"):
            uses[(side, p[f"{side}_run_id"], *g, p[f"{side}_sample_index"])] += 1
    assert max(uses.values(), default=0) <= ref.cfg.max_reuse, uses.most_common(3)
    keys = [(p["chosen_run_id"], p["chosen_sample_index"], p["rejected_run_id"], p["rejected_sample_index"],
             p["problem_id"], p["model"], p["adapter"]) for p in pairs]
    assert len(keys) == len(set(keys)), "the same (chosen, rejected) pair twice"


@PROPERTY
@given(pools(), configs().map(lambda o: dict(o, dedup=True)))
def test_no_duplicate_or_unreproducible_completion_is_used(rows, opts):
    pairs, _ = select(rows, opts)
    assume(pairs)
    ref = Reference(rows, opts)
    used = defaultdict(set)  # group -> {(dedup unit, row key)}
    for p in pairs:
        g = (p["problem_id"], p["model"], p["adapter"])
        for side in ("chosen", "rejected"):
            key = ref.key(p, side)
            used[g].add((ref.unit(key, ref.row(p, side)["completion"]), key))
    for g, items in used.items():
        units = Counter(u for u, _ in items)
        assert max(units.values()) == 1, f"two rows with the same normalised text used in {g}: {units}"
        verdicts = {u: {(r["outcome"], r["phase"]) for r in rs} for u, rs in ref.clusters(g).items()}
        for u, _ in items:
            assert len(verdicts[u]) == 1, f"{g}: text {u[1]!r} was seen with verdicts {verdicts[u]}"


def addable_pair_exists(ref: Reference, pairs: list[dict], category: str | None) -> bool:
    """Could one more pair (of `category`, or of any positive-weight category when None) join the selection
    within every constraint? Counts reuse per `Reference.unit`, so it agrees with the selector's dedup."""
    per_problem = Counter(p["problem_id"] for p in pairs)
    uses, paired = Counter(), set()
    for p in pairs:
        c = ref.unit(ref.key(p, "chosen"), ref.row(p, "chosen")["completion"])
        r = ref.unit(ref.key(p, "rejected"), ref.row(p, "rejected")["completion"])
        uses[c] += 1
        uses[r] += 1
        paired.add((c, r))
    weights = ref.cfg.weights if ref.cfg.balance == "weights" else {}
    for g in ref.group_rows:
        if not ref.in_window(g) or per_problem[g[0]] >= ref.cfg.max_pairs_per_problem:
            continue
        passes, fails = [], []
        for unit, rs in ref.clusters(g).items():
            if len({(r["outcome"], r["phase"]) for r in rs}) > 1:
                continue  # one text, two verdicts: not reproducible, never usable
            cat = ref.category(rs[0])
            if rs[0]["outcome"] == "PASS":
                passes.append((unit, rs[0]))
            elif cat is not None and (cat == category if category else weights.get(cat, 1.0) > 0):
                fails.append((unit, rs[0]))
        for uc, c in passes:
            for ur, r in fails:
                if (uses[uc] < ref.cfg.max_reuse and uses[ur] < ref.cfg.max_reuse and (uc, ur) not in paired
                        and ref.ratio_ok(c["completion_tokens"], r["completion_tokens"])):
                    return True
    return False


@PROPERTY
@given(pools(), configs())
def test_quotas_are_met_unless_not_one_more_pair_fits(rows, opts):
    pairs, report = select(rows, opts)
    ref = Reference(rows, opts)
    if pairs is None:  # the stage said "no pairs": not a single pair may exist
        assert not addable_pair_exists(ref, [], None), report["error"]
        return
    assert sum(v["asked"] for v in report["categories"].values()) == ref.cfg.num_pairs
    got = Counter(p["category"] for p in pairs)
    for k, v in report["categories"].items():
        assert got[k] == v["got"], (k, got, v)
        if got[k] < v["asked"]:
            assert not addable_pair_exists(ref, pairs, k), f"{k}: got {got[k]} < asked {v['asked']} but one more fits"
    if len(pairs) < ref.cfg.num_pairs:
        assert not addable_pair_exists(ref, pairs, None), f"{len(pairs)} < {ref.cfg.num_pairs} but one more fits"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pools(), configs(), st.integers(1, 4), st.integers(0, 1000))
def test_same_seed_same_pairs_whatever_the_shard_layout(rows, opts, shards, order_seed):
    first, _ = select(rows, opts, shards=1, split_runs=True)
    assume(first)  # two empty selections are trivially equal
    again, _ = select(rows, opts, shards=shards, split_runs=True, order_seed=order_seed, reverse_inputs=True)
    assert first == again


def test_loose_constraints_meet_every_quota_exactly():
    """Caps, reuse and windows out of the way: each category gets exactly its share of 60."""
    rows = []
    rng = random.Random(1)
    for p in range(6):
        for i in range(40):
            o = ["PASS", "ASSERTION_FAIL", "NAME_ERROR", "TYPE_ERROR"][i % 4]
            rows.append(sample_row(f"p/{p}", "m", None, o, rng.choice(["definition", "test"]), 0, 0)
                        | {"completion": f"# {p}-{i}\nreturn {i}\n", "completion_tokens": 10})
    opts = dict(num_pairs=60, max_pairs_per_problem=100, max_reuse=100, pass_rate_min=0.0, pass_rate_max=1.0)
    for balance, weights, want in [
        ("uniform", {}, {"ASSERTION_FAIL": 20, "NAME_ERROR": 20, "TYPE_ERROR": 20}),
        ("weights", {"NAME_ERROR": 4.0}, {"ASSERTION_FAIL": 10, "NAME_ERROR": 40, "TYPE_ERROR": 10}),
        ("weights", {"TYPE_ERROR": 0.0}, {"ASSERTION_FAIL": 30, "NAME_ERROR": 30}),
    ]:
        pairs, report = select(rows, dict(opts, balance=balance, weights=weights))
        assert Counter(p["category"] for p in pairs) == want, (balance, weights)
        assert {k: v["asked"] for k, v in report["categories"].items() if v["asked"]} == want


def test_a_short_category_is_redistributed_and_reported():
    rows = [sample_row("p/0", "m", None, "PASS", None, i, 0) | {"completion_tokens": 10} for i in range(10)]
    rows += [sample_row("p/0", "m", None, "NAME_ERROR", "test", 20 + i, 0) | {"completion_tokens": 10}
             for i in range(2)]
    rows += [sample_row("p/0", "m", None, "ASSERTION_FAIL", "test", 40 + i, 0) | {"completion_tokens": 10}
             for i in range(20)]
    pairs, report = select(rows, dict(num_pairs=20, max_pairs_per_problem=100, max_reuse=1, pass_rate_min=0.0))
    cats = report["categories"]
    assert (cats["NAME_ERROR"]["asked"], cats["NAME_ERROR"]["got"]) == (10, 2)
    assert (cats["ASSERTION_FAIL"]["asked"], cats["ASSERTION_FAIL"]["got"]) == (10, 8)  # 10 passes, reuse 1
    assert cats["NAME_ERROR"]["exhausted"]
    assert any(n.startswith("NAME_ERROR: asked 10, got 2") for n in report["redistribution"]), report["redistribution"]
    assert len(pairs) == 10 and any("only 10 of the 20" in w for w in report["warnings"])


def test_a_category_looks_past_a_problem_that_is_full():
    """ASSERTION_FAIL fails only in p/0, whose cap fills; NAME_ERROR must take over and find its pairs past p/0."""
    rows = []
    for p in range(5):
        rows += [sample_row(f"p/{p}", "m", None, "PASS", None, i, 0) | {"completion_tokens": 10} for i in range(4)]
        rows += [sample_row(f"p/{p}", "m", None, "NAME_ERROR", "test", 5 + i, 0) | {"completion_tokens": 10}
                 for i in range(2)]
    rows += [sample_row("p/0", "m", None, "ASSERTION_FAIL", "test", 9 + i, 0) | {"completion_tokens": 10}
             for i in range(4)]
    for seed in range(8):
        pairs, report = select(rows, dict(num_pairs=8, max_pairs_per_problem=2, pass_rate_min=0.0, seed=seed))
        # 5 problems x cap 2 = 10 slots >= 8 asked; ASSERTION_FAIL can have at most p/0's 2
        assert len(pairs) == 8, (seed, report["categories"])
        assert Counter(p["category"] for p in pairs)["ASSERTION_FAIL"] <= 2
        assert Counter(p["problem_id"] for p in pairs)["p/0"] <= 2


def test_apportion_splits_exactly_and_proportionally():
    cases = [(500, {"a": 1.0, "b": 1.0, "c": 1.0}), (7, {"a": 3.0, "b": 1.0}),
             (3, {"a": 1, "b": 1, "c": 1, "d": 1, "e": 0})]  # 4 equal shares of 3: a seeded tie-break
    for total, weights in cases:
        out = apportion(total, weights, seed=0)
        assert sum(out.values()) == total and out.get("e", 0) == 0
        s = sum(weights.values())
        assert all(abs(out[k] - total * w / s) < 1 for k, w in weights.items()), out


def test_whitespace_normalisation_keeps_indentation():
    same = ["def f():\n    return 1\n", "def f():  \r\n    return  1\n\n\n", "\ndef f():\n    return\t1"]
    assert len({norm(t) for t in same}) == 1
    assert norm("if x:\n    a()\nb()\n") != norm("if x:\n    a()\n    b()\n")


# ------------------------------------------------------------------------------------------- leakage guard


def simple_pool(d: Path, problems=("p/0", "p/1"), prompts: dict | None = None, identity: dict | None = None) -> str:
    rows = []
    for p in problems:
        prompt = {"prompt": prompts[p]} if prompts and p in prompts else {}
        rows += [sample_row(p, "m", None, "PASS", None, i, 0) | {"completion_tokens": 10} | prompt for i in range(3)]
        rows += [sample_row(p, "m", None, "ASSERTION_FAIL", "test", 10 + i, 0) | {"completion_tokens": 10} | prompt
                 for i in range(3)]
    return write_run(d / "run", rows, identity=identity)


def test_leakage_guard_refuses_and_writes_nothing(tmp_path):
    inp = simple_pool(tmp_path)
    with pytest.raises(ValueError, match=r"leakage: 1 problem.*'p/1'.*allow_leakage"):
        run(PairsConfig(inputs=[inp], out=str(tmp_path / "out"), eval_ids=["p/1", "other"], progress=False))
    assert not (tmp_path / "out").exists()


def test_leakage_guard_checks_the_named_problem_set_split(tmp_path, toy_problems):
    from tasks.problems import load_problems, split_problems

    _, held_out = split_problems(load_problems(toy_problems), 0.5, 0)
    inp = simple_pool(tmp_path, problems=[held_out[0].id, "p/x"])
    with pytest.raises(ValueError, match=f"leakage.*{held_out[0].id}"):
        run(PairsConfig(inputs=[inp], out=str(tmp_path / "out"), eval_problems=toy_problems, eval_fraction=0.5,
                        split_seed=0, progress=False))


def test_allow_leakage_writes_a_loud_warning(tmp_path, capsys):
    inp = simple_pool(tmp_path)
    report = run(PairsConfig(inputs=[inp], out=str(tmp_path / "out"), eval_ids=["p/1"], allow_leakage=True,
                             progress=False))
    leaked = sum(p == "p/1" for p in pq.read_table(tmp_path / "out" / "pairs.parquet").column("problem_id").to_pylist())
    assert leaked > 0 and report["warnings"][0].startswith(f"LEAKAGE: {leaked} pairs from 1 eval problem")
    assert "LEAKAGE" in capsys.readouterr().err
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["leakage"]["pair_problems_in_eval"] == 1 and "LEAKAGE" in (tmp_path / "out" / "report.md").read_text()


def test_naming_no_eval_set_is_refused_unless_allowed(tmp_path):
    inp = simple_pool(tmp_path)
    with pytest.raises(ValueError, match=r"pairs.eval_ids / pairs.eval_problems: no eval set named.*allow_no_eval_set"):
        PairsConfig(inputs=[inp], out=str(tmp_path / "out"), progress=False)
    report = run(PairsConfig(inputs=[inp], out=str(tmp_path / "out"), allow_no_eval_set=True, progress=False))
    assert report["warnings"][0].startswith("NO EVAL SET") and report["leakage"]["compared"] is None
    assert (tmp_path / "out" / "report.md").read_text().splitlines()[0].startswith("**WARNING: NO EVAL SET")


def test_leakage_guard_catches_a_renamed_reformatted_copy_of_an_eval_problem(tmp_path):
    from tasks.problems import load_problems

    target = load_problems("humaneval")[12]  # longest(strings)
    copy = target.prompt.replace(target.entry_point, "pick_longest").replace("    ", "  ").replace("\n", "\n\n")
    inp = simple_pool(tmp_path, problems=("mine/1", "p/0"), prompts={"mine/1": copy})
    with pytest.raises(ValueError, match=r"leakage: 1 problem.*\['mine/1'\].*HumanEval/12 ~ mine/1"):
        run(PairsConfig(inputs=[inp], out=str(tmp_path / "out"), eval_problems="humaneval", progress=False))
    assert not (tmp_path / "out").exists()


def test_pairs_record_provenance_and_report_what_was_compared(tmp_path, toy_problems):
    from tasks.leakage import PROVENANCE_KEY, parse_provenance
    from tasks.problems import load_problems, problem_set_fingerprint, select_problems

    train = select_problems(toy_problems, "train", 0.5, 0)
    identity = {"prompt_style": "base", "response_prefix": "", "problems": toy_problems, "split": "train",
                "eval_fraction": 0.5, "split_seed": 0, "limit": 0, "problem_set": problem_set_fingerprint(train)}
    inp = simple_pool(tmp_path, problems=[p.id for p in train], identity=identity)
    report = run(PairsConfig(inputs=[inp], out=str(tmp_path / "out"), eval_problems=toy_problems, eval_fraction=0.5,
                             progress=False))
    pairs_file = tmp_path / "out" / "pairs.parquet"
    texts, rec = parse_provenance(pq.read_schema(pairs_file).metadata.get(PROVENANCE_KEY), "pairs")
    used = set(pq.read_table(pairs_file).column("problem_id").to_pylist())
    by_id = {p.id: p for p in load_problems(toy_problems)}
    assert rec["problem_sets"][0]["verified"] and rec["problem_sets"][0]["spec"] == toy_problems
    assert {p["id"] for p in rec["problems"]} == used
    assert all((p["prompt"], p["test"]) == (by_id[p["id"]].prompt, by_id[p["id"]].test) for p in rec["problems"])
    c = report["leakage"]["compared"]
    assert (c["train_problems"], c["eval_problems"], c["threshold"]) == (len(train), len(by_id) - len(train), 0.8)
    assert "8-grams" in (tmp_path / "out" / "report.md").read_text()


def test_a_problem_set_that_changed_since_gen_is_recorded_unverified(tmp_path, toy_problems):
    identity = {"prompt_style": "base", "response_prefix": "", "problems": toy_problems, "split": "all",
                "problem_set": "0" * 64}
    inp = simple_pool(tmp_path, identity=identity)
    report = run(PairsConfig(inputs=[inp], out=str(tmp_path / "out"), eval_ids=["other"], progress=False))
    (ps,) = report["leakage"]["problem_sets"]
    assert not ps["verified"] and "fingerprint mismatch" in ps["note"]


# ---------------------------------------------------------------------------------------------- incomplete runs


def incomplete_pool(d: Path) -> str:
    """simple_pool's rows, as gen leaves them when it stops after writing the shards: complete=false."""
    simple_pool(d)
    store = ShardStore(str(d / "run"))
    m = store.read_manifest()
    m.complete = False
    store.write_manifest(m)
    return store.uri


def test_an_incomplete_run_is_refused_and_nothing_is_written(tmp_path):
    inp = incomplete_pool(tmp_path)
    with pytest.raises(ValueError, match=r"not a complete gen run: its manifest says complete=false.*"
                                         r"pairs\.allow_incomplete=true"):
        run(PairsConfig(inputs=[inp], out=str(tmp_path / "out"), allow_no_eval_set=True, progress=False))
    assert not (tmp_path / "out").exists()


def test_a_run_with_failed_units_is_refused(tmp_path):
    inp = simple_pool(tmp_path)
    store = ShardStore(inp)
    m = store.read_manifest()
    m.summary["failed_units"] = {"u9": "engine died 3 times while running it"}  # complete stays true: a lie
    store.write_manifest(m)
    with pytest.raises(ValueError, match=r"1 unit\(s\) failed: \['u9'\]"):
        run(PairsConfig(inputs=[inp], out=str(tmp_path / "out"), allow_no_eval_set=True, progress=False))


def test_a_unit_listed_without_its_shard_is_refused(tmp_path):
    inp = simple_pool(tmp_path)
    (Path(inp) / "shards" / "u1.parquet").unlink()
    with pytest.raises(ValueError, match=r"1 unit\(s\) listed in its manifest have no shard: \['u1'\]"):
        run(PairsConfig(inputs=[inp], out=str(tmp_path / "out"), allow_no_eval_set=True, progress=False))


def test_allow_incomplete_uses_the_run_and_the_report_says_so_first(tmp_path, capsys):
    inp = incomplete_pool(tmp_path)
    report = run(PairsConfig(inputs=[inp], out=str(tmp_path / "out"), eval_ids=["p/1"], allow_leakage=True,
                             allow_incomplete=True, progress=False))
    assert report["pairs"] > 0
    assert report["warnings"][0].startswith("INCOMPLETE input run(s) used because allow_incomplete=true")
    assert "complete=false" in report["warnings"][0] and report["warnings"][1].startswith("LEAKAGE")
    assert "INCOMPLETE" in capsys.readouterr().err
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.index("INCOMPLETE") < md.index("LEAKAGE") < md.index("## Pool")


# ---------------------------------------------------------------------------------------------- bad input


def test_a_shard_of_the_wrong_schema_is_named(tmp_path):
    inp = simple_pool(tmp_path)
    bad = Path(inp) / "shards" / "u1.parquet"
    t = pq.read_table(bad)
    pq.write_table(t.set_column(t.schema.get_field_index("completion_tokens"), "completion_tokens",
                                t.column("completion_tokens").cast(pa.string())), bad)
    with pytest.raises(ValueError, match=r"u1\.parquet.*completion_tokens: string \(want int32\)"):
        run(PairsConfig(allow_no_eval_set=True, inputs=[inp], out=str(tmp_path / "out"), progress=False))
    pq.write_table(t.drop_columns(["outcome"]), bad)
    with pytest.raises(ValueError, match=r"u1\.parquet.*missing columns \['outcome'\]"):
        run(PairsConfig(allow_no_eval_set=True, inputs=[inp], out=str(tmp_path / "out"), progress=False))


def test_unknown_outcome_in_a_shard_is_named(tmp_path):
    rows = [sample_row("p/0", "m", None, "PASS", None, 0, 0), sample_row("p/0", "m", None, "PASS", None, 1, 0)]
    rows[1]["outcome"] = "FAILED_SOMEHOW"
    inp = write_run(tmp_path / "run", rows, shards=1)
    with pytest.raises(ValueError, match=r"u0\.parquet: unknown outcome 'FAILED_SOMEHOW'"):
        run(PairsConfig(allow_no_eval_set=True, inputs=[inp], out=str(tmp_path / "out"), progress=False))


def test_a_pool_without_pass_and_fail_in_one_problem_is_refused(tmp_path):
    rows = [sample_row("p/0", "m", None, "PASS", None, i, 0) for i in range(3)]
    rows += [sample_row("p/1", "m", None, "NAME_ERROR", "test", i, 0) for i in range(3)]
    rows += [sample_row("p/2", "m", None, "NO_CODE", None, i, 0) for i in range(2)]
    rows += [sample_row("p/2", "m", None, "PASS", None, 5, 0)]
    inp = write_run(tmp_path / "run", rows)
    want = (r"no problem has both a PASS and a usable failure.*of 3 \(problem, model, adapter, prompt\) groups in 9 "
            r"rows, 2 have a PASS, 1 a usable failure.*0 both")
    with pytest.raises(ValueError, match=want):
        run(PairsConfig(allow_no_eval_set=True, inputs=[inp], out=str(tmp_path / "out"), progress=False))
    assert not (tmp_path / "out").exists()


def test_weights_naming_an_unknown_category_list_the_valid_ones(tmp_path, capsys):
    with pytest.raises(ValueError,
                       match=r"weights: unknown category \['NAME_EROR'\].*valid: \['SYNTAX_ERROR', 'TRUNCATED', 'NAME_"):
        PairsConfig(allow_no_eval_set=True, inputs=["x"], balance="weights", weights={"NAME_EROR": 2.0})
    with pytest.raises(ValueError, match=r"unknown category \['NAME_ERROR/runtime'\].*'NAME_ERROR/definition'"):
        PairsConfig(inputs=["x"], balance="weights", category_key="outcome+phase", weights={"NAME_ERROR/runtime": 1.0},
                    allow_no_eval_set=True)
    with pytest.raises(ValueError, match=r"unknown category \['NO_CODE'\]"):  # excluded by default
        PairsConfig(allow_no_eval_set=True, inputs=["x"], balance="weights", weights={"NO_CODE": 1.0})
    inp = simple_pool(tmp_path)
    assert cli(["pairs", f"inputs={inp}", f"out={tmp_path / 'out'}", "balance=weights", "weights={BOGUS: 1}"]) == 2
    assert "pairs.weights: unknown category ['BOGUS']" in capsys.readouterr().err


def test_the_same_run_given_twice_is_refused(tmp_path):
    inp = simple_pool(tmp_path)
    with pytest.raises(ValueError, match="row emitted twice"):
        run(PairsConfig(allow_no_eval_set=True, inputs=[inp, inp + "/"], out=str(tmp_path / "out"), progress=False))


def test_a_shard_truncated_behind_the_manifest_is_refused(tmp_path):
    inp = simple_pool(tmp_path)
    shard = Path(inp) / "shards" / "u0.parquet"
    pq.write_table(pq.read_table(shard).slice(0, 2), shard)
    with pytest.raises(ValueError, match=r"u0\.parquet: shard has 2 rows but its manifest says 6"):
        run(PairsConfig(allow_no_eval_set=True, inputs=[inp], out=str(tmp_path / "out"), progress=False))


def test_a_pool_on_s3_gives_the_pairs_it_gives_on_local_disk(tmp_path, monkeypatch):
    """Run folders and the output may be pyarrow URIs (here a local moto S3 server)."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(k, "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="pool")
        query = f"?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
        rows = []
        for p in range(3):
            rows += [sample_row(f"p/{p}", "m", None, o, "test", i, 0) | {"completion_tokens": 10}
                     for i, o in enumerate(["PASS", "PASS", "NAME_ERROR", "ASSERTION_FAIL", "TYPE_ERROR"])]
        local = run(PairsConfig(inputs=[write_run(tmp_path / "run", rows)], out=str(tmp_path / "out"), progress=False,
                                allow_no_eval_set=True))
        remote = run(PairsConfig(inputs=[write_run("s3://pool/run" + query, rows)], out="s3://pool/out" + query,
                                 allow_no_eval_set=True,
                                 progress=False))
        # the location written keeps the store's query string, so it can be opened as it is
        assert remote["written"]["pairs.parquet"] == "s3://pool/out/pairs.parquet" + query
        fs, path = pa.fs.FileSystem.from_uri(remote["written"]["pairs.parquet"])
        written_locally = pq.read_table(local["written"]["pairs.parquet"]).to_pylist()
        assert pq.read_table(path, filesystem=fs).to_pylist() == written_locally
    finally:
        server.stop()


# -------------------------------------------------------------------------------------- TRL reads the output


def chat_pool(d: Path, tokenizer, prefix: str) -> tuple[str, dict]:
    messages = {f"p/{i}": [{"role": "system", "content": "You write Python."},
                           {"role": "user", "content": f"Write function number {i}."}] for i in range(3)}
    prompts = {p: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) + prefix
               for p, m in messages.items()}
    rows = []
    for p in messages:
        rows += [sample_row(p, "m", None, "PASS", None, i, 0) | {"completion_tokens": 10, "prompt": prompts[p]}
                 for i in range(2)]
        rows += [sample_row(p, "m", None, "ASSERTION_FAIL", "test", 5 + i, 0)
                 | {"completion_tokens": 10, "prompt": prompts[p]} for i in range(2)]
    identity = {"prompt_style": "chat", "response_prefix": prefix, "problems": "unused"}
    return write_run(d / "run", rows, identity=identity), messages


def test_chat_format_rebuilds_the_messages_gen_rendered(tmp_path, tiny_model, toy_problems):
    """auto format + the problem set named in gen's manifest: prompts are tasks.prompts.chat_messages."""
    from transformers import AutoTokenizer

    from tasks.problems import load_problems
    from tasks.prompts import build_prompt, chat_messages

    tok = AutoTokenizer.from_pretrained(tiny_model)
    problems = {p.id: p for p in load_problems(toy_problems)}
    prefix = "```python\n"
    rows = []
    for pid, prob in list(problems.items())[:3]:
        prompt = build_prompt(prob, "chat", tokenizer=tok) + prefix
        rows += [sample_row(pid, "m", None, o, "test", i, 0) | {"completion_tokens": 10, "prompt": prompt}
                 for i, o in enumerate(["PASS", "PASS", "TYPE_ERROR", "ASSERTION_FAIL"])]
    identity = {"prompt_style": "chat", "response_prefix": prefix, "problems": toy_problems}
    inp = write_run(tmp_path / "run", rows, identity=identity)
    report = run(PairsConfig(allow_no_eval_set=True, inputs=[inp], out=str(tmp_path / "out"), progress=False))
    assert report["format"] == "chat"
    for p in pq.read_table(tmp_path / "out" / "pairs.parquet").to_pylist():
        assert p["prompt"] == chat_messages(problems[p["problem_id"]])
        assert p["chosen"][0]["content"].startswith(prefix) and p["chosen"][0]["content"].endswith("```")
    # a problem set other than the one gen rendered from is caught, not silently paired with the wrong prompt
    other = tmp_path / "other.jsonl"
    other.write_text("".join(
        json.dumps({"task_id": pid, "prompt": "def g():\n", "entry_point": "g",
                    "test": "def check(candidate):\n    pass\n"}) + "\n" for pid in problems))
    with pytest.raises(ValueError, match="message is not in the samples' prompt"):
        run(PairsConfig(inputs=[inp], out=str(tmp_path / "out2"), problems=str(other), progress=False,
                        allow_no_eval_set=True))
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("fmt", ["chat", "text"])
def test_trl_dpo_trainer_reads_the_pairs_as_they_are(tmp_path, tiny_model, fmt):
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    prefix = "```python\n"
    inp, messages = chat_pool(tmp_path, tok, prefix)
    run(PairsConfig(inputs=[inp], out=str(tmp_path / "out"), prompt_format=fmt, num_pairs=6, progress=False,
                    allow_no_eval_set=True),
        messages_for=messages.__getitem__)
    path = str(tmp_path / "out" / "pairs.parquet")
    assert check_pairs_schema(pq.read_schema(path), path) == fmt
    data = datasets.load_dataset("parquet", data_files=path, split="train")
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2, max_steps=1, report_to="none",
                     bf16=False, save_strategy="no", max_length=256, logging_steps=1,
                     dataloader_pin_memory=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    eos = tok.eos_token + ("\n" if fmt == "chat" else "")  # the chat template closes the turn with "<|im_end|>\n"
    for src, ex in zip(data, trainer.train_dataset):
        row = json.loads(json.dumps(src))
        sample_prompt = row["prompt"] if fmt == "text" else None
        assert ex["prompt_ids"] and ex["chosen_ids"] and ex["rejected_ids"]
        for side in ("chosen", "rejected"):
            text = tok.decode(ex["prompt_ids"] + ex[f"{side}_ids"])
            completion = row[side] if fmt == "text" else row[side][0]["content"][len(prefix):]
            # what TRL trains on is exactly: the prompt the sample was generated from + its completion (+ the
            # closing fence gen's stop string cut off) + end of turn
            problem = row["problem_id"]
            full_prompt = sample_prompt or tok.apply_chat_template(messages[problem], tokenize=False,
                                                                   add_generation_prompt=True) + prefix
            assert text == full_prompt + completion + eos, (text, full_prompt, completion)
            assert completion.endswith("```")
    result = trainer.train()
    assert math.isfinite(result.training_loss)


def test_pairs_schemas_are_what_trl_calls_conversational_and_standard():
    from trl.data_utils import is_conversational

    provenance = {f.name: (1 if pa.types.is_integer(f.type) else 0.5 if pa.types.is_floating(f.type) else "x")
                  for f in PAIRS_SCHEMAS["text"] if f.name not in ("prompt", "chosen", "rejected")}
    chat = {"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "assistant", "content": "y"}],
            "rejected": [{"role": "assistant", "content": "z"}]}
    text = {"prompt": "x", "chosen": "y", "rejected": "z"}
    for fmt, turns, conversational in (("chat", chat, True), ("text", text, False)):
        table = pa.Table.from_pylist([turns | provenance], schema=PAIRS_SCHEMAS[fmt])
        assert check_pairs_schema(table.schema, fmt) == fmt
        assert is_conversational(table.to_pylist()[0]) is conversational
    with pytest.raises(ValueError, match="samples.parquet: not a pairloop pairs table"):
        check_pairs_schema(ROW_SCHEMA, "samples.parquet")


@pytest.mark.parametrize("trick,code", [
    ("frame", "import sys\nsys._getframe(1).f_locals['ok'] = True\n"),
    ("frame", "import inspect\ninspect.currentframe().f_back\n"),
    ("trace", "import sys\nsys.settrace(lambda *a: None)\n"),
    ("gc", "import gc\n[o for o in gc.get_objects() if 0]\n"),
    ("ctypes", "import ctypes\nctypes.memmove(0, 0, 0)\n"),
    ("sys.modules", "import sys\nsys.modules['math'].isclose = lambda *a, **k: True\n"),
])
def test_report_lists_chosen_completions_that_use_interpreter_tricks(trick, code, tmp_path):
    rows = []
    for t in range(3):
        rows.append(sample_row("p/0", "m", None, "PASS", None, t, 0))
        rows.append(sample_row("p/0", "m", None, "ASSERTION_FAIL", "test", 10 + t, 0))
    rows[0]["completion"] = code + rows[0]["completion"]  # one chosen candidate is a trickster
    inp = write_run(tmp_path / "run", rows)
    report = run(PairsConfig(inputs=[inp], out=str(tmp_path / "out"), num_pairs=6, max_pairs_per_problem=6,
                             pass_rate_min=0.0, pass_rate_max=1.0, length_ratio_min=0.01, length_ratio_max=100.0,
                             max_reuse=3, eval_ids=["none"], progress=False))
    table = pq.read_table(tmp_path / "out" / "pairs.parquet")
    flagged = [s for s in table.column("chosen").to_pylist() if code in str(s)]
    assert flagged, "the trickster was not chosen: the test would check nothing"
    assert len(report["suspicious_chosen"]) == len(flagged)
    assert all(x["tricks"] == [trick] and x["problem_id"] == "p/0" for x in report["suspicious_chosen"])
    assert trick in report["warnings"][-1]
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"Chosen completions that use frame, trace, gc, ctypes or sys.modules tricks: {len(flagged)}." in md


def test_plain_solutions_are_not_flagged():
    from pairs.output import introspection_tricks

    clean = ["def f(frame):\n    return frame.f_x\n", "import sys\nprint(sys.maxsize)\n", "modules = {}\n",
             "def gcd(a, b):\n    return a\n", "trace = 3\n"]
    assert [introspection_tricks(c) for c in clean] == [[]] * len(clean)
