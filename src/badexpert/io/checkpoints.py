"""Model checkpoints: weights in safetensors, metadata as JSON inside the same file.

A checkpoint records everything needed to rebuild the model and to reproduce the experiment
that made it: architecture and width, input shape, classes, normalisation, the dataset and its
split parameters, the attack (if any), the training recipe and the seed. Nothing is pickled.
"""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path
from typing import Annotated, Any

import torch
from torch import nn

from ..errors import BadExpertError
from ..utils import atomic_write_bytes, resolve_device, to_jsonable
from ..validation import Range, expect

FORMAT = "badexpert-model/1"
#: Key prefix of the attack's trigger state (``meta["attack_state"]``) inside a model file.
ATTACK_PREFIX = "@attack/"


def save_model(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write ``model``'s state dict and ``meta`` (must hold ``arch``, ``in_channels``,
    ``num_classes``, ``image_size``, ``mean``, ``std``) atomically to ``path``.

    ``meta["attack_state"]`` (the attack's trigger tensors, :meth:`Attack.trigger_state`) is
    stored as tensors named ``@attack/<key>`` beside the weights, not in the JSON."""
    from safetensors.torch import save

    for key in ("arch", "in_channels", "num_classes", "image_size", "mean", "std"):
        if key not in meta:
            raise BadExpertError(f"model metadata lacks '{key}'")
    meta = dict(meta)
    attack_state = meta.pop("attack_state", None) or {}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if any(k.startswith(ATTACK_PREFIX) for k in state):
        raise BadExpertError(f"model parameter names may not start with '{ATTACK_PREFIX}'")
    state.update({ATTACK_PREFIX + k: v.detach().cpu().contiguous() for k, v in attack_state.items()})
    blob = save(state, metadata={"badexpert": json.dumps(to_jsonable({"format": FORMAT, **meta}))})
    path = Path(path)
    atomic_write_bytes(path, blob)
    return path


def model_fingerprint(model: nn.Module) -> str:
    """``sha256:<hex>`` of a model's weights and buffers (names, dtypes, shapes and values).

    Recorded in every detector file, so a detector is never used in front of another model than
    the one it was fitted on, even one of the same architecture.
    """
    from ..digests import MODEL_FRAME, tensors_sha256

    expect(model, nn.Module, "the model")
    return tensors_sha256(model.state_dict(), MODEL_FRAME, prefix="sha256:")


def short_fingerprint(fp: str | None) -> str:
    return "unknown" if not fp else fp[:19]


def read_meta(path: str | Path, *, fmt: str | None, what: str, hint: str) -> dict[str, Any]:
    """The JSON metadata stored in a badexpert safetensors file, checked against ``fmt`` (any
    badexpert format when ``None``).

    ``what`` names the kind of file in messages ("model checkpoint", "detector file"); ``hint``
    says how to make one.
    """
    from safetensors import SafetensorError, safe_open

    from ..metadata import parse_metadata, safetensors_header_size

    expect(path, (str, PathLike), f"the path of the {what}")
    p = Path(path)
    if not p.is_file():
        raise BadExpertError(f"{what.split()[0]} file '{p}' does not exist; {hint}")
    source = f"{what} '{p}'"
    safetensors_header_size(p, what)  # the declared header size, before safetensors reads it
    try:
        with safe_open(str(p), framework="pt") as fh:
            md = fh.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise BadExpertError(f"'{p}' is not a badexpert {what} (corrupt or wrong format)") from exc
    if "badexpert" not in md:
        raise BadExpertError(f"'{p}' is not a badexpert {what} (corrupt or wrong format: no badexpert metadata)")
    meta = parse_metadata(md["badexpert"], source, hint.replace("create one", "rebuild it") if hint else None)
    if fmt is not None and meta.get("format") != fmt:
        old = isinstance(meta.get("format"), str) and meta["format"].rsplit("/", 1)[0] == fmt.rsplit("/", 1)[0]
        hint = f"; rebuild it with this version ({hint.removeprefix('create one with ')})" if old else ""
        raise BadExpertError(f"'{p}' has format {meta.get('format')!r}; this version reads {fmt!r}{hint}")
    return meta


#: Types and ranges of the architecture fields of a model checkpoint's metadata.
_Dim = Annotated[int, Range(ge=1, le=4096)]
MODEL_META_TYPES = {
    "arch": str,
    "width": Annotated[int, Range(ge=1, le=4096)] | None,
    "in_channels": Annotated[int, Range(ge=1, le=64)],
    "num_classes": Annotated[int, Range(ge=1, le=100_000)],
    "image_size": tuple[_Dim, _Dim],
    "mean": tuple[float, ...],
    "std": tuple[Annotated[float, Range(gt=0)], ...],
}


def check_model_meta(meta: dict[str, Any], source: str, fix: str | None = None) -> dict[str, Any]:
    """Type- and range-check the architecture fields of a model's metadata (in place), and its
    class names (``None`` or one string per class); ``fix`` ends each message."""
    from ..metadata import check_classes, check_fields

    check_fields(meta, MODEL_META_TYPES, source, fix)
    for key in ("mean", "std"):
        if len(meta[key]) != meta["in_channels"]:
            raise BadExpertError(f"{source}: field '{key}' has {len(meta[key])} values for {meta['in_channels']} "
                                 "channels" + (f"; {fix}" if fix else ""))
    if "classes" in meta:
        meta["classes"] = check_classes(meta["classes"], meta["num_classes"], source, fix)
    return meta


def read_model_meta(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, without loading its weights; the architecture fields
    are type- and range-checked (a malformed or tampered file is a one-line error)."""
    meta = read_meta(path, fmt=FORMAT, what="model checkpoint", hint="create one with `badexpert train`")
    return check_model_meta(meta, f"model checkpoint '{path}'", "retrain it with `badexpert train`")


def _spec(meta: dict[str, Any]) -> dict[str, Any]:
    return dict(arch=meta["arch"], in_channels=meta["in_channels"], num_classes=meta["num_classes"],
                image_size=tuple(meta["image_size"]), mean=meta["mean"], std=meta["std"], width=meta["width"])


def check_architecture(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]], source: str, *,
                       batch: int | None = None) -> int | None:
    """Check on PyTorch's ``meta`` device (no memory) that the architecture ``meta`` declares has
    exactly the parameter shapes ``shapes`` (those of the weights to load), so metadata asking
    for an absurd width or image size is refused before anything is allocated.

    With ``batch``, also refuse a declared input size whose batch of ``batch`` float32 inputs
    would not fit the memory budget (:func:`badexpert.limits.check_allocation`): per input, the
    input plus the largest input and output of any one layer (what an inference pass holds at
    once), measured by one forward pass of the same meta-device model. Returns that estimate."""
    import math

    from ..limits import check_allocation
    from ..models import build_model

    try:
        with torch.device("meta"):
            model = build_model(**_spec(meta)).eval()
    except (RuntimeError, ValueError, TypeError) as exc:
        raise BadExpertError(f"{source}: cannot build {meta['arch']} from its metadata ({exc})".splitlines()[0]) from exc
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if expected != shapes:
        diff = sorted(set(expected) ^ set(shapes)) or [k for k in expected if expected[k] != shapes[k]]
        raise BadExpertError(
            f"the weights in {source} do not match architecture '{meta['arch']}' (width {meta['width']}, "
            f"input {meta['in_channels']}x{meta['image_size'][0]}x{meta['image_size'][1]}) declared in its metadata "
            f"(first difference: {diff[0]}); the file is damaged or was edited"
        )
    if batch is None:
        return None
    shape = (meta["in_channels"], *meta["image_size"])
    biggest = 0

    def hook(module, inputs, output):
        nonlocal biggest
        outs = output if isinstance(output, (tuple, list)) else (output,)
        biggest = max(biggest, sum(t.numel() for t in (*inputs, *outs) if isinstance(t, torch.Tensor)))

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(torch.empty(1, *shape, device="meta"))
    except (RuntimeError, ValueError, TypeError, NotImplementedError):
        pass  # an operation without a meta kernel: the input alone is counted
    finally:
        for h in handles:
            h.remove()
    nbytes = batch * (math.prod(shape) + biggest) * 4
    check_allocation(nbytes, f"{source}: a batch of {batch} inputs of shape {list(shape)} through its "
                             f"{meta['arch']} model", "the file declares an absurd input size: rebuild it")
    return nbytes


