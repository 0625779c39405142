"""The detector contract shared by BaDExpert and every baseline (PyOD-like).

- ``fit(model, clean)`` builds the detector from the suspect model and a clean labelled set and
  returns ``self``; fitted attributes end with ``_``.
- ``score(x)``: one float per input, **higher means more likely a backdoor input**.
- ``calibrate(clean, fpr)`` sets ``threshold_`` to the split-conformal quantile of the scores of
  a clean calibration set disjoint from the fitting data, so that the false-positive rate on new
  clean inputs is at most ``fpr`` in expectation.
- ``predict(x)``: boolean tensor, True = reject (``score > threshold_``).

Capability flags (captum-style): ``forward_passes_per_input``, ``needs_gradients``.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..data.core import as_tensors
from ..errors import BadExpertError, NotFittedError
from ..utils import atomic_write_bytes, resolve_device, to_jsonable

FORMAT = "badexpert-detector/1"


class Detector:
    """Base class. Subclasses implement :meth:`_fit` and :meth:`_score_batch`."""

    name: ClassVar[str] = "detector"
    forward_passes_per_input: ClassVar[int] = 1
    needs_gradients: ClassVar[bool] = False

    def __init__(self, *, batch_size: int = 256, seed: int = 0, device: str | None = None) -> None:
        self.batch_size = batch_size
        self.seed = seed
        self.device = device

    # --- configuration -------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        """Constructor arguments (scikit-learn style), for configs and reports."""
        import inspect

        out = {}
        for cls in type(self).__mro__:
            if cls is object:
                continue
            for p in inspect.signature(cls.__init__).parameters.values():
                if p.kind is p.KEYWORD_ONLY and p.name not in out and hasattr(self, p.name):
                    out[p.name] = getattr(self, p.name)
        return out

    # --- verbs ---------------------------------------------------------------------------
    def fit(self, model: nn.Module, clean) -> "Detector":
        """Build the detector for ``model`` from clean labelled data; returns ``self``."""
        if not isinstance(model, nn.Module):
            raise BadExpertError(f"fit expects a torch.nn.Module classifier, got {type(model).__name__}")
        images, labels = as_tensors(clean)
        if labels is None:
            raise BadExpertError("fit needs labelled clean data: a Dataset or an (images, labels) pair")
        if len(images) < 2:
            raise BadExpertError(f"fit needs at least 2 clean samples, got {len(images)}")
        self.device_ = resolve_device(self.device)
        model = on_device(model, self.device_)
        start = time.perf_counter()
        self._fit(model, images, labels)
        self.fit_seconds_ = time.perf_counter() - start
        self.model_ = model
        self.input_shape_ = tuple(images.shape[1:])
        for attr in ("threshold_", "fpr_target_", "calibration_size_"):
            self.__dict__.pop(attr, None)
        return self

    def _fit(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
        raise NotImplementedError

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "model_")

    def _check_fitted(self, verb: str) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"{self.name}: call fit(model, clean_data) before {verb}()")

    def _check_input(self, x) -> torch.Tensor:
        images, _ = as_tensors(x)
        if tuple(images.shape[1:]) != self.input_shape_:
            raise BadExpertError(
                f"{self.name}: inputs of shape {tuple(images.shape[1:])} but the detector was fitted on "
                f"{self.input_shape_}"
            )
        return images

    @torch.no_grad()
    def score(self, x) -> torch.Tensor:
        """Scores for a batch (uint8 or float images, or a Dataset): higher = more suspicious."""
        self._check_fitted("score")
        images = self._check_input(x)
        out = [self._score_batch(xb) for xb in self._batches(images)]
        return torch.cat(out) if out else torch.empty(0)

    def _batches(self, images: torch.Tensor):
        from ..data.core import batches

        for xb, _ in batches(images, None, batch_size=self.batch_size, device=self.device_):
            yield xb

    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score_details(self, x) -> dict:
        """``score`` plus any per-input quantities the detector computes on the way (as numpy
        arrays); evaluation and reports use this to avoid a second pass."""
        return {"score": self.score(x).numpy()}

    def calibrate(self, clean, fpr: float = 0.01) -> "Detector":
        """Set ``threshold_`` so that at most ``fpr`` of new clean inputs are rejected (in expectation).

        ``clean`` must be disjoint from the data the detector was fitted on and from the data
        it will be evaluated on. Uses the finite-sample conformal quantile: the
        ``ceil((n+1)(1-fpr))``-th smallest clean score.
        """
        from ..metrics import conformal_threshold

        self._check_fitted("calibrate")
        if not 0 < fpr < 1:
            raise BadExpertError(f"the target false-positive rate must lie in (0, 1), got {fpr}")
        start = time.perf_counter()
        scores = self.score(clean)
        if torch.isnan(scores).any():
            raise BadExpertError(f"{self.name}: calibration scores contain NaN; the detector's models are broken")
        thr = conformal_threshold(scores.numpy(), fpr)
        if math.isinf(thr):
            need = math.ceil(1 / fpr) - 1
            warnings.warn(
                f"{len(scores)} calibration samples cannot guarantee FPR {fpr}: at least {need} are needed; "
                "nothing will be rejected",
                stacklevel=2,
            )
        self.threshold_ = float(thr)
        self.fpr_target_ = float(fpr)
        self.calibration_size_ = int(len(scores))
        self.calibrate_seconds_ = time.perf_counter() - start
        return self

    def predict(self, x) -> torch.Tensor:
        """True for inputs to reject (``score > threshold_``)."""
        scores = self.score(x)
        return self.decide(scores)

    def decide(self, scores: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "threshold_"):
            raise NotFittedError(f"{self.name}: call calibrate(clean_data, fpr) before predict()")
        return scores > self.threshold_

    # --- persistence ---------------------------------------------------------------------
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def _state_meta(self) -> dict[str, Any]:
        return {}

    def _load_state(self, model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        pass

    def save(self, path: str | Path, extra: dict | None = None) -> Path:
        """Save the fitted detector to one safetensors file (weights) with JSON metadata.

        The suspect model itself is not stored: :func:`load_detector` takes it as an argument.
        """
        from safetensors.torch import save

        self._check_fitted("save")
        meta = {
            "format": FORMAT,
            "detector": self.name,
            "params": self.get_params(),
            "input_shape": list(self.input_shape_),
            "threshold": getattr(self, "threshold_", None),
            "fpr_target": getattr(self, "fpr_target_", None),
            "calibration_size": getattr(self, "calibration_size_", None),
            "fit_seconds": getattr(self, "fit_seconds_", None),
            "state": self._state_meta(),
            "extra": extra or {},
        }
        tensors = {k: v.detach().cpu().contiguous() for k, v in self._state_tensors().items()}
        blob = save(tensors, metadata={"badexpert": json.dumps(to_jsonable(meta))})
        path = Path(path)
        atomic_write_bytes(path, blob)
        return path


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` itself when it already lives on ``device``, else a copy moved there (the
    caller's model is never moved behind its back)."""
    import copy

    from ..utils import model_device

    here = model_device(model)
    if here.type == device.type and (device.index is None or here.index == device.index):
        return model
    return copy.deepcopy(model).to(device)


