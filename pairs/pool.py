"""Read a pool of gen runs without loading it: row metadata as numpy arrays, texts only for the rows asked for.

`scan_pool(uris)` streams the manifest-listed shards of every run folder with `pyarrow.dataset`, reading only
the small columns (ids, outcome, phase, seeds, token counts; strings as dictionary codes, so a 500-character
prompt repeated 200 times costs one string). Every shard's schema and row count are checked against ROW_SCHEMA
and its manifest first. `fetch_columns(pool, rows, ...)` then reads the text columns of just those rows, file by
file and row group by row group.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from sandbox import Outcome
from gen.shards import ROW_SCHEMA, Manifest, ShardStore, check_schema
from pairs.config import PHASES

OUTCOMES = [o.name for o in Outcome]  # pool.outcome codes index this list
PASS = OUTCOMES.index("PASS")
INFRA_ERROR = OUTCOMES.index("INFRA_ERROR")
PHASE_NAMES: list[str | None] = [None, *PHASES]  # pool.phase codes index this list

_DICT_COLUMNS = ["run_id", "problem_id", "model", "adapter", "prompt", "outcome", "phase"]
_NUM_COLUMNS = ["sample_index", "seed", "completion_tokens"]
_SCAN_SCHEMA = pa.schema(
    [f.with_type(pa.dictionary(pa.int32(), f.type)) if f.name in _DICT_COLUMNS else f for f in ROW_SCHEMA]
)


@dataclass(frozen=True)
class RunInfo:
    uri: str
    run_id: str
    identity: dict[str, Any]
    shards: int
    rows: int
    incomplete: str | None = None  # why the run is not complete (read anyway: pairs.allow_incomplete); None: complete


@dataclass(frozen=True)
class GroupKey:
    """Pairs are made inside one group: the same problem, model, adapter and exact prompt text."""

    problem_id: str
    model: str
    adapter: str | None
    prompt: str


@dataclass
class Pool:
    runs: list[RunInfo]
    files: list[tuple[pafs.FileSystem, str]]
    file_input: list[int]  # per file: index into runs (the input folder it came from)
    run_ids: list[str]
    groups: list[GroupKey]
    group_problem: np.ndarray  # int32 per group: index into problems
    group_hash: np.ndarray  # uint64 per group: hash of its key (stable across shard layouts and input order)
    problems: list[str]
    # one entry per row of the pool
    file: np.ndarray  # int32 index into files
    row: np.ndarray  # int32 row number inside its file
    run: np.ndarray  # int32 index into run_ids
    group: np.ndarray  # int32 index into groups
    outcome: np.ndarray  # int8 index into OUTCOMES
    phase: np.ndarray  # int8 index into PHASE_NAMES
    sample_index: np.ndarray  # int32
    seed: np.ndarray  # int64
    tokens: np.ndarray  # int32 completion_tokens
    ident: np.ndarray  # uint64 hash of (run_id, group key, sample_index): a row's identity, not its position

    def __len__(self) -> int:
        return len(self.file)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise on uint64 (wraps on overflow by design)."""
    x = np.asarray(x, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def hash64(*parts: Any) -> int:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        data = repr(p).encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return int.from_bytes(h.digest(), "little")


class _Codes:
    """Strings -> dense int codes, shared by every batch of the scan."""

    def __init__(self) -> None:
        self.index: dict[Any, int] = {}
        self.values: list[Any] = []

    def code(self, value: Any) -> int:
        i = self.index.get(value)
        if i is None:
            i = self.index[value] = len(self.values)
            self.values.append(value)
        return i

    def codes(self, values: list[Any]) -> list[int]:
        got = list(map(self.index.get, values))  # a C loop: the common case, every value seen before
        if None in got:
            got = [self.code(v) if c is None else c for v, c in zip(values, got)]
        return got


def _dict_codes(col: pa.Array, codes: _Codes, where: str, name: str, nullable: bool) -> np.ndarray:
    if col.null_count and not nullable:
        raise ValueError(f"{where}: column {name!r} has {col.null_count} null value(s); the schema forbids nulls")
    if not isinstance(col, pa.DictionaryArray):  # defensive: a reader that ignored dictionary_columns
        col = col.dictionary_encode()
    values = codes.codes(col.dictionary.to_pylist())
    indices = col.indices
    if col.null_count:
        values.append(codes.code(None))
        indices = indices.fill_null(len(col.dictionary))
    return np.array(values, dtype=np.int32)[indices.to_numpy(zero_copy_only=False)]


def _num(col: pa.Array, where: str, name: str, dtype: Any) -> np.ndarray:
    if col.null_count:
        raise ValueError(f"{where}: column {name!r} has {col.null_count} null value(s); the schema forbids nulls")
    return col.to_numpy(zero_copy_only=False).astype(dtype, copy=False)


def _groups(prob: np.ndarray, model: np.ndarray, adapter: np.ndarray, prompt: np.ndarray,
            sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(distinct (problem, model, adapter, prompt) code rows, per row the index of its own)."""
    n_prob, n_model, n_adapter, n_prompt = sizes
    if n_prob * n_model * n_adapter * n_prompt < 2**62:  # one int64 key per row: a 1-D unique
        key = ((prob.astype(np.int64) * n_model + model) * n_adapter + adapter) * n_prompt + prompt
        uniq, inverse = np.unique(key, return_inverse=True)
        rest, prm = np.divmod(uniq, n_prompt)
        rest, adp = np.divmod(rest, n_adapter)
        prb, mdl = np.divmod(rest, n_model)
        combos = np.stack([prb, mdl, adp, prm], axis=1)
    else:
        combos, inverse = np.unique(np.stack([prob, model, adapter, prompt], axis=1), axis=0, return_inverse=True)
    return combos, inverse.reshape(-1).astype(np.int32)


def _check_fragment(frag: ds.ParquetFileFragment, where: str, manifest_rows: int) -> None:
    physical = frag.physical_schema
    plain = pa.schema(
        [f.with_type(f.type.value_type) if pa.types.is_dictionary(f.type) else f for f in physical]
    )
    check_schema(plain, where)
    n = frag.metadata.num_rows
    if n != manifest_rows:
        raise ValueError(
            f"{where}: shard has {n} rows but its manifest says {manifest_rows}; the run folder is corrupt"
        )


def incomplete_reason(store: ShardStore, m: Manifest) -> tuple[str | None, list[bool]]:
    """Why the run in `store` is not complete (None if it is), and per manifest unit (sorted by id) whether its
    shard exists. Incomplete: the manifest says complete=false, records failed units, or lists a unit whose
    shard is gone."""
    paths = store.shard_paths()
    present = [i.type == pafs.FileType.File for i in store.fs.get_file_info(paths)] if paths else []
    reasons = []
    if not m.complete:
        reasons.append("its manifest says complete=false (gen stopped or is still running)")
    failed = sorted((m.summary or {}).get("failed_units") or {})
    if failed:
        reasons.append(f"{len(failed)} unit(s) failed: {failed[:5]}")
    missing = [uid for uid, ok in zip(sorted(m.units), present) if not ok]
    if missing:
        reasons.append(f"{len(missing)} unit(s) listed in its manifest have no shard: {missing[:5]}")
    return ("; ".join(reasons) or None), present


def scan_pool(uris: Sequence[str], progress: bool = True, allow_incomplete: bool = False) -> Pool:
    """Metadata of every row of every complete shard of these run folders. Raises ValueError on a missing
    manifest, a run that is not complete (unless allow_incomplete: then its present shards are read and
    RunInfo.incomplete says why), a shard of the wrong schema or row count, an unknown outcome or phase, or a
    row listed twice."""
    from tqdm.auto import tqdm

    runs: list[RunInfo] = []
    plans = []  # (store, paths, manifest rows)
    for uri in uris:
        store = ShardStore(uri)
        m = store.read_manifest()
        if m is None:
            raise ValueError(f"pairs.inputs: {uri!r} has no manifest.json; not a gen run folder")
        reason, present = incomplete_reason(store, m)
        if reason is not None and not allow_incomplete:
            raise ValueError(
                f"pairs.inputs: {uri!r} is not a complete gen run: {reason}. Rerun gen with the same config to "
                "finish it (complete units are kept), or set pairs.allow_incomplete=true to use what is there"
            )
        kept = [(u, p) for (_, u), p, ok in zip(sorted(m.units.items()), store.shard_paths(), present) if ok]
        units, paths = [u for u, _ in kept], [p for _, p in kept]
        runs.append(RunInfo(uri, m.run_id, dict(m.identity), len(paths), sum(int(u["rows"]) for u in units),
                            reason))
        plans.append((store, paths, [int(u["rows"]) for u in units]))
    total = sum(r.rows for r in runs)
    if total == 0:
        raise ValueError(f"pairs.inputs {list(uris)}: the runs hold no rows")

    files: list[tuple[pafs.FileSystem, str]] = []
    file_input: list[int] = []
    run_codes, problem_codes, model_codes, adapter_codes, prompt_codes = (_Codes() for _ in range(5))
    outcome_codes, phase_codes = _Codes(), _Codes()
    cols: dict[str, list[np.ndarray]] = {k: [] for k in
                                         ("file", "row", "run", "problem", "model", "adapter", "prompt", "outcome",
                                          "phase", "sample_index", "seed", "tokens")}
    checked_outcomes = checked_phases = 0
    fmt = ds.ParquetFileFormat(read_options=ds.ParquetReadOptions(dictionary_columns=_DICT_COLUMNS))
    bar = tqdm(total=total, unit="rows", unit_scale=True, desc="pairs: scan pool", disable=not progress)
    for input_index, ((store, paths, manifest_rows), run) in enumerate(zip(plans, runs)):
        if not paths:
            continue
        dataset = ds.dataset(paths, filesystem=store.fs, format=fmt, schema=_SCAN_SCHEMA)
        file_of: dict[str, int] = {}
        for frag, path, rows in zip(dataset.get_fragments(), paths, manifest_rows):
            _check_fragment(frag, f"{run.uri}: {path}", rows)
            file_of[frag.path] = len(files)
            files.append((store.fs, path))
            file_input.append(input_index)
        next_row = {i: 0 for i in file_of.values()}
        scanner = dataset.scanner(columns=_DICT_COLUMNS + _NUM_COLUMNS, batch_size=1 << 17, use_threads=True)
        for tagged in scanner.scan_batches():
            b, fi = tagged.record_batch, file_of[tagged.fragment.path]
            n = b.num_rows
            if n == 0:
                continue
            where = files[fi][1]
            c = {name: b.column(name) for name in b.schema.names}
            run_c = _dict_codes(c["run_id"], run_codes, where, "run_id", False)
            prob = _dict_codes(c["problem_id"], problem_codes, where, "problem_id", False)
            model = _dict_codes(c["model"], model_codes, where, "model", False)
            adapter = _dict_codes(c["adapter"], adapter_codes, where, "adapter", True)
            prompt = _dict_codes(c["prompt"], prompt_codes, where, "prompt", False)
            outc = _dict_codes(c["outcome"], outcome_codes, where, "outcome", False)
            ph = _dict_codes(c["phase"], phase_codes, where, "phase", True)
            for name, codes in (("problem", prob), ("model", model), ("adapter", adapter), ("prompt", prompt)):
                cols[name].append(codes)
            cols["run"].append(run_c)
            cols["outcome"].append(outc)
            cols["phase"].append(ph)
            cols["sample_index"].append(_num(c["sample_index"], where, "sample_index", np.int32))
            cols["seed"].append(_num(c["seed"], where, "seed", np.int64))
            cols["tokens"].append(_num(c["completion_tokens"], where, "completion_tokens", np.int32))
            cols["file"].append(np.full(n, fi, dtype=np.int32))
            cols["row"].append(np.arange(next_row[fi], next_row[fi] + n, dtype=np.int32))
            next_row[fi] += n
            # outcome/phase names are validated once per new dictionary value, naming the shard
            for v in outcome_codes.values[checked_outcomes:]:
                if v not in OUTCOMES:
                    raise ValueError(f"{where}: unknown outcome {v!r}; known: {OUTCOMES}")
            for v in phase_codes.values[checked_phases:]:
                if v not in PHASE_NAMES:
                    raise ValueError(f"{where}: unknown phase {v!r}; known: {PHASE_NAMES}")
            checked_outcomes, checked_phases = len(outcome_codes.values), len(phase_codes.values)
            bar.update(n)
    bar.close()

    arr = {k: np.concatenate(v) if v else np.zeros(0, dtype=np.int32) for k, v in cols.items()}
    # local codes -> the fixed OUTCOMES / PHASE_NAMES numbering
    outcome_map = np.array([OUTCOMES.index(v) for v in outcome_codes.values], dtype=np.int8)
    phase_map = np.array([PHASE_NAMES.index(v) for v in phase_codes.values] or [0], dtype=np.int8)
    combos, group = _groups(arr["problem"], arr["model"], arr["adapter"], arr["prompt"],
                            [len(c.values) for c in (problem_codes, model_codes, adapter_codes, prompt_codes)])
    groups = [
        GroupKey(problem_codes.values[p], model_codes.values[m], adapter_codes.values[a], prompt_codes.values[q])
        for p, m, a, q in combos.tolist()
    ]
    problem_index = {p: i for i, p in enumerate(sorted({g.problem_id for g in groups}))}
    group_hash = np.array([hash64(g.problem_id, g.model, g.adapter, g.prompt) for g in groups], dtype=np.uint64)
    run_hash = np.array([hash64(r) for r in run_codes.values], dtype=np.uint64)
    run_idx = arr["run"].astype(np.int32)
    sample_index = arr["sample_index"].astype(np.int32)
    with np.errstate(over="ignore"):
        ident = mix64(group_hash[group] ^ mix64(run_hash[run_idx] + sample_index.astype(np.uint64)))
    pool = Pool(
        runs=runs,
        files=files,
        file_input=file_input,
        run_ids=list(run_codes.values),
        groups=groups,
        group_problem=np.array([problem_index[g.problem_id] for g in groups], dtype=np.int32),
        group_hash=group_hash,
        problems=sorted(problem_index),
        file=arr["file"].astype(np.int32),
        row=arr["row"].astype(np.int32),
        run=run_idx,
        group=group,
        outcome=outcome_map[arr["outcome"]] if len(outcome_map) else arr["outcome"].astype(np.int8),
        phase=phase_map[arr["phase"]],
        sample_index=sample_index,
        seed=arr["seed"].astype(np.int64),
        tokens=arr["tokens"].astype(np.int32),
        ident=ident,
    )
    _check_unique_rows(pool)
    return pool


def _check_unique_rows(pool: Pool) -> None:
    """A sample (run, problem, model, adapter, prompt, sample_index) listed twice means two inputs overlap."""
    order = np.argsort(pool.ident, kind="stable")
    s = pool.ident[order]
    dup = np.flatnonzero(s[1:] == s[:-1])
    if len(dup):
        a, b = order[dup[0]], order[dup[0] + 1]
        g = pool.groups[pool.group[a]]
        raise ValueError(
            f"row emitted twice: run {pool.run_ids[pool.run[a]]!r} problem {g.problem_id!r} model {g.model!r} "
            f"adapter {g.adapter!r} sample_index {int(pool.sample_index[a])} is in {pool.files[pool.file[a]][1]} "
            f"and {pool.files[pool.file[b]][1]} ({len(dup)} duplicate row(s) in all); are two inputs the same run?"
        )


def fetch_columns(pool: Pool, rows: np.ndarray, columns: Sequence[str], progress: bool = False) -> dict[str, list[Any]]:
    """The given columns of the given pool rows, as Python lists in the order of `rows`; reads only the row groups
    holding them, several files at once."""
    rows = np.asarray(rows, dtype=np.int64)
    out: dict[str, list[Any]] = {c: [None] * len(rows) for c in columns}
    if len(rows) == 0:
        return out
    order = np.argsort(pool.file[rows], kind="stable")
    files = pool.file[rows][order]
    bounds = np.flatnonzero(np.diff(files)) + 1
    starts = np.concatenate([[0], bounds]).tolist()
    ends = np.concatenate([bounds, [len(files)]]).tolist()

    def read(span: tuple[int, int]) -> None:
        lo, hi = span
        fs, path = pool.files[files[lo]]
        targets = order[lo:hi]
        local = pool.row[rows[targets]].astype(np.int64)
        pf = pq.ParquetFile(path, filesystem=fs)
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
        rg_start = np.concatenate([[0], np.cumsum(sizes)])
        rg_of = np.searchsorted(rg_start, local, side="right") - 1
        wanted = np.unique(rg_of)
        table = pf.read_row_groups(wanted.tolist(), columns=list(columns), use_threads=False)
        # position of each row inside the concatenation of the wanted row groups
        base = np.concatenate([[0], np.cumsum([sizes[i] for i in wanted])])
        pos = pa.array(base[np.searchsorted(wanted, rg_of)] + (local - rg_start[rg_of]))
        for c in columns:
            values = table.column(c).take(pos).to_pylist()
            col = out[c]
            for t, v in zip(targets.tolist(), values):
                col[t] = v

    from tqdm.auto import tqdm

    workers = min(len(starts), os.cpu_count() or 1, 8)
    with cf.ThreadPoolExecutor(max_workers=workers) as ex, \
            tqdm(total=len(rows), unit="texts", unit_scale=True, desc="pairs: read texts", disable=not progress) as bar:
        for span, _ in zip(zip(starts, ends), ex.map(read, zip(starts, ends))):
            bar.update(span[1] - span[0])
    return out
