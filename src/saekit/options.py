"""saekit's config convention: every option is declared once, as a dataclass field.

An options dataclass (``SAEConfig``, ``TrainConfig``, ``EvalConfig``, ...) subclasses
:class:`Options` and declares each field with :func:`option`: its default, its help text and
the values it takes. Everything else is derived from that one declaration:

* **validation**: every assignment (the constructor, ``dataclasses.replace``, ``cfg.k = 3``)
  checks the value's type against the annotation (``int``, ``float``, ``bool``, ``str``,
  ``list[T]``, ``dict``, ``X | None``; JSON numbers are accepted where they fit, strings never
  stand in for numbers or booleans) and the declared constraints (``ge``/``gt``/``le``/``lt``,
  ``choices``, ``nonempty``, a ``check`` function), whether it came from a flag, a JSON
  file or Python; cross-field rules go in :meth:`Options.check`. A bad value raises
  :class:`~saekit.errors.ConfigError` naming the field, the value and the fix;
* **CLI flags**: :func:`saekit.cli.add_dataclass_args` makes each field a ``--flag`` with
  its type, choices, help and default;
* **JSON**: :func:`to_dict` / :func:`from_dict` (unknown keys refused, every value checked);
* **docs**: :func:`describe`.

Per-field facts beyond the value are metadata too, read with :func:`fields_where`:
``resumable`` (may change when a training run resumes), ``flag`` (the CLI name when it is
not the field's own), ``cli=False`` (no flag), ``cli_default`` (the command's default where
it differs from the library's), ``positional``, ``repeat`` (a repeatable flag), ``switch``
(a ``--flag`` with no value that sets True), ``absent`` (the value a config written before
the field existed meant, when it is not today's default: a checkpoint without the field
resumes only under that value).

A subclass with its own ``__post_init__`` calls ``super().__post_init__()``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from saekit.errors import ConfigError

C = TypeVar("C")

#: metadata keys :func:`option` understands (anything else is refused, to catch typos)
METADATA_KEYS = frozenset(
    {
        "help",
        "choices",
        "ge",
        "gt",
        "le",
        "lt",
        "nonempty",
        "finite",
        "check",
        "resumable",
        "flag",
        "cli",
        "cli_default",
        "positional",
        "repeat",
        "switch",
        "metavar",
        "nargs",
        "absent",
    }
)


def option(default: Any = dataclasses.MISSING, help: str = "", **meta: Any) -> Any:
    """A dataclass field with its help text and constraints (see the module docstring).

    ``default``: the default value (a list or dict is copied per instance); omit it for a
    required field. ``meta``: ``choices`` (a sequence, or a function returning one, for
    registries), ``ge``/``gt``/``le``/``lt`` (bounds), ``nonempty``, ``finite`` (floats;
    default True), ``check`` (``fn(value) -> str | None``: a problem description, or None),
    and the CLI / resume metadata listed in the module docstring.
    """
    unknown = set(meta) - METADATA_KEYS
    if unknown:
        raise TypeError(f"option(): unknown metadata {sorted(unknown)}")
    md = {"help": help, **meta}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=_copier(default), metadata=md)
    return dataclasses.field(default=default, metadata=md)


def _copier(value: Any) -> Callable[[], Any]:
    import copy

    return lambda: copy.deepcopy(value)


class Options:
    """Base class of option dataclasses: every field is validated when it is assigned."""

    def __setattr__(self, name: str, value: Any) -> None:
        f = _field_map(type(self)).get(name)
        if f is not None:
            value = check_value(type(self), f, value)
        object.__setattr__(self, name, value)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Cross-field rules; raise :class:`ConfigError` (override, calling super)."""


# ---------------------------------------------------------------------- field inspection
def _field_map(cls: type) -> dict[str, dataclasses.Field]:
    cache = cls.__dict__.get("_options_fields")
    if cache is None:
        if not dataclasses.is_dataclass(cls):
            return {}  # during the dataclass decorator itself
        cache = {f.name: f for f in dataclasses.fields(cls)}
        type.__setattr__(cls, "_options_fields", cache)
    return cache