def read_detector_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a saved detector's tensors and metadata without building anything."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..io import read_meta

    meta = read_meta(path, fmt=FORMAT, what="detector file", hint="create one with `badexpert defend`")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise BadExpertError(f"cannot read the weights in '{path}': the file is corrupt") from exc
    return tensors, meta


def load_detector(path: str | Path, model: nn.Module, *, device: str | None = None) -> Detector:
    """Load a detector saved with :meth:`Detector.save` for the suspect ``model`` it was fitted on."""
    from . import DETECTORS

    tensors, meta = read_detector_file(path)
    name = meta.get("detector")
    if name not in DETECTORS:
        raise BadExpertError(f"'{path}' holds an unknown detector '{name}'")
    params = dict(meta.get("params") or {})
    if device is not None:
        params["device"] = device
    det = DETECTORS[name](**params)
    det.device_ = resolve_device(det.device)
    det.input_shape_ = tuple(meta["input_shape"])
    det.fit_seconds_ = meta.get("fit_seconds")
    model = on_device(model, det.device_)
    det._load_state(model, tensors, meta.get("state") or {})
    det.model_ = model
    if meta.get("threshold") is not None:
        det.threshold_ = float(meta["threshold"])
        det.fpr_target_ = float(meta["fpr_target"])
        det.calibration_size_ = int(meta["calibration_size"])
    return det
