"""Typed run configuration: dataclass schemas loaded from YAML plus dotted ``key=value`` overrides.

The loader is generic over dataclasses, so pretraining and finetuning share it::

    cfg = load_config(PretrainConfig, "configs/pretrain/convnextv2_base.yaml", ["optim.blr=2e-4"])

Strict by design: an unknown key, a value of the wrong type, or a value that a schema's
``validate()`` rejects raises :class:`ConfigError` naming the dotted key, before any data or model
is touched. YAML files hold deltas from the schema defaults. A schema is a (nested) dataclass
whose fields use ``bool``, ``int``, ``float``, ``str``, ``Literal[...]``, ``X | None``,
``tuple[...]``, ``list[X]``, ``dict[str, X]`` or another dataclass; a dataclass may define
``validate(self)`` that raises ``ConfigError(field_name, message)`` (keys relative to itself).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import subprocess
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem, printed as one line: ``<dotted.key>: <message>``."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)

    def under(self, prefix: str) -> ConfigError:
        """The same error with ``prefix.`` in front of its key."""
        return ConfigError(_join(prefix, self.key) if self.key else prefix, self.message)


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``) and rejects duplicate keys."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        duplicates = sorted({str(k) for k in keys if keys.count(k) > 1})
        if duplicates:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key(s) {duplicates}", node.start_mark)
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d[\d_]*|\d)(?:[eE][-+]?\d+)$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML text with the strict loader; ConfigError on a syntax error."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise ConfigError(source, f"invalid YAML: {' '.join(str(e).split())}") from None


def load_config(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build and validate a ``schema`` instance from an optional YAML file and ``key=value`` overrides.

    Raises:
        ConfigError: missing file, bad YAML, unknown key, wrong type or a value ``validate`` rejects.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("--config", f"file not found: {path}")
        data = parse_yaml(path.read_text(), str(path)) or {}
        if not isinstance(data, dict):
            raise ConfigError(str(path), "the top level must be a mapping of sections")
    for item in overrides:
        apply_override(data, item)
    return build_dataclass(schema, data)


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in the nested dict ``data``; the value is parsed as YAML (``key=`` means null)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(item, "an override must look like section.key=value")
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(".".join(parts[: i + 1]), "is a value, not a section")
    node[parts[-1]] = parse_yaml(raw, key) if raw.strip() else None


def build_dataclass(cls: type[T], data: Any, key: str = "") -> T:
    """Recursively build ``cls`` from a mapping, type-checking every value and calling ``validate()``."""
    if not isinstance(data, dict):
        raise ConfigError(key, f"expected a mapping of {cls.__name__} fields, got {_describe(data)}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for name in data:
        if name not in names:
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f" (did you mean {_join(key, close[0])!r}?)" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(_join(key, str(name)), f"unknown key{hint}")
    values = {}
    for name in names:
        if name in data:
            values[name] = coerce(hints[name], data[name], _join(key, name))
        elif dataclasses.is_dataclass(hints[name]):
            values[name] = build_dataclass(hints[name], {}, _join(key, name))
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as e:
            raise (e.under(key) if key else e) from None
    return obj


def coerce(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int -> float, list -> tuple)."""
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(option, value, key)
            except ConfigError:
                continue
    elif origin is Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise ConfigError(key, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
    elif origin in (list, tuple):
        return _coerce_sequence(tp, value, key)
    elif origin is dict:
        if isinstance(value, dict):
            return {str(k): coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    elif tp is float and type(value) in (int, float):
        return float(value)
    elif tp in (int, bool, str) and type(value) is tp or tp is Any:
        return value
    raise ConfigError(key, f"expected {_type_name(tp)}, got {_describe(value)}")


def _coerce_sequence(tp: Any, value: Any, key: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(key, f"expected {_type_name(tp)}, got {_describe(value)}")
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            raise ConfigError(key, f"expected {len(args)} values, got {len(value)}")
        return tuple(coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    items = [coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), ready for YAML or JSON."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def flatten_config(cfg: Any) -> dict[str, int | float | str | bool]:
    """``{"optim.blr": 0.00015, ...}``: scalars kept, None and sequences as strings (for trackers)."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, _join(prefix, k))
            else:
                flat[_join(prefix, k)] = v if isinstance(v, (int, float, str, bool)) else str(v)

    walk(config_to_dict(cfg), "")
    return flat


def save_config(cfg: Any, run_dir: str | Path, version: str) -> None:
    """Write ``config.yaml`` (loadable again with ``--config``) and ``run_info.json`` into ``run_dir``."""
    run_dir = Path(run_dir)
    header = f"# resolved configuration written by fcmae {version}\n"
    write_text_atomic(run_dir / "config.yaml", header + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    info = {"fcmae_version": version, "git_commit": _git_commit(), "config": type(cfg).__name__}
    write_text_atomic(run_dir / "run_info.json", json.dumps(info, indent=2) + "\n")


def check_writable_dir(path: str | Path, key: str) -> None:
    """ConfigError unless ``path`` is, or can be created as, a directory this process may write to."""
    path = Path(path).absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(key, f"cannot create {path}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(key, f"{probe} is not writable")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary sibling and rename it over ``path`` (readers never see half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _type_name(tp: Any) -> str:
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"
