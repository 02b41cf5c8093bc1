"""Typed dataclass configs from TOML: strict loading, ``--set`` overrides and TOML output.

Every config section is a ``@dataclass(kw_only=True)``. Fields may be ``int``, ``float``, ``bool``,
``str``, ``Literal[...]``, ``tuple[int, ...]`` / ``tuple[float, ...]``, ``X | None``, another
config dataclass (a nested section), a tuple of them (an array of tables, ``[[section.key]]``) or
``dict[str, Section]`` (sections by a name the user chooses, ``[prior.middle]``). Loading rejects unknown keys and wrong types with a
:class:`~vqgen.errors.ConfigError` that names the dotted key; ``__post_init__`` checks of values
raise ``ConfigError(field_name, ...)`` and are re-raised here with the full dotted key.

A section whose keys were reorganised lists the old names in a class attribute
``MOVED_KEYS = {"old_key": "new.dotted.key"}`` (relative to the section): an old key is then an
error that names its new place, rather than "unknown key"; ``RETIRED_KEYS = {"old_key": "why"}``
does the same for keys that are gone.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from vqgen.errors import ConfigError

T = TypeVar("T")


SCHEDULE = "schedule"
LOCATION = "location"
ADDED = "added"


def schedule_field(default: Any) -> Any:
    """A config field that only schedules a stage's work (how long, how often to log, checkpoint or
    draw, how many workers) without changing what the finished stage computes up to that point:
    changing it continues the stage from its checkpoint. Every other field defines the result, and
    changing it restarts the stage (and the stages that read its outputs) from scratch."""
    return dataclasses.field(default=default, metadata={SCHEDULE: True})


def location_field(default: Any) -> Any:
    """A config field that says where a run lives (its folder), not what it computes or when: it
    belongs to neither role, so a copied or renamed run folder is still up to date."""
    return dataclasses.field(default=default, metadata={LOCATION: True})


def added_field(default: Any, *, schedule: bool = False) -> Any:
    """A defining field added to a section after runs were made with it: left out of the stage's
    definition while it holds its default (what the code did before the field existed), so that
    upgrading vqgen does not restart finished stages; any other value defines the result as a
    plain field does. ``schedule=True``: a scheduling field added so (left out of the schedule at
    its default, so that finished stages stay up to date rather than continue)."""
    return dataclasses.field(default=default, metadata={ADDED: True, SCHEDULE: schedule})


def switch_field(default: bool) -> Any:
    """Whether the pipeline runs a stage at all (``classifier.enabled``): neither defines nor
    schedules its result, so a stage trained with ``vqgen stage`` while switched off, or switched
    off and on again, is still up to date."""
    return dataclasses.field(default=default, metadata={LOCATION: True})


def split_by_role(cfg: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(defining, scheduling)``: the plain dicts of ``cfg``'s fields split by :func:`schedule_field`,
    nested sections split recursively (a section appears in both when it has fields of both roles)."""
    defining: dict[str, Any] = {}
    scheduling: dict[str, Any] = {}
    if _is_section_dict(cfg):
        for name, value in cfg.items():
            sub_def, sub_sched = split_by_role(value)
            if sub_def:
                defining[name] = sub_def
            if sub_sched:
                scheduling[name] = sub_sched
        return defining, scheduling
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) or _is_section_dict(value):
            sub_def, sub_sched = split_by_role(value)
            if sub_def:
                defining[f.name] = sub_def
            if sub_sched:
                scheduling[f.name] = sub_sched
        elif f.metadata.get(ADDED) and value == _default(f):
            continue
        elif value is not None and not f.metadata.get(LOCATION):
            target = scheduling if f.metadata.get(SCHEDULE) else defining
            target[f.name] = _plain(value)
    return defining, scheduling


