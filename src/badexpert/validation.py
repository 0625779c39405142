"""One typed validation layer for every config-like object.

Fields declare their type with ordinary annotations and their range with ``typing.Annotated``::

    @dataclass
    class Recipe:
        lr: Annotated[float, Range(gt=0)] = 0.1
        schedule: Annotated[str, OneOf("cosine", "step", "constant")] = "cosine"

    def __post_init__(self):
        validate_fields(self, "recipe field")

:func:`validate_fields` checks every dataclass field; :func:`validate_params` checks keyword
arguments against a function signature (detector constructors). Both raise a one-line
:class:`BadExpertError` naming the field, what it must be and what it got, and neither coerces
strings to numbers: ``"64"`` is not a batch size. The only conversions are the ones JSON forces
(a list where a tuple is declared, an integer where a float is declared).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from .errors import BadExpertError


@dataclass(frozen=True)
class Range:
    """Numeric bounds: ``ge``/``gt`` below, ``le``/``lt`` above (any may be omitted)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def check(self, v) -> str | None:
        if self.ge is not None and not v >= self.ge:
            return f">= {self.ge:g}"
        if self.gt is not None and not v > self.gt:
            return f"> {self.gt:g}"
        if self.le is not None and not v <= self.le:
            return f"<= {self.le:g}"
        if self.lt is not None and not v < self.lt:
            return f"< {self.lt:g}"
        return None

    def describe(self) -> str:
        lo = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else None
        hi = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else None
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return (">= " if lo[0] == "[" else "> ") + lo[1:]
        if hi:
            return ("<= " if hi[-1] == "]" else "< ") + hi[:-1]
        return ""


class OneOf:
    """The value (after lower-casing strings) must be one of ``choices``."""

    def __init__(self, *choices) -> None:
        self.choices = tuple(choices)

    def describe(self) -> str:
        return "one of: " + ", ".join(str(c) for c in self.choices)


#: Common field types, shared by every config-like object.
PositiveInt = Annotated[int, Range(ge=1)]
NonNegativeInt = Annotated[int, Range(ge=0)]
PositiveFloat = Annotated[float, Range(gt=0)]
Fraction = Annotated[float, Range(ge=0, le=1)]


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *extra = typing.get_args(tp)
        for e in extra:
            if isinstance(e, OneOf):
                return e.describe()
        words = [_type_name(base)] + [e.describe() for e in extra if hasattr(e, "describe") and e.describe()]
        return " ".join(words)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        name = " or ".join(_type_name(a) for a in args)
        return name + (" or null" if len(args) < len(typing.get_args(tp)) else "")
    if origin is Literal:
        return "one of: " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if not args:
            return "a list"
        item, limits = args[0], []
        if typing.get_origin(item) is Annotated and not any(isinstance(e, OneOf) for e in typing.get_args(item)[1:]):
            item, *extra = typing.get_args(item)  # "numbers > 0", not "a number > 0s"
            limits = [e.describe() for e in extra if hasattr(e, "describe") and e.describe()]
        plural = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}.get(item)
        if plural is None:
            return f"a list whose items are each {_type_name(args[0])}"
        return " ".join([f"a list of {plural}", *limits])
    if origin is dict or tp is dict:
        return "an object (JSON dict)"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


class _Invalid(Exception):
    pass


def _check(value, tp):
    """``value`` checked against ``tp`` (converted only where JSON forces it); raises _Invalid."""
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *extra = typing.get_args(tp)
        value = _check(value, base)
        if value is None:
            return value
        for c in extra:
            if isinstance(c, Range):
                if c.check(value) is not None:
                    raise _Invalid
            elif isinstance(c, OneOf):
                key = value.lower() if isinstance(value, str) else value
                if key not in c.choices:
                    raise _Invalid
                value = key
        return value
    if origin in (Union, types.UnionType):
        for alt in typing.get_args(tp):
            try:
                return _check(value, alt)
            except _Invalid:
                continue
        raise _Invalid
    if tp is type(None):
        if value is None:
            return None
        raise _Invalid
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise _Invalid
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _Invalid
        args = typing.get_args(tp)
        if args and not (len(args) == 2 and args[1] is Ellipsis) and origin is tuple:
            if len(args) != len(value):
                raise _Invalid
            items = [_check(v, a) for v, a in zip(value, args)]
        else:
            items = [_check(v, args[0]) for v in value] if args else list(value)
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Invalid
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Invalid
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and math.isfinite(value):
            return int(value)  # 64.0 from a JSON tool is still 64
        raise _Invalid
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise _Invalid
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Invalid
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Invalid
    return value


def expect(value, types, what: str):
    """``value`` if it is an instance of ``types``, else a one-line error naming ``what``
    (e.g. ``expect(model, nn.Module, "the model")``)."""
    if not isinstance(value, types):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise BadExpertError(f"{what} must be a {names}, got {type(value).__name__}")
    return value