def build_for_weights(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]], source: str) -> nn.Module:
    """Build the architecture ``meta`` declares, after :func:`check_architecture` against the
    shapes of the weights to load."""
    check_architecture(meta, shapes, source)
    return build_checked(meta)


def build_checked(meta: dict[str, Any]) -> nn.Module:
    """The architecture of metadata already checked by :func:`check_architecture`."""
    from ..models import build_model

    return build_model(**_spec(meta))


def load_model(path: str | Path, *, device: str | torch.device | None = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the architecture recorded in a checkpoint and load its weights (eval mode).

    The architecture is checked against the tensor shapes the file declares before anything is
    allocated (:func:`build_for_weights`). The attack's trigger state, if the file has one, is
    returned as ``meta["attack_state"]`` (see :func:`badexpert.attacks.attack_from_meta`).
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    meta = read_model_meta(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys() if not k.startswith(ATTACK_PREFIX)}
    except (SafetensorError, OSError) as exc:
        raise BadExpertError(f"cannot read the weights in '{path}': the file is corrupt") from exc
    model = build_for_weights(meta, shapes, f"'{path}'")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise BadExpertError(f"cannot read the weights in '{path}': the file is corrupt") from exc
    attack_state = {k[len(ATTACK_PREFIX):]: state.pop(k) for k in [k for k in state if k.startswith(ATTACK_PREFIX)]}
    load_weights(model, state, source=str(path), arch=meta["arch"])
    meta.pop("attack_state", None)  # only ever the file's tensors, never its JSON
    if attack_state:
        meta["attack_state"] = attack_state
    return model.to(resolve_device(device)).eval(), meta


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], *, source: str, arch: str = "the model") -> None:
    """``load_state_dict(strict=True)`` with a one-line error when the shapes or names differ."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), "")
        raise BadExpertError(
            f"the weights in '{source}' do not match architecture '{arch}' ({first[:160]}); "
            "check --arch/--width or use the checkpoint made for this model"
        ) from exc


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights of a user's own model: a safetensors file, or a ``torch.save`` state dict read with
    ``weights_only=True`` (never full unpickling)."""
    p = Path(path)
    if not p.is_file():
        raise BadExpertError(f"weights file '{p}' does not exist")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except (SafetensorError, OSError) as exc:
            raise BadExpertError(f"'{p}' is not a readable safetensors file") from exc
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the file is not a plain state dict
        raise BadExpertError(f"'{p}' is not a plain tensor state dict (refusing to unpickle anything else)") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BadExpertError(f"'{p}' does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}
