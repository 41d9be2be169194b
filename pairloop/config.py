"""Typed stage configs: a frozen dataclass filled from a YAML file, then `key=value` CLI overrides.

    cfg = load_config(GenConfig, ["--config", "configs/demo.yaml", "gen.n=32"], section="gen")

The YAML file may hold several stages' sections (`gen:`, `pairs:`, `train:`, `eval:`); a stage reads its own
section, or the whole file when the file has no such section. Overrides are `field=value` or `section.field=value`
(overrides for other sections are ignored, so one command line can carry the whole loop's settings).
Values are converted to the field's declared type (PyYAML reads `1e-5` as a string; we don't).
Validation lives in each config's `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

T = TypeVar("T")

# The sections a config file and `section.field=value` overrides may name (the loop's `run:` and one per stage).
SECTIONS = ("run", "engine", "gen", "pairs", "train", "eval")


def _convert(name: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(name, value, arg)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{name}: cannot convert {value!r} to {tp}: {'; '.join(errors)}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        items = [_convert(f"{name}[{i}]", v, inner) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ValueError(f"{name}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_convert(name, k, kt): _convert(f"{name}.{k}", v, vt) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"{name}: expected a bool, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{name}: expected an int, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected an int, got {value!r}") from None
        if f != int(f):
            raise ValueError(f"{name}: expected an int, got {value!r}")
        return int(f)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected a float, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{name}: expected a string, got {value!r}")
        return str(value)
    if isinstance(tp, type) and issubclass(tp, Path):
        return Path(value)
    return value


def build_config(cls: type[T], values: dict[str, Any]) -> T:
    """Instantiate dataclass `cls` from a plain dict, converting each value to its field type."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(fields)} "
            "(with several configs on one command line, write overrides as section.field=value)"
        )
    kwargs = {k: _convert(f"{cls.__name__}.{k}", v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


def parse_overrides(items: Sequence[str]) -> list[tuple[str | None, str, str]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        section, _, field = key.rpartition(".")
        out.append((section or None, field, value))
    return out


def load_config(cls: type[T], argv: Sequence[str], section: str | None = None) -> T:
    """Parse `[--config FILE] [key=value ...]` into `cls`. See the module docstring."""
    argv = list(argv)
    path = None
    rest = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config":
            if i + 1 >= len(argv):
                raise ValueError("--config needs a file path")
            path = argv[i + 1]
            i += 2
            continue
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        elif a.startswith("--") and "=" in a:
            rest.append(a[2:])
        else:
            rest.append(a)
        i += 1
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"--config: no such file {path!r}")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"--config {path}: expected a mapping at top level, got {type(data).__name__}")
        if section is not None and section in data:
            data = data[section] or {}
        elif section is not None:
            names = {f.name for f in dataclasses.fields(cls)}
            data = {k: v for k, v in data.items() if k in names}
        values.update(data)
    for sec, field, value in parse_overrides(rest):
        if sec is not None and sec not in SECTIONS:
            raise ValueError(f"override {sec}.{field}={value!r}: unknown section {sec!r}; known: {', '.join(SECTIONS)}")
        if sec is not None and section is not None and sec != section:
            continue
        values[field] = value
    return build_config(cls, values)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-safe dict of a config dataclass (Paths become strings, tuples lists)."""

    def clean(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        return v

    return {f.name: clean(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
