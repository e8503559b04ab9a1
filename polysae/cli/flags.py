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
(choices), their ``Optional`` forms, and ``tuple[T, ...]`` / ``tuple[T, T, T]`` / ``list[T]``
(``nargs``). Anything else raises ``TypeError`` when the parser is built, so an unsupported field
is a bug caught by the tests, not a silently missing flag.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from typing import Any

_SEP = "."


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


def _kind(tp: Any) -> dict[str, Any]:
    """argparse keyword arguments for a field type (without help/default)."""
    tp, _ = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if tp in (int, float, str):
        return {"type": tp}
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        return {"type": type(choices[0]), "choices": choices}
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis or origin is list:
            elem, nargs = args[0], "+"
        elif origin is tuple and args and all(a == args[0] for a in args):
            elem, nargs = args[0], len(args)
        else:
            raise TypeError(f"unsupported tuple type {tp}")
        kw = _kind(elem)
        if "type" not in kw:
            raise TypeError(f"unsupported element type {elem}")
        return {**kw, "nargs": nargs, "_seq": origin}
    raise TypeError(f"unsupported field type {tp}")


def _show(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return " ".join(str(x) for x in v)
    return str(v)


def add_config_flags(parser: argparse.ArgumentParser | Any, cls: type, *, prefix: str = "",
                     exclude: tuple[str, ...] = (), defaults: dict[str, Any] | None = None,
                     aliases: dict[str, tuple[str, ...]] | None = None) -> None:
    """Add one flag per field of dataclass ``cls`` (nested configs recursively, under a prefix).

    ``exclude``: fields the command sets itself (no flag). ``defaults``: different defaults for
    this command (else the dataclass default). ``aliases``: extra spellings of a field's flag
    (e.g. deprecated ones). Fields without a default (required) become required flags."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    defaults = defaults or {}
    group = parser.add_argument_group(f"{prefix} ({cls.__name__})") if prefix else parser
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.init:
            continue
        tp = hints[f.name]
        help_ = docs.get(f.name)
        if not help_:
            raise TypeError(f"{cls.__name__}.{f.name} has no docstring; every config field needs "
                            f"one (it is the flag's help text)")
        sub = f.metadata.get("flags_from")
        if dataclasses.is_dataclass(tp) or sub is not None:
            continue  # nested configs: added by the caller with their own prefix
        if f.name in defaults:
            default = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        kw = _kind(tp)
        kw.pop("_seq", None)
        names = [flag_name(f.name, prefix)] + [a for a in (aliases or {}).get(f.name, ())]
        if default is dataclasses.MISSING:
            group.add_argument(*names, dest=_dest(f.name, prefix), required=True, help=help_,
                               **kw)
            continue
        shown = "" if default is None else f" (default: {_show(default)})"
        group.add_argument(*names, dest=_dest(f.name, prefix), default=default,
                           help=help_.replace("%", "%%") + shown, **kw)


def add_override_flags(parser: argparse.ArgumentParser, cls: type, *, prefix: str,
                       exclude: tuple[str, ...] = (),
                       defaults: dict[str, Any] | None = None) -> None:
    """Flags for a dict of overrides of ``cls`` (see the module docstring): each flag defaults to
    ``argparse.SUPPRESS`` so only the flags given (plus ``defaults``) reach the dict."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    defaults = defaults or {}
    group = parser.add_argument_group(f"{prefix} ({cls.__name__})")
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        kw = _kind(hints[f.name])
        kw.pop("_seq", None)
        d = defaults.get(f.name, f.default)
        shown = "" if d in (None, dataclasses.MISSING) else f" (default: {_show(d)})"
        help_ = docs.get(f.name)
        if not help_:
            raise TypeError(f"{cls.__name__}.{f.name} has no docstring")
        group.add_argument(flag_name(f.name, prefix), dest=_dest(f.name, prefix),
                           default=argparse.SUPPRESS, help=help_.replace("%", "%%") + shown, **kw)


def _convert(tp: Any, v: Any) -> Any:
    inner, _ = _unwrap_optional(tp)
    if v is None:
        return None
    if typing.get_origin(inner) is tuple and isinstance(v, list):
        return tuple(v)
    return v


def overrides_from_args(args: argparse.Namespace, cls: type, *, prefix: str) -> dict[str, Any]:
    """The override dict of ``cls`` given on the command line (flags added by
    :func:`add_override_flags`)."""
    hints = typing.get_type_hints(cls)
    ns = vars(args)
    out = {}
    for f in dataclasses.fields(cls):
        key = _dest(f.name, prefix)
        if key in ns:
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
    return cls(**kw, **given)


__all__ = ["add_config_flags", "add_override_flags", "config_from_args", "field_docs",
           "flag_name", "overrides_from_args"]
