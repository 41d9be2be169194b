"""The one config parser: a YAML file of sections, then `section.field=value` overrides, into typed dataclasses.

    sections = read_sections(["--config", "configs/demo.yaml", "gen.n=32", "gen.sampling.temperature=0.7"])
    gen = build_config(GenConfig, sections.get("gen", {}), "gen")

A config file holds one mapping per section (`run:`, `engine:`, `gen:`, `pairs:`, `train:`, `eval:`). A stage's
config may nest typed sub-configs (`gen.sampling`, `eval.execution`): a nested mapping fills them, starting from the
field's own default, so `eval.sampling.top_p=0.9` keeps eval's default temperature. Overrides name their section;
single-stage commands (`pairloop gen n=32`) may leave out their own. `--config=FILE` and `--config FILE` are the same.
Values are converted to the declared field type (PyYAML reads `1e-5` as a string; we don't); an unknown section or
field is an error naming it, never ignored. Validation of values lives in each config's `__post_init__`.
Stages never call this module: the CLI (pairloop/cli.py) does, and hands each stage its typed config.
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
SECTIONS = ("run", "engine", "gen", "pairs", "train", "eval", "arms")


def split_argv(argv: Sequence[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """`[--config FILE | --config=FILE] [key=value | --key=value ...]` -> (file, [(dotted key, raw value)])."""
    path: str | None = None
    overrides: list[tuple[str, str]] = []
    items = list(argv)
    i = 0
    while i < len(items):
        a = items[i]
        if a == "--config" or a.startswith("--config="):
            if a == "--config":
                if i + 1 >= len(items):
                    raise ValueError("--config needs a file path")
                value, i = items[i + 1], i + 2
            else:
                value, i = a.split("=", 1)[1], i + 1
            if path is not None:
                raise ValueError(f"--config given twice ({path!r} and {value!r}); merge them into one file")
            if not value:
                raise ValueError("--config needs a file path")
            path = value
            continue
        item = a[2:] if a.startswith("--") else a
        if "=" not in item:
            raise ValueError(f"argument {a!r} is not of the form section.field=value")
        key, value = item.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ValueError(f"argument {a!r}: malformed key {key!r}")
        overrides.append((key, value))
        i += 1
    return path, overrides


def read_file(path: str) -> dict[str, dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--config: no such file {path!r}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of sections at top level, got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in SECTIONS)
    if unknown:
        raise ValueError(f"--config {path}: unknown section(s) {unknown}; known: {', '.join(SECTIONS)}")
    out: dict[str, dict[str, Any]] = {}
    for name, body in data.items():
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ValueError(f"--config {path}: section {name!r} must be a mapping, got {body!r}")
        out[name] = body
    return out


def read_sections(argv: Sequence[str], default_section: str | None = None) -> dict[str, dict[str, Any]]:
    """Every section's raw values: the file's, then the overrides on top (nested keys become nested mappings).

    `default_section` (a single-stage command's own) is the section of overrides that name none; without it such an
    override is an error.
    """
    path, overrides = split_argv(argv)
    sections = read_file(path) if path is not None else {}
    sections = {k: dict(v) for k, v in sections.items()}
    for key, value in overrides:
        parts = key.split(".")
        if parts[0] in SECTIONS and len(parts) > 1:
            sec, rest = parts[0], parts[1:]
        elif len(parts) > 1 and parts[0] not in SECTIONS and default_section is None:
            raise ValueError(f"override {key}={value!r}: unknown section {parts[0]!r}; known: {', '.join(SECTIONS)}")
        elif default_section is None:
            raise ValueError(f"override {key}={value!r} needs a section, e.g. gen.{key}={value}")
        else:
            sec, rest = default_section, parts
        node = sections.setdefault(sec, {})
        for j, part in enumerate(rest[:-1]):
            child = node.get(part)
            if child is None or not isinstance(child, dict):
                if child is not None:
                    raise ValueError(f"override {key}={value!r}: {sec}.{'.'.join(rest[: j + 1])} is not a section")
                child = node[part] = {}
            node = child
        node[rest[-1]] = value
    return sections


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


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
            value = _yaml_value(name, value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        items = [_convert(f"{name}[{i}]", v, inner) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if isinstance(value, str):
            value = _yaml_value(name, value)
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
        if f != f or f in (float("inf"), float("-inf")) or f != int(f):
            raise ValueError(f"{name}: expected an int, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{name}: expected a float, got {value!r}")
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


def _yaml_value(name: str, text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ValueError(f"{name}: cannot parse {text!r}") from None


def build_config(cls: type[T], values: dict[str, Any] | T | None = None, where: str | None = None,
                 base: T | None = None) -> T:
    """Instantiate dataclass `cls` from a plain mapping, converting each value to its field type.

    Fields typed as another config dataclass take a nested mapping, applied on top of `base`'s value (or the
    field's default), so a partial sub-section keeps the defaults it does not name. `where` names the section in
    error messages (e.g. "gen" -> "gen.sampling.top_p: expected a float").
    """
    where = where or cls.__name__
    if isinstance(values, cls):
        return values
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for k, v in values.items():
        tp = hints[k]
        if _is_config(tp):
            current = getattr(base, k) if base is not None else _field_default(fields[k])
            if isinstance(v, tp):
                kwargs[k] = v
                continue
            if not isinstance(v, dict):
                raise ValueError(f"{where}.{k}: expected a mapping of {tp.__name__} fields, got {v!r}")
            kwargs[k] = build_config(tp, v, f"{where}.{k}", base=current)
        else:
            kwargs[k] = _convert(f"{where}.{k}", v, tp)
    if base is not None:
        return dataclasses.replace(base, **kwargs)
    return cls(**kwargs)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None
