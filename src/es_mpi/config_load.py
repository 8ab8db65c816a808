"""Reading a config: YAML files (with `extends`), ``--set key=value`` overrides, type checks
against the dataclass tree of config.py, the fields a resume may change, and the field
descriptions of ``--help-config``."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from .config import Config, ConfigError


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _convert(value: Any, expected: Any, name: str) -> Any:
    """Check one leaf value against its annotated type (int, float, str, bool)."""
    got = type(value).__name__
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif expected is str:
        ok = isinstance(value, str)
    else:  # pragma: no cover - a programming error in this module
        raise TypeError(f"unsupported annotation {expected!r} for {name}")
    if not ok:
        raise ConfigError(
            f"config field '{name}': expected {expected.__name__}, got {got} {value!r}"
        )
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config field '{prefix.rstrip('.') or '<root>'}': expected a mapping")
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in types_:
            raise ConfigError(f"unknown config key '{name}'")
        expected = types_[key]
        if dataclasses.is_dataclass(expected):
            kwargs[key] = _build(expected, value, f"{name}.")
        else:
            kwargs[key] = _convert(value, expected, name)
    return cls(**kwargs)


def _leaf_type(path: list[str]) -> Any:
    """The annotated type of a dotted config field, or None if there is no such leaf."""
    cls: Any = Config
    for part in path:
        if not dataclasses.is_dataclass(cls):
            return None
        types_ = _field_types(cls)
        if part not in types_:
            return None
        cls = types_[part]
    return None if dataclasses.is_dataclass(cls) else cls


def parse_override(item: str) -> tuple[list[str], Any]:
    """'es.sigma=0.01' -> (['es', 'sigma'], 0.01). The value is parsed as YAML, except that a
    string field takes the text as written when YAML would read something else ('{x}')."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got '{item}'")
    path = key.strip().split(".")
    if _leaf_type(path) is str:
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        return path, value if isinstance(value, str) else raw
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"config field '{key}': cannot parse value {raw!r}") from exc
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"unknown config key '{'.'.join(path)}'")
            node = child
        node[path[-1]] = value
    return data


# Fields a resume may change: they do not alter the weights a run produces.
RESUME_SETTABLE = (
    "es.iterations",
    "es.noise_cache_mb",
    "runtime.time_limit_minutes",
    "runtime.stop_margin_seconds",
    "runtime.verify_every",
    "runtime.device",
    "runtime.cuda_graphs",
    "runtime.tensorboard",
    "checkpoint.every",
    "checkpoint.keep",
    "task.eval_every",
)


def apply_resume_overrides(cfg: Config, overrides: list[str]) -> Config:
    """The logged config with the few fields a resume may change, re-validated."""
    for item in overrides:
        path, _ = parse_override(item)
        if ".".join(path) not in RESUME_SETTABLE:
            raise ConfigError(
                f"config field '{'.'.join(path)}' cannot be changed on resume "
                f"(allowed: {', '.join(RESUME_SETTABLE)})"
            )
    return config_from_dict(apply_overrides(cfg.to_dict(), overrides))


def config_from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data, "")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """One config file as a dict; a top-level `extends: other.yaml` (relative to this file)
    loads that file first and lays this one over it, section by section."""
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"config file '{path}' extends itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from exc
    parent = data.pop("extends", None)
    if parent is None:
        return data
    return _lay_over(_read_yaml(path.parent / str(parent), (*seen, path.resolve())), data)


def _lay_over(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        below = merged.get(key)
        both_sections = isinstance(value, dict) and isinstance(below, dict)
        merged[key] = _lay_over(below, value) if both_sections else value
    return merged


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file (and the files it extends) <- overrides, then validation.
    Raises ConfigError."""
    data = _read_yaml(Path(path)) if path is not None else {}
    return config_from_dict(apply_overrides(data, overrides or []))


def describe_fields(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted name, default, docstring) of every leaf field, for --help-config."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    body = ast.parse(inspect.getsource(cls)).body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore
    rows = []
    default = cls()
    for f in dataclasses.fields(cls):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe_fields(type(value), f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", value, docs.get(f.name, "")))
    return rows