def expect_finite_model(model, what: str = "the model"):
    """``model`` (a ``torch.nn.Module``) if every floating-point parameter and buffer is finite,
    else a one-line error naming the first tensor that is not: a model whose weights hold NaN or
    infinity (a training that diverged, a damaged file) answers every input with NaN, and a
    detector built on it would be no detector at all."""
    import torch

    for name, t in model.state_dict().items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise BadExpertError(f"{what} has non-finite weights ({bad} of {t.numel()} values of '{name}' are NaN or "
                                 "infinite): its training diverged or the file is damaged; use another model")
    return model


def check_label(label, where: str) -> str:
    """``label`` if it is a short name for a table column or row (a grid entry's, a compared
    detector's): a non-empty string of at most 80 characters without ``|``, ``,``, tabs or
    newlines (they would break the Markdown and CSV tables); else a one-line error naming ``where``."""
    if not isinstance(label, str) or not label.strip() or len(label) > 80 or any(c in label for c in "|\n\r\t,"):
        raise BadExpertError(f"{where}: 'label' must be a short name (no '|', ',', tabs or newlines), got {label!r}")
    return label


def check_value(value, tp, name: str, where: str = "field"):
    """``value`` checked against annotation ``tp``; a one-line error naming ``where`` ``name``."""
    try:
        return _check(value, tp)
    except _Invalid:
        raise BadExpertError(f"{where} '{name}' must be {_type_name(tp)}, got {_short_repr(value)}") from None


def _short_repr(value, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (a hostile file's value may be megabytes long)."""
    if isinstance(value, (list, tuple, dict, str)) and len(value) > limit:
        return f"{type(value).__name__} of {len(value)} items" if not isinstance(value, str) else repr(value[:limit]) + "..."
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def validate_fields(obj, where: str) -> None:
    """Check (and normalise in place) every field of dataclass instance ``obj``."""
    hints = typing.get_type_hints(type(obj), include_extras=True)
    for f in dataclasses.fields(obj):
        if f.name in hints:
            new = check_value(getattr(obj, f.name), hints[f.name], f.name, where)
            object.__setattr__(obj, f.name, new)


def signature_hints(func) -> dict[str, Any]:
    """Annotations of ``func``'s parameters (``Annotated`` kept), resolved."""
    return typing.get_type_hints(func, include_extras=True)


def validate_params(func, params: dict, where: str) -> dict:
    """Check keyword ``params`` against ``func``'s annotated parameters: unknown names and wrong
    types or ranges are one-line errors. Returns the normalised parameters."""
    sig = inspect.signature(func)
    names = [p.name for p in sig.parameters.values() if p.name != "self" and p.kind is not p.VAR_KEYWORD]
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise BadExpertError(f"{where} has no parameter(s) {unknown}; valid: {sorted(names)}")
    hints = signature_hints(func)
    return {k: check_value(v, hints[k], k, f"{where} parameter") if k in hints else v for k, v in params.items()}


def _is_value_hint(tp) -> bool:
    """Whether annotation ``tp`` describes a plain value (numbers, strings, flags, their ranges
    and unions): the parameters :func:`checked` validates. Objects (datasets, models) are left
    to the function, which names them better."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return True
    if origin in (Union, types.UnionType):
        return all(_is_value_hint(a) for a in typing.get_args(tp))
    if origin is Literal:
        return True
    if origin in (tuple, list):  # a sequence of values (tuple[Fpr, ...])
        return all(_is_value_hint(a) for a in typing.get_args(tp) if a is not Ellipsis)
    return tp in (int, float, bool, str, type(None))


def checked(where: str | None = None):
    """Decorator: a call with missing, unknown or surplus arguments, or a value argument outside
    its annotated type or range (``reserved: PositiveInt``), is a one-line error naming the
    parameter, instead of a raw ``TypeError`` or a silently accepted value.

    ``where`` names the function in messages (default: ``name()``)."""
    import functools

    def deco(func):
        sig = inspect.signature(func)
        label = where or f"{func.__name__}()"
        hints: dict[str, Any] = {}

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            try:
                bound = sig.bind(*args, **kwargs)
            except TypeError as exc:
                valid = ", ".join(p for p in sig.parameters if sig.parameters[p].kind is not inspect.Parameter.VAR_KEYWORD)
                raise BadExpertError(f"{label}: {exc} (parameters: {valid})") from None
            if not hints:
                hints.update({k: v for k, v in signature_hints(func).items() if k != "return" and _is_value_hint(v)})
            for name, value in list(bound.arguments.items()):
                if name in hints:
                    bound.arguments[name] = check_value(value, hints[name], name, f"{label} parameter")
            return func(*bound.args, **bound.kwargs)

        return wrapper

    return deco


__all__ = ["Fraction", "NonNegativeInt", "OneOf", "PositiveFloat", "PositiveInt", "Range", "check_label", "check_value", "checked", "expect", "expect_finite_model", "signature_hints", "validate_fields", "validate_params"]
