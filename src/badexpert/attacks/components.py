"""The trained parts of an attack, cached by content hash, and the time each training phase took.

Attacks that do more than poison and train (a clean host model first, a trigger generator or an
encoder trained beside the classifier, a narrow backdoor subnet, a trigger optimised against a
model) build those parts through one :class:`Components` object that :meth:`Attack.implant
<badexpert.attacks.base.Attack.implant>` receives::

    host = components.clean_model(build_model, train_set, recipe, seed)      # trained once
    state = components.fetch("encoder", spec, build, data=train_set)         # any named tensors
    with components.phase("suspect_model"):
        train(model, ...)
    return model, {**info, **components.info()}

With a cache directory (``train_suspect(..., cache_dir=)``, the benchmark grid), each part is
saved there as safetensors (no pickle) under the SHA-256 of everything it depends on: its kind,
its ``spec`` (the parameters and recipe that shape it), the *content* of the data it is trained
on, and for models the exact initial weights (so the architecture, width, normalisation and seed
are all in the key). A grid therefore trains a clean host or an encoder once for every cell that
needs the same one: the clean model of FT, TrojanNN and SRA, and the clean-label surrogate, is the
same component when their recipes agree. Without a directory nothing is cached and everything is
built. :meth:`Components.info` reports, for the model's metadata, the seconds each phase took and,
per component, its key and whether it came from the cache.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..digests import sha256_hex
from ..errors import BadExpertError

#: Bumped when the meaning of a cached component changes (keys include it).
COMPONENT_FORMAT = 1


def tensor_digest(tensors: dict[str, torch.Tensor] | torch.Tensor) -> str:
    """SHA-256 of tensors' names, dtypes, shapes and bytes (a dict is hashed in key order)."""
    from ..digests import COMPONENT_FRAME, tensors_sha256

    return tensors_sha256(tensors if isinstance(tensors, dict) else {"": tensors}, COMPONENT_FRAME)


def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every key as ``prefix.key`` (several networks' weights in one file)."""
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unprefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix.``, with the prefix taken off (inverse of :func:`prefixed`)."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in state.items() if k.startswith(prefix + ".")}


class Components:
    """Builds, caches and times an attack's trained parts (see the module docstring).

    ``directory``: where parts are cached (``None``: build everything, cache nothing).
    ``log``: where one-line progress messages go.
    """

    def __init__(self, directory: str | Path | None = None, *, log: Callable[[str], Any] = print) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.log = log
        self.phase_seconds: dict[str, float] = {}
        self.records: dict[str, dict] = {}
        self._data_digests: dict[int, tuple[Any, str]] = {}

    # --- timing --------------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a block as phase ``name`` (repeated phases add up)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + time.perf_counter() - t0

    def info(self) -> dict:
        """``{"phase_seconds": {...}, "components": {kind: {"key", "cached", "seconds"}}}`` for the
        model's metadata."""
        out: dict = {"phase_seconds": {k: round(v, 3) for k, v in self.phase_seconds.items()}}
        if self.records:
            out["components"] = {k: dict(v) for k, v in self.records.items()}
        return out

    # --- keys ----------------------------------------------------------------------------
    def data_digest(self, data) -> str:
        """Content hash of a Dataset's (or ``(images, labels)`` pair's) images and labels."""
        from ..data.core import as_tensors

        cached = self._data_digests.get(id(data))
        if cached is not None and cached[0] is data:
            return cached[1]
        images, labels = as_tensors(data)
        d = tensor_digest({"images": images, **({"labels": labels} if labels is not None else {})})
        self._data_digests[id(data)] = (data, d)
        return d

    def key(self, kind: str, spec: dict, data=None) -> str:
        """The content hash a part of ``kind`` made from ``spec`` (and ``data``) is cached under."""
        from .. import __version__
        from ..utils import to_jsonable

        payload = {"kind": kind, "spec": to_jsonable(spec), "format": COMPONENT_FORMAT, "version": __version__,
                   "data": self.data_digest(data) if data is not None else None}
        try:
            text = json.dumps(payload, sort_keys=True)
        except (TypeError, ValueError) as exc:  # a programming error in an attack, not user input
            raise BadExpertError(f"component '{kind}': its spec cannot be written as JSON ({exc})") from exc
        return sha256_hex(text.encode(), length=20)

    # --- building and caching ------------------------------------------------------------
    def fetch(self, kind: str, spec: dict, build: Callable[[], dict[str, torch.Tensor]], *, data=None) -> dict[str, torch.Tensor]:
        """The named tensors of part ``kind``: loaded from the cache when a part with the same key
        was built before, otherwise ``build()`` (timed as phase ``kind``) and cached. Processes that
        share the cache directory build a part once: one builds, the others wait and load it."""
        from ..utils import build_lock

        key = self.key(kind, spec, data)
        path = self.directory / f"component-{kind}-{key}.safetensors" if self.directory is not None else None
        with build_lock(path, log=self.log, what=f"the same {kind.replace('_', ' ')}"):
            return self._fetch(kind, key, path, build)

    def _fetch(self, kind: str, key: str, path: Path | None, build: Callable[[], dict[str, torch.Tensor]]):
        if path is not None and path.is_file():
            t0 = time.perf_counter()
            tensors = _load_component(path, kind)
            self.records[kind] = {"key": key, "cached": True, "seconds": round(time.perf_counter() - t0, 3)}
            self.log(f"loaded cached {kind.replace('_', ' ')} {path}")
            return tensors
        t0 = time.perf_counter()
        with self.phase(kind):
            tensors = build()
        if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                    for k, v in tensors.items()):
            raise BadExpertError(f"component '{kind}' must be built as a dict of named tensors")
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        self.records[kind] = {"key": key, "cached": False, "seconds": round(time.perf_counter() - t0, 3)}
        if path is not None:
            _save_component(path, kind, key, tensors)
        return tensors

    def clean_model(self, build_model: Callable[[], nn.Module], train_set, recipe, seed: int, *,
                    kind: str = "clean_model", desc: str = "clean model") -> nn.Module:
        """``build_model()`` trained on the clean ``train_set`` with ``recipe`` and ``seed``, in eval
        mode. Its initial weights are drawn from ``seed`` (not the caller's random state), so the
        same inputs give the same model and the cache can recognise it."""
        from ..io import load_weights
        from ..training import train
        from ..utils import seeded_rng

        with seeded_rng(seed, f"init:{kind}"):
            model = build_model()
        spec = {"recipe": recipe.to_dict(), "seed": seed, "init": tensor_digest(model.state_dict())}

        def build() -> dict[str, torch.Tensor]:
            self.log(f"training the {desc} on {len(train_set)} clean samples ({recipe.epochs} epochs)")
            train(model, train_set, recipe, seed=seed, desc=desc)
            return model.state_dict()

        state = self.fetch(kind, spec, build, data=train_set)
        if self.records[kind]["cached"]:
            load_weights(model, state, source=f"the cached {desc}")
        return model.eval()


def _save_component(path: Path, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    from ..utils import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"badexpert_component": kind, "key": key}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def _load_component(path: Path, kind: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("badexpert_component") != kind:
                raise BadExpertError(f"cached component {path} is not a '{kind}'; delete it and run again")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise BadExpertError(f"cached component {path} cannot be read ({str(exc)[:120]}); delete it and run again") from exc
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise BadExpertError(f"cached component {path} has non-finite values ('{bad[0]}'); delete it and run again")
    return tensors
