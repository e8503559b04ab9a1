"""Command-line flags generated from dataclass configs: one declaration per setting.

A config dataclass declares each setting once, with its type, default and a docstring right under
the field (the convention of every config in polysae). :func:`add_config_flags` turns those fields
into argparse flags (``--field-name``, help text from the docstring, default shown), and
:func:`config_from_args` builds the config back from the parsed namespace, so validation stays in
the config's ``__post_init__``.

A config nested in another (``ReplicateConfig.train: TrainConfig``) gets its flags under a dotted
prefix (``--train.lr``), which keeps names unambiguous: ``--harvest.tokens`` (tokens to harvest)
cannot be confused with ``--train.tokens`` (rows to train on). A field typed ``dict`` whose
metadata names a config class (``field(metadata={"flags_from": SAEConfig})``) holds *overrides* of
that class: only the flags a user passes end up in the dict.

Supported field types: ``bool`` (``--x`` / ``--no-x``), ``int``, ``float``, ``str``, ``Literal``
(choices), their ``Optional`` forms, and ``tuple[T, ...]`` / ``list[T]`` (any number of values,
space- or comma-separated: ``--ks 1 2 5`` = ``--ks 1,2,5``; ``--ks ''`` is empty) and
``tuple[T, T, T]`` (exactly three values). A field's ``metadata={"choices": (...)}`` restricts a
``str`` field (or each element of a sequence) to those values. Anything else raises ``TypeError``
when the parser is built, so an unsupported field is a bug caught by the tests, not a silently
missing flag.

Old spellings of a flag stay usable as ``aliases``: they parse to the same field, print a one-line
deprecation note on stderr, and are what :func:`config_error` names when the config rejects the
value, so an error always names the flag the user typed.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import sys
import textwrap
import types
import typing
from typing import Any

from polysae.config import check_values

_SEP = "."
_TYPED = "_typed_flags"  # namespace attribute: {dest: the option string the user typed}


def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` read from the class source (the string right under each field)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(src).body[0].body  # type: ignore[attr-defined]
        for a, b in zip(body, body[1:]):
            if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name)
                    and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)
                    and isinstance(b.value.value, str)):
                docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def flag_name(name: str, prefix: str = "") -> str:
    """``probe_ctx`` under ``eval`` -> ``--eval.probe-ctx``."""
    return "--" + (prefix + _SEP if prefix else "") + name.replace("_", "-")


def _dest(name: str, prefix: str) -> str:
    return (prefix + _SEP if prefix else "") + name


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _kind(tp: Any, choices: tuple | None = None) -> dict[str, Any]:
    """argparse keyword arguments for a field type (without help/default)."""
    tp, _ = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if tp is bool:
        return {"action": _Bool}
    if tp in (int, float, str):
        return {"type": tp, **({"choices": tuple(choices)} if choices else {})}
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        return {"type": type(choices[0]), "choices": choices}
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis or origin is list:
            kw = _kind(args[0], choices)
            if "type" not in kw:
                raise TypeError(f"unsupported element type {args[0]}")
            return {"type": _split(kw["type"], kw.get("choices")), "nargs": "*",
                    "action": _Seq}
        if origin is tuple and args and all(a == args[0] for a in args):
            kw = _kind(args[0], choices)
            if "type" not in kw:
                raise TypeError(f"unsupported element type {args[0]}")
            return {**kw, "nargs": len(args)}
        raise TypeError(f"unsupported tuple type {tp}")
    raise TypeError(f"unsupported field type {tp}")


def _split(elem: Any, choices: tuple | None) -> Any:
    """argparse ``type`` of one token of a sequence flag: comma-separated values of ``elem``."""
    def parse(text: str) -> list:
        vals = [elem(v.strip()) for v in text.split(",") if v.strip()]
        bad = [v for v in vals if choices and v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(
                f"invalid choice: {bad[0]!r} (choose from {', '.join(map(repr, choices))})")
        return vals

    parse.__name__ = elem.__name__  # argparse says "invalid int value: '1,x'"
    return parse


class _Typed(argparse.Action):
    """Records the option string used (for error messages) and notes deprecated spellings."""

    def __init__(self, *args: Any, deprecated: tuple[str, ...] = (), **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.deprecated = deprecated

    def record(self, namespace: argparse.Namespace, option_string: str | None) -> None:
        if option_string is None:
            return
        if not hasattr(namespace, _TYPED):
            setattr(namespace, _TYPED, {})
        getattr(namespace, _TYPED)[self.dest] = option_string
        if option_string in self.deprecated:
            neg = isinstance(self, _Bool) and option_string.startswith("--no-")
            use = self.option_strings[1 if neg else 0]
            print(f"polysae: {option_string} is deprecated, use {use}", file=sys.stderr)


class _Store(_Typed):
    """Stores the parsed value (what argparse's default ``store`` action does)."""

    def __call__(self, parser, namespace, values, option_string=None):
        self.record(namespace, option_string)
        setattr(namespace, self.dest, values)


class _Seq(_Store):
    """Flattens ``--x 1,2 3`` (one list per token) into ``[1, 2, 3]``."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, [v for tok in values for v in tok], option_string)


class _Bool(argparse.BooleanOptionalAction):
    def __init__(self, option_strings: list[str], dest: str, deprecated: tuple[str, ...] = (),
                 **kw: Any) -> None:
        super().__init__(option_strings, dest, **kw)
        self.deprecated = tuple(deprecated) + tuple("--no-" + d[2:] for d in deprecated)

    record = _Typed.record

    def __call__(self, parser, namespace, values, option_string=None):
        self.record(namespace, option_string)
        super().__call__(parser, namespace, values, option_string)


def _show(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return " ".join(str(x) for x in v)
    return str(v)


def _add(group: Any, cls: type, f: dataclasses.Field, tp: Any, prefix: str, default: Any,
         help_: str, aliases: tuple[str, ...], required: bool = False) -> None:
    kw = _kind(tp, f.metadata.get("choices"))
    kw.setdefault("action", _Store)
    names = [flag_name(f.name, prefix), *aliases]
    if required:
        group.add_argument(*names, dest=_dest(f.name, prefix), required=True, help=help_,
                           deprecated=tuple(aliases), **kw)
        return
    shown = "" if default in (None, argparse.SUPPRESS, (), []) else f" (default: {_show(default)})"
    group.add_argument(*names, dest=_dest(f.name, prefix), default=default,
                       help=help_.replace("%", "%%") + shown, deprecated=tuple(aliases), **kw)


def field_help(cls: type, name: str, docs: dict[str, str] | None = None) -> str:
    """The field's docstring as plain text (``x`` and :func:`a.b` lose their markup)."""
    help_ = (field_docs(cls) if docs is None else docs).get(name)
    if not help_:
        raise TypeError(f"{cls.__name__}.{name} has no docstring; every config field needs one "
                        f"(it is the flag's help text)")
    return re.sub(r":\w+:`~?([^`]+)`", r"\1", help_).replace("``", "")


def _group(parser: Any, prefix: str, cls: type, title: str | None = None) -> Any:
    name = title or prefix
    return parser.add_argument_group(f"{name} ({cls.__name__})" if name else cls.__name__)


def add_config_flags(parser: argparse.ArgumentParser | Any, cls: type, *, prefix: str = "",
                     exclude: tuple[str, ...] = (), defaults: dict[str, Any] | None = None,
                     aliases: dict[str, tuple[str, ...]] | None = None,
                     required: tuple[str, ...] = (), title: str | None = None) -> None:
    """Add one flag per field of dataclass ``cls`` (nested configs recursively, under a prefix).

    ``exclude``: fields the command sets itself (no flag). ``defaults``: different defaults for
    this command (else the dataclass default). ``aliases``: older spellings of a field's flag
    (deprecated: accepted, with a note on stderr). ``required``: fields this command needs on
    its command line even though the config has a default (e.g. an output folder); fields
    without a default are required anyway. ``title``: the help section's name (default: the
    prefix), shown as ``title (ClassName)``."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    defaults = defaults or {}
    group = _group(parser, prefix, cls, title)
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.init:
            continue
        tp = hints[f.name]
        help_ = field_help(cls, f.name, docs)
        if dataclasses.is_dataclass(tp) or f.metadata.get("flags_from") is not None:
            continue  # nested configs: added by the caller with their own prefix
        if f.name in defaults:
            default = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        _add(group, cls, f, tp, prefix, default, help_, (aliases or {}).get(f.name, ()),
             required=default is dataclasses.MISSING or f.name in required)


def add_override_flags(parser: argparse.ArgumentParser, cls: type, *, prefix: str,
                       exclude: tuple[str, ...] = (), defaults: dict[str, Any] | None = None,
                       aliases: dict[str, tuple[str, ...]] | None = None) -> None:
    """Flags for a dict of overrides of ``cls`` (see the module docstring): each flag defaults to
    ``argparse.SUPPRESS`` so only the flags given (plus ``defaults``) reach the dict. The help
    shows ``defaults`` (this command's values) or else the dataclass default. ``prefix`` may be
    empty (``--d-sae`` rather than ``--sae.d-sae``)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    defaults = defaults or {}
    group = _group(parser, prefix, cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        help_ = field_help(cls, f.name, docs)
        d = defaults.get(f.name, f.default)
        shown = "" if d in (None, dataclasses.MISSING) else f" (default: {_show(d)})"
        _add(group, cls, f, hints[f.name], prefix, argparse.SUPPRESS, help_ + shown,
             (aliases or {}).get(f.name, ()))


def _convert(tp: Any, v: Any) -> Any:
    inner, _ = _unwrap_optional(tp)
    if v is None:
        return None
    origin = typing.get_origin(inner)
    if origin is tuple and isinstance(v, list):
        return tuple(v)
    if origin is list and isinstance(v, tuple):
        return list(v)
    return v


def overrides_from_args(args: argparse.Namespace, cls: type, *, prefix: str,
                        exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The override dict of ``cls`` given on the command line (flags added by
    :func:`add_override_flags`, with the same ``exclude``: with an empty prefix, a command's own
    flag of the same name is not an override)."""
    hints = typing.get_type_hints(cls)
    ns = vars(args)
    out = {}
    for f in dataclasses.fields(cls):
        key = _dest(f.name, prefix)
        if key in ns and f.name not in exclude:
            out[f.name] = _convert(hints[f.name], ns[key])
    return out


def config_from_args(args: argparse.Namespace, cls: type, *, prefix: str = "",
                     **given: Any) -> Any:
    """Build ``cls`` from the namespace (flags added by :func:`add_config_flags`); ``given``
    supplies the fields the command sets itself (nested configs included)."""
    hints = typing.get_type_hints(cls)
    ns = vars(args)
    kw: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in given or not f.init:
            continue
        key = _dest(f.name, prefix)
        if key in ns:
            kw[f.name] = _convert(hints[f.name], ns[key])
    check_values(cls.__name__, kw)  # every config: no NaN/inf float, no integer beyond 64 bits
    return cls(**kw, **given)


def field_values(cfg: Any) -> dict[str, Any]:
    """``{field: value}`` of a dataclass instance (shallow: nested configs stay objects), e.g. as
    ``defaults`` of :func:`add_config_flags` when a command's nested config has other defaults."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def field_default(cls: type, name: str) -> Any:
    """The dataclass default of field ``name`` (for a command that uses it outside a config)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def typed_dests(args: argparse.Namespace) -> dict[str, str]:
    """``{dest: option string}`` of the generated flags the user typed (not their defaults)."""
    return dict(getattr(args, _TYPED, {}))


def typed_flag(args: argparse.Namespace, name: str, prefix: str = "") -> str:
    """The flag of field ``name`` as the user typed it (an alias if they used one), else its
    generated name."""
    return getattr(args, _TYPED, {}).get(_dest(name, prefix)) or flag_name(name, prefix)


def config_error(e: Exception, args: argparse.Namespace, **prefixes: str) -> str:
    """A config's ``ValueError`` message with ``Class.field`` replaced by the flag the user
    typed: ``config_error(e, args, TrainConfig="", SAEConfig="sae")`` turns
    ``SAEConfig.d_sae: ...`` into ``--sae.d-sae: ...`` (or ``--d-sae: ...`` when typed so)."""
    if not prefixes:
        return str(e)
    pat = r"\b(" + "|".join(map(re.escape, prefixes)) + r")\.(\w+)"
    return re.sub(pat, lambda m: typed_flag(args, m.group(2), prefixes[m.group(1)]), str(e))


__all__ = ["add_config_flags", "add_override_flags", "config_error", "config_from_args",
           "field_default", "field_docs", "field_help", "field_values", "flag_name",
           "overrides_from_args", "typed_dests", "typed_flag"]
