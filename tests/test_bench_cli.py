"""bench/ scripts that call each other agree on their command lines (no timing here: bench/ measures, tests don't)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("precision", ["float32", "bf16-autocast"])
def test_cpu_dtype_calls_train_speed_with_arguments_it_accepts(precision):
    cpu_dtype, train_speed = load("cpu_dtype"), load("train_speed")
    cmd = cpu_dtype.train_speed_cmd("default", 3, 512, precision, "/tmp/r.json")
    assert Path(cmd[1]) == ROOT / "bench" / "train_speed.py"
    args = train_speed.parser().parse_args(cmd[2:])
    assert args.precision == [precision] and args.variants == ["defaults"] and args.json == "/tmp/r.json"
    assert (args.steps, args.max_length) == (3, 512)


def test_train_speed_refuses_an_unknown_precision(capsys):
    with pytest.raises(SystemExit) as e:
        load("train_speed").parser().parse_args(["--precision", "fp8"])
    assert e.value.code == 2 and "fp8" in capsys.readouterr().err


def test_train_speed_shapes_compare_the_same_pairs_per_step():
    parse = load("train_speed").parse_shapes
    assert parse(["2x2", "1x4", "4X1"], 2) == [(2, 2), (1, 4), (4, 1)]
    assert parse(None, 3) == [(3, 1)]
    for bad in (["2x2", "1x3"], ["2by2"], ["0x4"]):
        with pytest.raises(SystemExit):
            parse(bad, 2)


@pytest.mark.parametrize("argv, field", [(["--scale", "0"], "--scale"), (["--scale", "-1e-3"], "--scale"),
                                         (["--pair-tokens", "10"], "--pair-tokens"), (["--out", "EXISTS"], "--out")])
def test_synthetic_adapter_refuses_bad_arguments_before_writing(argv, field, tmp_path, monkeypatch, capsys):
    """A zero scale is PEFT's no-op adapter (the check would refuse it for the wrong reason); an existing --out would
    mix a new adapter with old files. Exit 2 naming the field, before any model work, and nothing written."""
    out, exists = tmp_path / "synth", argv == ["--out", "EXISTS"]
    if exists:
        out.mkdir()
    monkeypatch.setattr("sys.argv", ["synthetic_adapter.py", "--out", str(out), *([] if exists else argv)])
    with pytest.raises(SystemExit) as e:
        load("synthetic_adapter").main()
    assert e.value.code == 2 and field in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == (["synth"] if exists else [])  # no adapter, no .partial
    assert not exists or not any(out.iterdir())