def _hints(cls: type) -> dict[str, Any]:
    cache = cls.__dict__.get("_options_hints")
    if cache is None:
        try:
            cache = typing.get_type_hints(cls)
        except Exception:  # an annotation that cannot be resolved: fall back to the raw one
            cache = {f.name: f.type for f in dataclasses.fields(cls)}
        type.__setattr__(cls, "_options_hints", cache)
    return cache


def field_type(cls: type, f: dataclasses.Field) -> Any:
    """The resolved annotation of ``f`` (``Any`` when it is unresolvable)."""
    tp = _hints(cls).get(f.name, Any)
    return Any if isinstance(tp, str) else tp


def default_of(f: dataclasses.Field) -> Any:
    """The field's default (a fresh copy for factories); MISSING when it has none."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def fields_where(cls: type, key: str) -> tuple[str, ...]:
    """Names of ``cls``'s fields whose metadata ``key`` is truthy (e.g. ``"resumable"``)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get(key))


def cli_defaults(cls: type) -> dict[str, Any]:
    """``{field: cli_default}`` for the fields of ``cls`` that declare one."""
    return {
        f.name: f.metadata["cli_default"]
        for f in dataclasses.fields(cls)
        if "cli_default" in f.metadata
    }


def flag_name(f: dataclasses.Field, prefix: str = "") -> str:
    """The CLI flag of a field, ``--[prefix-]name-with-dashes``."""
    base = f.metadata.get("flag") or f.name.replace("_", "-")
    return "--" + (prefix + "-" if prefix else "") + base


def choices_of(f: dataclasses.Field) -> tuple | None:
    """The allowed values of a field (calling a registry function), or None."""
    ch = f.metadata.get("choices")
    if ch is None:
        return None
    return tuple(ch() if callable(ch) else ch)


# ---------------------------------------------------------------------- validation
def _where(owner: type | str, name: str) -> str:
    return f"{owner if isinstance(owner, str) else owner.__name__}.{name}"


def _fail(owner: type | str, f: dataclasses.Field, value: Any, problem: str, fix: str) -> None:
    help_ = f.metadata.get("help", "")
    about = f" ({help_})" if help_ else ""
    raise ConfigError(f"{_where(owner, f.name)} = {value!r} {problem}{about}; {fix}")


