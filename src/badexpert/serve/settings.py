"""The service's settings: one dataclass whose fields are also the options of ``badexpert serve``
(:func:`add_arguments` builds them from the fields' types, defaults and metadata, so every
default lives here once), and the check that the server's dependencies are installed."""

# no ``from __future__ import annotations``: the fields' types are read at run time (validation, CLI)
import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Annotated

from ..errors import BadExpertError
from ..validation import OneOf, PositiveFloat, PositiveInt, Range, validate_fields

SERVE_EXTRA = "install the serve extra: pip install 'badexpert[serve]'"
ON_REJECT = ("flag", "abstain")
#: The imports the service needs (module name, package name), all in the ``serve`` extra.
SERVER_DEPS = (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("python_multipart", "python-multipart"),
               ("prometheus_client", "prometheus-client"))


def require_server_deps():
    """Import fastapi and uvicorn (and check python-multipart and prometheus-client), or raise one
    BadExpertError naming the ``serve`` extra."""
    missing = []
    for module, package in SERVER_DEPS:
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise BadExpertError(f"the serve command needs {', '.join(missing)}, which is not installed; {SERVE_EXTRA}")
    import fastapi
    import uvicorn

    return fastapi, uvicorn


def _option(default, help: str, group: str, **extra):
    """A setting: its default, its ``--help`` text (``{default}`` is replaced by the default) and
    the option group it is listed under."""
    return field(default=default, metadata={"help": help, "group": group, **extra})


LIMITS = "limits and batching"
DRIFT = "drift alarm"
PROTOCOL = "Open Inference Protocol v2 (KServe / Triton)"
#: A model name in the ``/v2/models/NAME`` routes: letters, digits, ``_``, ``.``, ``-`` (at most 128).
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


@dataclass
class Settings:
    """Limits and behaviour of the service (the options of ``badexpert serve``)."""

    max_body_mb: PositiveFloat = _option(16.0, "largest request body in MiB (default {default}; 413 above)", LIMITS)
    max_batch: PositiveInt = _option(256, "most inputs per request and per forward pass (default {default}; 413 above)",
                                     LIMITS)
    max_queue: PositiveInt | None = _option(
        None, "most inputs waiting for the model before 503 (default 4 x --max-batch)", LIMITS)
    batch_wait_ms: Annotated[float, Range(ge=0)] = _option(
        5.0, "how long to wait for more requests to fill a batch (default {default})", LIMITS)
    strict_size: bool = _option(False, "refuse uploaded images of another size (default: resize them, bilinear)",
                                LIMITS)
    on_reject: Annotated[str, OneOf(*ON_REJECT)] = _option(
        "flag", "flag: answer label and class for rejected inputs too (default); abstain: null for them", LIMITS)
    drift_window: PositiveInt = _option(500, "served inputs in the sliding window (default {default})", DRIFT)
    drift_alpha: Annotated[float, Range(gt=0, lt=1)] = _option(
        1e-3, "significance of the one-sided binomial test (default {default})", DRIFT)
    drift_rate: Annotated[float, Range(gt=0, lt=1)] | None = _option(
        None, "reference rejection rate (default: the detector's expected share of clean inputs rejected: its FPR "
        "target, plus the calibration inputs the model gets wrong that it rejects)", DRIFT)
    name: str | None = _option(None, "the model's name in the /v2/models/NAME routes (default: the bundle or ONNX "
                               "file's stem)", PROTOCOL)

    def validate(self) -> "Settings":
        """Types and ranges through the package's one validation layer; one-line errors."""
        validate_fields(self, "serve setting")
        if self.max_queue is not None and self.max_queue < self.max_batch:
            raise BadExpertError(f"max_queue ({self.max_queue}) must be at least max_batch ({self.max_batch})")
        if self.name is not None and not MODEL_NAME.fullmatch(self.name):
            raise BadExpertError(f"the model name {self.name[:140]!r} is not usable in /v2/models/NAME: use letters, "
                                 "digits, '_', '.' and '-' (at most 128, not starting with '.' or '-'); choose one "
                                 "with --name")
        return self

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def queue_limit(self) -> int:
        return int(self.max_queue if self.max_queue is not None else 4 * self.max_batch)

    @classmethod
    def from_namespace(cls, args) -> "Settings":
        """The settings an argparse namespace holds (options made by :func:`add_arguments`)."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _base_type(tp):
    """``(python type, choices)`` of a field's annotation: Annotated and ``| None`` unwrapped."""
    choices = None
    if typing.get_origin(tp) is typing.Union or type(tp).__name__ == "UnionType":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0]
    if typing.get_origin(tp) is Annotated:
        tp, *extra = typing.get_args(tp)
        for e in extra:
            if isinstance(e, OneOf):
                choices = e.choices
    return tp, choices


def add_arguments(parser, settings_cls=Settings) -> None:
    """Add one ``--option`` per field of ``settings_cls`` to an argparse parser: the name with
    dashes, the field's type (a bool is a flag), its default, its choices and its help text."""
    hints = typing.get_type_hints(settings_cls, include_extras=True)
    groups: dict[str, typing.Any] = {}
    for f in dataclasses.fields(settings_cls):
        meta = f.metadata
        if "help" not in meta:
            continue
        group = meta.get("group")
        target = groups.setdefault(group, parser.add_argument_group(group)) if group else parser
        tp, choices = _base_type(hints[f.name])
        default = f.default
        text = meta["help"].replace("{default}", f"{default:g}" if isinstance(default, float) else str(default))
        flag = "--" + f.name.replace("_", "-")
        if tp is bool:
            target.add_argument(flag, action="store_false" if default else "store_true", help=text)
        else:
            target.add_argument(flag, type=tp, default=default, help=text, **({"choices": choices} if choices else {}))


__all__ = ["MODEL_NAME", "ON_REJECT", "SERVE_EXTRA", "Settings", "add_arguments", "require_server_deps"]
