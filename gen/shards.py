"""The sample-shard contract: gen writes it, every later stage reads it.

A run folder (local path or any pyarrow filesystem URI, e.g. s3://bucket/runs/x) holds:

    manifest.json           written last, atomically: run identity + the list of complete units
    shards/<unit_id>.parquet one file per work unit (ROW_SCHEMA)

The manifest is the source of truth: readers read only the shards it lists, so a shard written by a unit that
crashed before the manifest update is invisible, and its retry overwrites it (same name -> no duplicate rows).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

SCHEMA_VERSION = 1

ROW_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("unit_id", pa.string(), nullable=False),
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),  # 0..n-1 within the problem, unique per run
        pa.field("run_seed", pa.int64(), nullable=False),  # the run's seed (eval: one per repetition)
        pa.field("seed", pa.int64(), nullable=False),  # the seed vLLM used for this very sample
        pa.field("model", pa.string(), nullable=False),
        pa.field("adapter", pa.string(), nullable=True),  # null for the base model
        pa.field("prompt", pa.string(), nullable=False),  # the exact text sent to the engine
        pa.field("completion", pa.string(), nullable=False),
        pa.field("completion_tokens", pa.int32(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=True),
        pa.field("cumulative_logprob", pa.float64(), nullable=True),
        pa.field("outcome", pa.string(), nullable=False),  # sandbox.Outcome name
        pa.field("phase", pa.string(), nullable=True),  # "definition" | "test" | null
        pa.field("error_type", pa.string(), nullable=True),
        pa.field("error_message", pa.string(), nullable=True),
        pa.field("exec_time_s", pa.float64(), nullable=False),
    ],
    metadata={"pairloop.schema": f"samples/v{SCHEMA_VERSION}"},
)

MANIFEST_NAME = "manifest.json"
SHARD_DIR = "shards"


class SchemaMismatch(ValueError):
    pass


def check_schema(schema: pa.Schema, where: str) -> None:
    """Fail loudly if `schema` is not ROW_SCHEMA (names and types; metadata ignored)."""
    want = {f.name: f.type for f in ROW_SCHEMA}
    got = {f.name: f.type for f in schema}
    missing = sorted(set(want) - set(got))
    wrong = sorted(n for n in want if n in got and not got[n].equals(want[n]))
    if missing or wrong:
        details = []
        if missing:
            details.append(f"missing columns {missing}")
        if wrong:
            details.append("wrong types " + ", ".join(f"{n}: {got[n]} (want {want[n]})" for n in wrong))
        raise SchemaMismatch(f"{where}: not a pairloop samples shard: {'; '.join(details)}")


def rows_to_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Build a ROW_SCHEMA table from dict rows; a missing or mistyped field is an error naming it."""
    cols = {}
    for f in ROW_SCHEMA:
        vals = [r.get(f.name) for r in rows]
        if not f.nullable:
            bad = [i for i, v in enumerate(vals) if v is None]
            if bad:
                raise ValueError(f"shard row {bad[0]}: required field {f.name!r} is missing")
        cols[f.name] = pa.array(vals, type=f.type)
    return pa.table(cols, schema=ROW_SCHEMA)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local folder or a pyarrow URI (s3://, gs://, file://)."""
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join_uri(uri: str, *parts: str) -> str:
    """A location under `uri`: a local path, or a URI whose query string (e.g. s3 options such as
    `?endpoint_override=host:port&scheme=http`) stays at the end, where pyarrow reads it."""
    if "://" not in uri:
        return os.path.join(uri, *parts)
    base, sep, query = uri.partition("?")
    return posixpath.join(base, *parts) + sep + query


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-safe dict of a config dataclass for manifests, nested configs included (Paths -> str, tuples -> lists)."""

    def clean(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: clean(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, os.PathLike):
            return os.fspath(v)
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        return v

    return clean(cfg)


def identity_dict(cfg: Any) -> dict[str, Any]:
    """config_to_dict without the fields marked `metadata={"identity": False}`: how a run executes, not what it
    computes (train.allocator), so changing them, or adding one, does not make a finished stage look different."""
    keep = {f.name for f in dataclasses.fields(cfg) if f.metadata.get("identity", True)}
    return {k: v for k, v in config_to_dict(cfg).items() if k in keep}


def file_sha256(uri: str | os.PathLike) -> str:
    """sha256 of a file's bytes (a local path or a URI), streamed in 1 MiB reads. The one file hash."""
    fs, path = resolve(os.fspath(uri))
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_files_atomic(root: str, files: dict[str, bytes]) -> dict[str, str]:
    """The one atomic write. Every file of `files` (name -> bytes) lands whole under `root` (a local folder or a
    URI) or not at all: all are written under temporary names first, then each is moved into place (a rename
    locally; copy + delete on object stores), and temporaries are removed whatever happens. Returns name -> location.
    """
    fs, base = resolve(root)
    join = posixpath.join if "://" in root else os.path.join
    fs.create_dir(base, recursive=True)
    tag = uuid.uuid4().hex[:8]
    temps: dict[str, str] = {}
    try:
        for name, data in files.items():
            tmp = join(base, f".{name}.tmp-{tag}")
            with fs.open_output_stream(tmp) as f:
                f.write(data)
            temps[name] = tmp
        for name, tmp in temps.items():
            fs.move(tmp, join(base, name))
    finally:
        for tmp in temps.values():
            if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                fs.delete_file(tmp)
    return {name: join_uri(root, name) for name in files}


def write_bytes_atomic(uri: str, data: bytes) -> str:
    """One file, atomically (write_files_atomic): `uri` is its full location."""
    if "://" in uri:
        base, sep, query = uri.partition("?")
        parent, name = posixpath.split(base)
        parent += sep + query
    else:
        parent, name = os.path.split(os.path.abspath(uri))
    return write_files_atomic(parent, {name: data})[name]


# `ray job submit --working-dir` runs the job's driver in a temporary copy of the upload:
# <ray temp dir>/session_*/runtime_resources/working_dir_files/_ray_pkg_<hash>/
_RAY_WORKING_DIR_COPY = os.path.join("runtime_resources", "working_dir_files")


def ray_working_dir_copy() -> str | None:
    """Why this process runs inside Ray's temporary copy of a job's --working-dir (None: it does not).
    Looks at the current directory and at the job config Ray hands the driver (RAY_JOB_CONFIG_JSON_ENV_VAR)."""
    cwd = os.getcwd()
    if os.sep + _RAY_WORKING_DIR_COPY + os.sep in cwd + os.sep:
        return f"the current directory {cwd} is Ray's temporary copy of the job's --working-dir"
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if raw:
        try:
            working_dir = (json.loads(raw).get("runtime_env") or {}).get("working_dir")
        except (ValueError, AttributeError):  # unreadable: assume the worst (the guard fails closed)
            return "RAY_JOB_CONFIG_JSON_ENV_VAR is set but unreadable, so this may be a Ray job's working-dir copy"
        if working_dir:
            return f"this Ray job runs in a temporary copy of its working_dir {working_dir!r}"
    return None


def check_output_path(field: str, value: str) -> None:
    """Refuse a relative output path when this process runs inside Ray's temporary --working-dir copy: the
    output would land in that copy and vanish with the job. Absolute paths and URIs (s3://...) always pass."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{field} must be a path or URI, got {value!r}")
    if "://" in value or os.path.isabs(os.path.expanduser(value)):
        return
    why = ray_working_dir_copy()
    if why is not None:
        raise ValueError(
            f"{field}={value!r} is a relative path, but {why}: the output would be written into that copy and lost "
            "when the job ends. Give an absolute path on storage that outlives the job (e.g. /mnt/efs/...) or an "
            "s3:// URI"
        )


def parent_uri(uri: str) -> str:
    """The folder holding `uri` (local path or URI; a URI's query string stays at the end)."""
    if "://" not in uri:
        return os.path.dirname(os.path.abspath(uri.rstrip("/\\")))
    base, sep, query = uri.partition("?")
    scheme, _, path = base.partition("://")
    return f"{scheme}://{posixpath.dirname(path.rstrip('/'))}" + sep + query


@dataclass
class Manifest:
    run_id: str
    identity: dict[str, Any]  # what makes two runs "the same run" (model, problems, n, seed, ...)
    units: dict[str, dict[str, Any]] = field(default_factory=dict)  # unit_id -> {"rows": int, "file": str}
    complete: bool = False  # all planned units done
    summary: dict[str, Any] = field(default_factory=dict)
    schema: str = f"samples/v{SCHEMA_VERSION}"

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=1, sort_keys=True)


class ShardStore:
    """Reads and writes one run folder. Writes are atomic; the manifest is written after each unit's shard."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, self.root = resolve(uri)

    def _p(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if "://" in self.uri else os.path.join(self.root, *parts)

    def read_manifest(self) -> Manifest | None:
        path = self._p(MANIFEST_NAME)
        info = self.fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            return None
        with self.fs.open_input_stream(path) as f:
            data = json.loads(f.read().decode())
        if not str(data.get("schema", "")).startswith("samples/"):
            raise ValueError(f"{self.uri}: {MANIFEST_NAME} is not a pairloop samples manifest")
        return Manifest(**data)

    def open_run(self, run_id: str, identity: dict[str, Any]) -> Manifest:
        """Start or resume a run. Refuses a folder that holds a different run (or foreign files)."""
        existing = self.read_manifest()
        if existing is not None:
            if existing.run_id != run_id or existing.identity != identity:
                diff = sorted(
                    k
                    for k in set(existing.identity) | set(identity)
                    if existing.identity.get(k) != identity.get(k)
                )
                raise ValueError(
                    f"output folder {self.uri!r} holds a different run ({existing.run_id!r}; differs in {diff or ['run_id']}); "
                    "choose another output folder or delete it"
                )
            return existing
        info = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True, recursive=False))
        foreign = [i.base_name for i in info if i.base_name not in (SHARD_DIR,)]
        if foreign:
            raise ValueError(f"output folder {self.uri!r} is not empty and has no {MANIFEST_NAME}: {foreign[:5]}")
        self.fs.create_dir(self._p(SHARD_DIR), recursive=True)
        m = Manifest(run_id=run_id, identity=identity)
        self.write_manifest(m)
        return m

    def write_manifest(self, m: Manifest) -> None:
        write_files_atomic(self.uri, {MANIFEST_NAME: m.to_json().encode()})

    def write_unit(self, m: Manifest, unit_id: str, table: pa.Table) -> None:
        """Write one unit's shard, then record it in the manifest (in that order)."""
        check_schema(table.schema, f"unit {unit_id}")
        table = table.cast(ROW_SCHEMA)
        fname = f"{unit_id}.parquet"
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        write_files_atomic(join_uri(self.uri, SHARD_DIR), {fname: sink.getvalue().to_pybytes()})
        m.units[unit_id] = {"rows": table.num_rows, "file": f"{SHARD_DIR}/{fname}"}
        self.write_manifest(m)

    def shard_paths(self) -> list[str]:
        m = self.read_manifest()
        if m is None:
            raise ValueError(f"{self.uri!r}: no {MANIFEST_NAME}; not a pairloop run folder")
        return [self._p(*u["file"].split("/")) for _, u in sorted(m.units.items())]

    def read_table(self, columns: Sequence[str] | None = None) -> pa.Table:
        paths = self.shard_paths()
        if not paths:
            return ROW_SCHEMA.empty_table() if columns is None else ROW_SCHEMA.empty_table().select(list(columns))
        tables = []
        for p in paths:
            t = pq.read_table(p, filesystem=self.fs, columns=list(columns) if columns else None)
            if columns is None:
                check_schema(t.schema, p)
            tables.append(t)
        return pa.concat_tables(tables)


def dataset_files(uris: Iterable[str]) -> list[tuple[pafs.FileSystem, str]]:
    """All complete shard files of several run folders (for pyarrow.dataset streaming)."""
    out = []
    for uri in uris:
        store = ShardStore(uri)
        out.extend((store.fs, p) for p in store.shard_paths())
    return out