def _is_section_dict(value: Any) -> bool:
    """A ``dict[str, Section]`` field's value: sections by name (``prior.top``, ``prior.bottom``)."""
    return isinstance(value, dict) and all(dataclasses.is_dataclass(v) for v in value.values())


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _plain(value: Any) -> Any:
    """A field's value as TOML-friendly data: tuples as lists, sections in them as dicts."""
    if isinstance(value, tuple):
        return [to_dict(v) if dataclasses.is_dataclass(v) else v for v in value]
    return value


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int→float, list→tuple)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(key, f"expected one of {list(choices)}, got {value!r}")
        return value
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(key, f"expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        key_type, value_type = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a table (section), got {value!r}")
        return {_coerce(k, key_type, key): _coerce(v, value_type, _join(key, k)) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a table (section), got {value!r}")
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected bool (true/false), got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected str, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported config annotation {tp!r}")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build the dataclass ``cls`` from a (TOML) dict; unknown keys and wrong types name the key."""
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"expected a table (section), got {data!r}")
    fields = _field_types(cls)
    unknown = sorted(set(data) - set(fields))
    moved, retired = getattr(cls, "MOVED_KEYS", {}), getattr(cls, "RETIRED_KEYS", {})
    for key in unknown:
        if key in moved:
            raise ConfigError(_join(prefix, key), f"has moved: it is now {_join(prefix, moved[key])}")
        if key in retired:
            raise ConfigError(_join(prefix, key), retired[key])
    if unknown:
        raise ConfigError(
            _join(prefix, unknown[0]),
            f"unknown key (known keys of [{prefix or 'top level'}]: {', '.join(sorted(fields))})",
        )
    kwargs = {name: _coerce(value, fields[name], _join(prefix, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        # __post_init__ names the field; give it its full dotted path.
        if err.key and not err.key.startswith(prefix + ".") and prefix:
            raise ConfigError(_join(prefix, err.key), str(err)[len(err.key) + 2 :]) from None
        raise


def _parse_override_value(text: str) -> Any:
    """Parse the right-hand side of ``--set key=value`` as a TOML value; bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to a raw config dict (before typed loading).

    Values are parsed as TOML (``3e-4``, ``true``, ``[32, 32]``, ``"text"``); a bare word is a string.
    Key validity and types are then checked by :func:`from_dict` like any other key.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override must look like section.key=value")
        dotted, text = item.split("=", 1)
        dotted = dotted.strip()
        parts = dotted.split(".")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(dotted, f"{part!r} is a value, not a section")
            node = child
        node[parts[-1]] = _parse_override_value(text.strip())
    return data


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass → plain dict of TOML-friendly values (tuples become lists, None is dropped)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value)
        elif _is_section_dict(value):
            out[f.name] = {name: to_dict(section) for name, section in value.items()}
        elif value is not None:
            out[f.name] = _plain(value)
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _is_table_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Write a nested dict as TOML: a table's plain keys under ``[prefix]``, then its sub-tables
    (a list of tables as an array of tables, ``[[prefix.key]]``)."""
    plain = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict) and not _is_table_list(v)]
    chunks = [(f"[{prefix}]\n" if prefix else "") + "\n".join(plain)] if plain else []
    for key, value in data.items():
        if _is_table_list(value):
            chunks += [f"[[{_join(prefix, key)}]]\n" + "\n".join(f"{k} = {_toml_value(v)}" for k, v in item.items())
                       for item in value]
    chunks += [to_toml(v, _join(prefix, k)) for k, v in data.items() if isinstance(v, dict)]
    return "\n\n".join(c for c in chunks if c) + ("" if prefix else "\n")


def loads_toml(text: str) -> dict[str, Any]:
    return tomllib.loads(text)


def load_toml(path: str) -> dict[str, Any]:
    """The tables of the TOML file ``path``; a ConfigError naming the path when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("", f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError("", f"config path is a directory, not a TOML file: {path}") from None
    except PermissionError:
        raise ConfigError("", f"config file is not readable (permission denied): {path}") from None
    except OSError as err:  # a device error, a name too long, ...: still the user's path to fix
        raise ConfigError("", f"cannot read config file {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:  # TOML must be UTF-8; tomllib raises this for other bytes
        raise ConfigError("", f"{path} is not valid TOML (not UTF-8 text): {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError("", f"{path} is not valid TOML: {err}") from None