def _kind(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is list or origin is list:
        args = typing.get_args(tp)
        return (
            f"a list of {_kind(args[0]).removeprefix('a ').removeprefix('an ')}s"
            if args
            else "a list"
        )
    if tp is dict or origin is dict:
        return "an object (JSON {...})"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.problem, self.fix = problem, fix


def _coerce(tp: Any, value: Any) -> Any:
    """``value`` as type ``tp`` (lossless conversions only), else :class:`_Mismatch`."""
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value)
            except _Mismatch as e:
                errors.append(e)
        raise errors[0] if errors else _Mismatch("must not be None", "give a value")
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise _Mismatch("is not allowed", f"use one of {list(typing.get_args(tp))}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if type(value).__name__ == "bool_":  # numpy.bool_
            return bool(value)
        raise _Mismatch(f"must be true or false, not {_typename(value)}", _fix_for(tp, value))
    if tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if (
            isinstance(value, float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value.is_integer()
        ):
            return int(value)
        raise _Mismatch(f"must be an integer, not {_typename(value)}", _fix_for(tp, value))
    if tp is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch(f"must be a number, not {_typename(value)}", _fix_for(tp, value))
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch(f"must be a string, not {_typename(value)}", _fix_for(tp, value))
    if tp is list or origin is list:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise _Mismatch(f"must be {_kind(tp)}, not {_typename(value)}", _fix_for(tp, value))
        (elem,) = typing.get_args(tp) or (Any,)
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_coerce(elem, v))
            except _Mismatch as e:
                raise _Mismatch(f"item {i} ({v!r}) {e.problem}", e.fix) from None
        return out
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch(f"must be {_kind(tp)}, not {_typename(value)}", _fix_for(tp, value))
        args = typing.get_args(tp)
        if not args:
            return dict(value)
        return {_coerce(args[0], k): _coerce(args[1], v) for k, v in value.items()}
    if isinstance(tp, type):
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            return from_dict(tp, value)
        if isinstance(value, tp):
            return value
        raise _Mismatch(f"must be {_kind(tp)}, not {_typename(value)}", f"give {_kind(tp)}")
    return value  # an annotation this module does not know: accepted as is


def _typename(value: Any) -> str:
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    if value is None:
        return "null"
    return type(value).__name__


def _fix_for(tp: Any, value: Any) -> str:
    """How to write a value of type ``tp``, given the wrong ``value``."""
    import json

    if tp is bool:
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return f"write {value.strip().lower()} without quotes"
        return "use true or false (JSON) / True or False (Python)"
    if isinstance(value, str) and tp in (int, float):
        return "write the number without quotes"
    if tp is int:
        return "give a whole number"
    if tp is float:
        return "give a number"
    if (tp is list or typing.get_origin(tp) is list) and isinstance(value, str):
        return f"write it as a list: {json.dumps([value])}"
    return f"give {_kind(tp)}"


def check_value(owner: type, f: dataclasses.Field, value: Any) -> Any:
    """``value`` checked (and losslessly converted) for field ``f`` of ``owner``.

    Raises :class:`ConfigError` naming ``Owner.field``, the value and the fix.
    """
    md = f.metadata
    tp = field_type(owner, f)
    try:
        value = _coerce(tp, value)
    except _Mismatch as e:
        _fail(owner, f, value, e.problem, e.fix)
    if value is None:
        return value
    if isinstance(value, float) and md.get("finite", True) and not math.isfinite(value):
        _fail(owner, f, value, "must be a finite number", _range_fix(f))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for key, ok, word in (
            ("ge", lambda v, b: v >= b, ">="),
            ("gt", lambda v, b: v > b, ">"),
            ("le", lambda v, b: v <= b, "<="),
            ("lt", lambda v, b: v < b, "<"),
        ):
            bound = md.get(key)
            if bound is not None and not ok(value, bound):
                _fail(owner, f, value, f"must be {word} {bound}", _range_fix(f))
    ch = choices_of(f)
    if ch is not None:
        items = value if isinstance(value, list) else [value]
        bad = [v for v in items if v not in ch]
        if bad:
            near = difflib.get_close_matches(str(bad[0]), [str(c) for c in ch], n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            what = "is" if bad[0] is value else f"has {bad[0]!r}, which is"
            fix = "pick one of them"
            if callable(f.metadata.get("choices")):
                fix += " (a name registered by your own module needs that module imported first)"
            _fail(owner, f, value, f"{what} not one of {list(ch)}{hint}", fix)
    if md.get("nonempty") and isinstance(value, (str, list, dict)) and len(value) == 0:
        _fail(owner, f, value, "must not be empty", f"give {_kind(tp)} with at least one item")
    fn = md.get("check")
    if fn is not None:
        problem = fn(value)
        if problem:
            _fail(owner, f, value, problem, f"fix {f.name}")
    return value


def _range_fix(f: dataclasses.Field) -> str:
    parts = []
    for key, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if f.metadata.get(key) is not None:
            parts.append(f"{word} {f.metadata[key]}")
    want = " and ".join(parts) if parts else "finite"
    return f"set {f.name} ({flag_name(f)}) to a value {want}"


def validate(obj: Any) -> Any:
    """Check every field of the dataclass ``obj`` (and its :meth:`Options.check`); return it.

    For plain dataclasses (not :class:`Options`) and after in-place edits of list / dict
    fields, which assignment-time validation cannot see.
    """
    cls = type(obj)
    for f in dataclasses.fields(cls):
        v = check_value(cls, f, getattr(obj, f.name))
        object.__setattr__(obj, f.name, v)
    check = getattr(obj, "check", None)
    if callable(check):
        check()
    return obj


def fail(owner: type | str, name: str, value: Any, problem: str, fix: str) -> None:
    """Raise a :class:`ConfigError` for a cross-field rule, in the same form as field checks."""
    raise ConfigError(f"{_where(owner, name)} = {value!r} {problem}; {fix}")


# ---------------------------------------------------------------------- JSON form
def to_dict(obj: Any) -> dict:
    """Dataclass -> plain JSON-able dict."""
    return dataclasses.asdict(obj)


def check_fields(cls: type, data: Any, where: str = "") -> dict[str, Any]:
    """Each key of ``data`` a field of ``cls`` and each value valid for it (no cross-field
    rules): the checked values. ``where`` prefixes error messages."""
    pre = f"{where}: " if where else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{pre}{cls.__name__} must be a JSON object, not {_typename(data)}")
    fmap = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fmap]
    if unknown:
        hints = []
        for k in unknown:
            near = difflib.get_close_matches(str(k), list(fmap), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
        known = ", ".join(fmap) or "(none)"
        raise ConfigError(
            f"{pre}unknown {cls.__name__} field(s) {', '.join(hints)}; known options: {known}"
        )
    try:
        return {k: check_value(cls, fmap[k], v) for k, v in data.items()}
    except ConfigError as e:
        if not pre:
            raise
        raise ConfigError(f"{pre}{e}") from None


def from_dict(cls: type[C], data: Any, where: str = "") -> C:
    """Plain dict (e.g. a JSON section) -> ``cls``, every value validated.

    Unknown keys and missing required fields are refused. ``where`` (a file, a section)
    prefixes error messages.
    """
    pre = f"{where}: " if where else ""
    checked = check_fields(cls, data, where)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    missing = [
        f.name for f in fields if default_of(f) is dataclasses.MISSING and f.name not in data
    ]
    if missing:
        raise ConfigError(f"{pre}{cls.__name__} needs {', '.join(missing)}")
    try:
        obj = cls(**checked)
        if not isinstance(obj, Options):
            validate(obj)
    except ConfigError as e:
        if not pre:
            raise
        raise ConfigError(f"{pre}{e}") from None
    return obj


# ---------------------------------------------------------------------- docs
def describe(cls: type) -> str:
    """A markdown table of ``cls``'s fields: name, type, default, constraints, help."""
    rows = ["| field | type | default | allowed | meaning |", "| --- | --- | --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        tp = field_type(cls, f)
        d = default_of(f)
        default = "required" if d is dataclasses.MISSING else repr(d)
        rows.append(
            f"| `{f.name}` | {_kind(tp)} | `{default}` | {constraints(f)} "
            f"| {f.metadata.get('help', '')} |"
        )
    return "\n".join(rows)


def constraints(f: dataclasses.Field) -> str:
    """The declared constraints of ``f`` in words (``>= 1``, ``one of [...]``)."""
    md = f.metadata
    bounds = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
    parts = [f"{w} {md[k]}" for k, w in bounds if md.get(k) is not None]
    if md.get("choices") is not None and not callable(md["choices"]):
        parts.append("one of " + ", ".join(map(str, md["choices"])))
    elif md.get("choices") is not None:
        parts.append("a registered name")
    if md.get("nonempty"):
        parts.append("not empty")
    return ", ".join(parts)


__all__ = [
    "ConfigError",
    "Options",
    "check_fields",
    "check_value",
    "cli_defaults",
    "choices_of",
    "default_of",
    "describe",
    "fail",
    "field_type",
    "fields_where",
    "flag_name",
    "from_dict",
    "option",
    "to_dict",
    "validate",
]
