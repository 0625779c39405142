"""The attack interface.

An attack knows three things:

- how to trigger an input: :meth:`Attack.apply` maps float images in ``[0, 1]`` to triggered
  images (patches, blends, warps, or a learned function all fit this shape);
- which label a triggered input should get (:meth:`Attack.target_of`: all-to-one by default) and
  which test inputs count for its success rate (:meth:`Attack.counts`: not already of the target
  class, and from the source classes for source-specific attacks);
- how to poison a training set (:meth:`Attack.poison`): which samples are poisoned (dirty-label:
  any non-target sample, relabelled; clean-label: target-class samples, labels kept), and
  optionally "cover" samples that carry the trigger with their true labels.

Triggers are built lazily for the image shape they are applied to (:meth:`Attack.build_trigger`)
from the attack's parameters (including ``trigger_seed``) and any files they name (a trigger
image, a folder of reflections). What was built is the attack's *trigger state*
(:meth:`Attack.trigger_state`): it is saved with the suspect model (safetensors tensors next to
the weights) and restored when the model is loaded (:meth:`Attack.restore_state`), so a saved
model is evaluated with exactly the trigger it was trained with, even where those files are gone.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from ..data.core import Dataset, to_float, to_uint8
from ..errors import BadExpertError
from ..validation import Fraction, NonNegativeInt, validate_fields
from .components import Components

#: A fraction in [0, 1] (poison and cover rates, opacities).
Rate = Fraction
ClassIndex = NonNegativeInt

#: True while an attack is re-created from a saved model's record (its files are not needed then).
_RESTORING: ContextVar[bool] = ContextVar("badexpert_attack_restoring", default=False)


@contextlib.contextmanager
def restoring() -> Iterator[None]:
    """Build attacks without checking the files they name (their trigger state comes from a saved
    model, or they are only described in a report)."""
    token = _RESTORING.set(True)
    try:
        yield
    finally:
        _RESTORING.reset(token)


@dataclass
class Attack:
    """Base class; subclasses are dataclasses adding their trigger parameters."""

    target: ClassIndex = 0
    poison_rate: Rate = 0.003
    cover_rate: Rate = 0.0
    source_classes: tuple[ClassIndex, ...] | None = None
    trigger_seed: NonNegativeInt = 0
    #: Poison every training batch after augmentation instead of the stored training set
    #: (:meth:`implant`); left out of :meth:`params` while off, so records made before it existed
    #: keep their keys.
    online: bool = field(default=False, metadata={"omit_default": True})

    name: ClassVar[str] = "attack"
    clean_label: ClassVar[bool] = False
    all_to_all: ClassVar[bool] = False
    #: True when the trigger is learned by :meth:`implant` (a generator, an encoder, an optimised
    #: pattern): it exists only after implanting, or restored from a saved model.
    learned: ClassVar[bool] = False
    #: Attacks that poison every batch online: the field holding the per-batch rate of their
    #: second kind of sample (``poison_rate`` plus it may not exceed 1); ``None`` for the others.
    second_batch_rate: ClassVar[str | None] = None
    #: Where the test-time trigger lies: ``"local"`` (a patch or a few patches: a small region carries
    #: it) or ``"image"`` (spread over the whole image: a blend, a signal, a warp, a reflection);
    #: detectors that target one kind (SentiNet: localised triggers) report the other as out of scope.
    trigger_extent: ClassVar[str] = "local"

    def __post_init__(self) -> None:
        validate_fields(self, f"attack '{self.name}' parameter")
        if self.online and not self.can_poison_online():
            why = (f"it already poisons every batch online ('{self.second_batch_rate}' per batch)"
                   if self.second_batch_rate is not None
                   else "it is clean-label" if self.clean_label
                   else "its trigger is learned while it implants" if self.learned
                   else "it implants its own way")
            raise BadExpertError(f"attack '{self.name}' cannot take 'online': {why}; leave 'online' out")
        second = self.second_batch_rate or ("cover_rate" if self.online else None)
        if second is not None and self.poison_rate + getattr(self, second) > 1 + 1e-9:
            raise BadExpertError(
                f"attack '{self.name}' parameters 'poison_rate' ({self.poison_rate:g}) and '{second}' "
                f"({getattr(self, second):g}) add up to more than 1 per batch; lower one of them"
            )
        self._cache: dict = {}
        if not _RESTORING.get():
            self.check_files()

    @classmethod
    def can_poison_online(cls) -> bool:
        """Whether ``online=True`` applies: a dirty-label attack whose trigger is a fixed function
        of the input and that implants by the default :meth:`implant` (poison, then train)."""
        return (cls.second_batch_rate is None and not cls.clean_label and not cls.learned
                and cls.implant is Attack.implant)

    def source_files(self) -> list[str]:
        """The files the trigger is built from (a trigger image by default): the suspect-model cache
        keys on their content, so editing them in place trains a new model."""
        return [self.trigger_image] if getattr(self, "trigger_image", None) else []

    def check_files(self) -> None:
        """Check the files the attack names (a trigger image by default), before any data is read."""
        if getattr(self, "trigger_image", None):
            load_trigger_image(self.trigger_image, 3, (1, 1))

    # --- what subclasses implement -------------------------------------------------------
    def build_trigger(self, shape: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        """Tensors the trigger needs for images of ``shape = (C, H, W)`` (cached per shape).

        A learned attack cannot build its trigger from its parameters: it raises
        :meth:`not_learned_yet`'s error (its state comes from :meth:`implant` or a saved model)."""
        if self.learned:
            raise self.not_learned_yet(shape)
        return {}

    def initial_state(self, shape: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        """The trigger state before any training, seeded by ``trigger_seed`` (for a learned attack:
        the generator's or encoder's initial weights; otherwise what :meth:`build_trigger` makes).
        Learned attacks start :meth:`implant` from it; tests use it to exercise the machinery
        without training (``attack.restore_state(shape, attack.initial_state(shape))``)."""
        return self.build_trigger(tuple(shape))

    def not_learned_yet(self, shape) -> BadExpertError:
        c, h, w = shape
        return BadExpertError(
            f"attack '{self.name}' learns its trigger while it implants the backdoor; it has no trigger for "
            f"{c}x{h}x{w} images yet: implant it first, or load a model trained with it (attack_from_meta / evaluate)"
        )

    def trigger(self, x: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Apply the test-time trigger to a float batch in ``[0, 1]``."""
        raise NotImplementedError

    def trigger_train(self, x: torch.Tensor, parts: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """The trigger used on poisoned training samples (the test-time one unless overridden)."""
        return self.trigger(x, parts)

    def trigger_cover(self, x: torch.Tensor, parts: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """The trigger used on cover samples (which keep their labels)."""
        return self.trigger_train(x, parts, generator)

    # --- shared machinery ----------------------------------------------------------------
    def _parts(self, shape: tuple[int, int, int], device: torch.device) -> dict[str, torch.Tensor]:
        key = (tuple(shape), str(device))
        if key not in self._cache:
            cpu = self._cache.get((tuple(shape), "cpu"))
            if cpu is None:
                cpu = self.build_trigger(tuple(shape))
                self._cache[(tuple(shape), "cpu")] = cpu
            self._cache[key] = {k: v.to(device) for k, v in cpu.items()}
        return self._cache[key]

    def trigger_state(self, shape: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        """The trigger's tensors for images of ``shape`` (what :meth:`build_trigger` made from the
        parameters, the seed and any files), on the CPU: saved with the suspect model."""
        return {k: v.detach().cpu().contiguous() for k, v in self._parts(tuple(shape), torch.device("cpu")).items()}

    def restore_state(self, shape: tuple[int, int, int], state: dict[str, torch.Tensor], *, source: str = "the model file") -> None:
        """Use ``state`` (from :meth:`trigger_state`, read back from a saved model) as the trigger for
        images of ``shape`` instead of building it again. A state that does not fit the attack
        (tampered or from another attack) is a one-line error."""
        shape = tuple(int(v) for v in shape)
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            raise BadExpertError(f"the trigger state in {source} is not a set of named tensors")
        bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise BadExpertError(f"the trigger state in {source} has non-finite values ('{bad[0]}'); the file is damaged")
        self.use_state(shape, state)
        probe = torch.zeros(2, *shape)
        try:
            out = self.trigger_test(probe, self._cache[(shape, "cpu")], torch.Generator().manual_seed(0))
            if tuple(out.shape) != tuple(probe.shape):
                raise ValueError(f"it gives shape {tuple(out.shape)}")
        except (RuntimeError, KeyError, IndexError, ValueError, TypeError) as exc:
            self._cache = {}
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise BadExpertError(
                f"the trigger state in {source} does not fit attack '{self.name}' on {shape[0]}x{shape[1]}x{shape[2]} "
                f"images ({first}); the file is damaged or was edited"
            ) from exc

    def use_state(self, shape: tuple[int, int, int], state: dict[str, torch.Tensor]) -> None:
        """Make ``state`` the trigger for images of ``shape`` (a learned attack calls this when
        :meth:`implant` has trained its trigger; :meth:`restore_state` checks a saved one first)."""
        self._cache = {(tuple(int(v) for v in shape), "cpu"): {k: v.detach().cpu() for k, v in state.items()}}

    def trigger_test(self, x: torch.Tensor, parts: dict[str, torch.Tensor], generator: torch.Generator | None) -> torch.Tensor:
        """The test-time trigger; attacks whose test trigger is random per input (a reflection, a
        patch placement, warping noise) draw from ``generator``. Default: :meth:`trigger`."""
        return self.trigger(x, parts)

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Trigger a batch: uint8 or float ``[N, C, H, W]`` in, float in ``[0, 1]`` out.

        ``generator`` (a CPU generator the caller seeds) drives any per-input randomness of the
        test-time trigger, so the same seed gives the same triggered test set.
        """
        x = to_float(x)
        if x.dim() != 4:
            raise BadExpertError(f"attacks take image batches [N, C, H, W], got shape {tuple(x.shape)}")
        return self.trigger_test(x, self._parts(tuple(x.shape[1:]), x.device), generator).clamp(0, 1)

    def implant(self, train_set: Dataset, build_model: Callable[[], nn.Module], recipe, seed: int, *,
                log: Callable[[str], Any] = print, components: Components | None = None) -> tuple[nn.Module, dict]:
        """Produce the suspect model: ``(model, info)``.

        The default poisons ``train_set`` (:meth:`poison`) and trains ``build_model()`` with the
        one training loop and ``recipe``. Attacks that train differently (negative samples in
        every batch, a trigger generator trained jointly, finetuning a clean model, weight
        surgery) override this; the pipeline and its model cache go through it.

        ``components`` (:class:`~badexpert.attacks.components.Components`) builds and caches the
        attack's trained parts (a clean host model, a generator) by content hash and times each
        phase; ``info`` ends with its :meth:`~badexpert.attacks.components.Components.info`
        (``phase_seconds``, ``components``), which the pipeline saves in the model's metadata.
        """
        from ..training import train
        from ..utils import derive_generator

        components = components if components is not None else Components(log=log)
        if self.online:
            return self.implant_online(train_set, build_model, recipe, seed, log=log, components=components)
        with components.phase("poison"):
            data = self.poison(train_set, derive_generator(seed, "poison"))
        info = {"poisoned_samples": len(data.meta["poison_indices"]), "cover_samples": len(data.meta["cover_indices"])}
        log(f"poisoned {info['poisoned_samples']} of {len(data)} training samples with {self.describe()}")
        model = build_model()
        with components.phase("suspect_model"):
            train(model, data, recipe, seed=seed, desc="suspect model")
        return model, {**info, **components.info()}

    def implant_online(self, train_set: Dataset, build_model: Callable[[], nn.Module], recipe, seed: int, *,
                       log: Callable[[str], Any] = print, components: Components) -> tuple[nn.Module, dict]:
        """:meth:`implant` with ``online=True``, WaNet's own procedure: the training set stays
        clean and every batch is poisoned after augmentation (:meth:`poison_batch`: ``poison_rate``
        and ``cover_rate`` of each batch, rounded, chosen afresh each time), so the network always
        sees the trigger as the attack builds it, never shifted by a crop or mirrored by a flip."""
        from ..training import train

        bs, n_poison, n_cover = self.online_counts(train_set, recipe)
        log(f"{self.describe()}: {n_poison} backdoor (and {n_cover} cover) samples in every batch of {bs}, "
            "poisoned after augmentation")
        num_classes = train_set.num_classes

        def poison(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            x, y, _, _ = self.poison_batch(x, y, generator, num_classes=num_classes)
            return x, y

        model = build_model()
        with components.phase("suspect_model"):
            train(model, train_set, recipe, seed=seed, desc="suspect model", batch_transform=poison)
        info = {"poisoned_per_batch": n_poison, "cover_per_batch": n_cover, "batch_size": bs}
        return model, {**info, **components.info()}

    def per_batch(self, batch_size: int) -> tuple[int, int]:
        """Attacks that poison every training batch online (BPP, FT, Dynamic, and any attack given
        ``online=True``): how many samples of a ``batch_size`` batch get the backdoor
        (``poison_rate``), and how many the attack's second kind of sample (the field
        :attr:`second_batch_rate` names, ``cover_rate`` with ``online``: negative, cover or
        cross-trigger samples)."""
        second = self.second_batch_rate or ("cover_rate" if self.online else None)
        if second is None:
            raise NotImplementedError(f"attack '{self.name}' does not poison batches online")
        return (int(round(self.poison_rate * batch_size)),
                int(round(getattr(self, second) * batch_size)))

    def online_counts(self, train_set: Dataset, recipe) -> tuple[int, int, int]:
        """``(batch size, backdoor samples, other samples)`` per batch of an online-poisoning
        :meth:`implant` (:meth:`per_batch`); a rate that poisons nothing is a one-line error."""
        self.check(train_set.num_classes)
        bs = min(recipe.batch_size, len(train_set))
        n_poison, n_other = self.per_batch(bs)
        if self.poison_rate > 0 and n_poison == 0:
            raise BadExpertError(
                f"poison rate {self.poison_rate} poisons no sample of a {bs}-sample batch; "
                "raise the poison rate or the batch size"
            )
        return bs, n_poison, n_other

    def batch_roles(self, labels: torch.Tensor, generator: torch.Generator, *, num_classes: int | None = None,
                    partnered: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The two kinds of samples of one online-poisoned training batch (:meth:`per_batch` of
        them), from one random order drawn from ``generator``: backdoor samples among those that
        count (:meth:`counts`), then second-kind samples (negative, cover or cross-trigger) among
        the :meth:`cover_candidates` not already chosen. ``partnered``: the second kind needs
        another sample of the batch (:meth:`partners`), so a batch of one gets none."""
        n = len(labels)
        n_first, n_second = self.per_batch(n)
        labels = labels.cpu()
        order = torch.randperm(n, generator=generator)
        first = order[self.counts(labels, num_classes)[order]][:n_first]
        may = torch.zeros(n, dtype=torch.bool)
        may[self.cover_candidates(labels, num_classes)] = True
        may[first] = False
        second = order[may[order]][:n_second] if n >= 2 or not partnered else order[:0]
        return first, second

    def poison_batch(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, *,
                     num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Online poisoning of one training batch (float images in ``[0, 1]`` and labels, on the
        model's device): the :meth:`batch_roles` backdoor samples get the training trigger and
        :meth:`target_of`'s label, the second-kind samples the cover trigger with their labels
        kept. Returns ``(x, y, poison_idx, cover_idx)`` (new tensors; the indices on the CPU).
        Choices come from ``generator`` (CPU); the trigger runs on ``x``'s device."""
        yc = y.cpu()
        poison_idx, cover_idx = self.batch_roles(yc, generator, num_classes=num_classes)
        x, y = x.clone(), y.clone()
        parts = self._parts(tuple(x.shape[1:]), x.device)
        if len(poison_idx):
            pd = poison_idx.to(x.device)
            x[pd] = self.trigger_train(x[pd], parts, generator).clamp(0, 1).to(x.dtype)
            y[pd] = self.target_of(yc[poison_idx], num_classes).to(y.device)
        if len(cover_idx):
            cd = cover_idx.to(x.device)
            x[cd] = self.trigger_cover(x[cd], parts, generator).clamp(0, 1).to(x.dtype)
        return x, y, poison_idx, cover_idx

    @staticmethod
    def partners(idx: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
        """For each index of ``idx`` (in ``0..n-1``, ``n >= 2``) another random index of ``0..n-1``."""
        if not len(idx):
            return idx
        return (idx + torch.randint(1, n, (len(idx),), generator=generator)) % n

    def target_of(self, labels: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
        """The label the attacker wants for triggered inputs of these true labels."""
        if self.all_to_all:
            if num_classes is None:
                raise BadExpertError("an all-to-all attack needs the number of classes")
            return (labels + 1) % num_classes
        return torch.full_like(labels, self.target)

    def counts(self, labels: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
        """Boolean mask of test inputs that count towards the attack success rate."""
        mask = self.target_of(labels, num_classes) != labels
        if self.source_classes is not None:
            mask &= torch.isin(labels, torch.tensor(self.source_classes, dtype=labels.dtype))
        return mask

    def check_source_classes(self) -> None:
        """For a source-specific attack (its ``__post_init__`` calls this): at least one source
        class, none of them the target; otherwise a one-line error."""
        if not self.source_classes:
            raise BadExpertError(f"attack '{self.name}' parameter 'source_classes' must name at least one class")
        if self.target in self.source_classes:
            raise BadExpertError(
                f"attack '{self.name}' parameter 'source_classes' {list(self.source_classes)} contains the target "
                f"class {self.target}; a source class must differ from the target"
            )

    def check_architecture(self, arch: str) -> None:
        """A one-line error if the attack cannot implant into architecture ``arch`` (a registry
        name); called by ``ExperimentConfig.validate()`` before any data is read. Default: any."""

    def check(self, num_classes: int) -> None:
        if not self.all_to_all and not 0 <= self.target < num_classes:
            raise BadExpertError(f"target class {self.target} is outside 0..{num_classes - 1}")
        for c in self.source_classes or ():
            if not 0 <= c < num_classes:
                raise BadExpertError(f"source class {c} is outside 0..{num_classes - 1}")

    def poison_candidates(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Indices of training samples that may be poisoned."""
        if self.clean_label:
            mask = labels == self.target
        else:
            mask = self.counts(labels, num_classes)
        return mask.nonzero().flatten()

    def cover_candidates(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Indices of training samples that may become cover samples (trigger, true label kept):
        any sample by default; an attack restricts it (TaCT: only the cover classes). Poisoned
        samples are never covers."""
        return torch.arange(len(labels))

    def poison_count(self, dataset: Dataset) -> tuple[torch.Tensor, int]:
        """``(candidate indices, number to poison)`` for :meth:`poison` on ``dataset``: a rate
        that asks for more samples than can be poisoned (dirty-label), or for none, is a one-line
        error. An :meth:`implant` that does expensive work before poisoning (a surrogate, an
        encoder, a trigger optimisation) calls it first, so a bad rate fails at once."""
        self.check(dataset.num_classes)
        cand = self.poison_candidates(dataset.labels, dataset.num_classes)
        n_poison = int(round(self.poison_rate * len(dataset)))
        if n_poison > len(cand):
            if self.clean_label:
                n_poison = len(cand)  # capped at the number of target-class samples, as in SIG/CL
            else:
                raise BadExpertError(
                    f"poison rate {self.poison_rate} asks for {n_poison} samples but only {len(cand)} can be poisoned"
                )
        if self.poison_rate > 0 and n_poison == 0:
            raise BadExpertError(
                f"poison rate {self.poison_rate} poisons no {'target-class ' if self.clean_label else ''}sample of a "
                f"{len(dataset)}-sample training set; raise --poison-rate"
            )
        return cand, n_poison

    def poison(self, dataset: Dataset, generator: torch.Generator) -> Dataset:
        """A poisoned copy of ``dataset`` (the original is untouched).

        ``round(poison_rate * len(dataset))`` samples are drawn from :meth:`poison_candidates`,
        triggered and (unless clean-label) relabelled; ``round(cover_rate * len(dataset))`` other
        samples are triggered with their labels kept. The chosen indices are recorded in the
        returned dataset's ``meta`` (``poison_indices``, ``cover_indices``).
        """
        n = len(dataset)
        labels = dataset.labels
        cand, n_poison = self.poison_count(dataset)
        poison_idx = cand[torch.randperm(len(cand), generator=generator)[:n_poison]].sort().values
        rest = torch.zeros(n, dtype=torch.bool)
        rest[self.cover_candidates(labels, dataset.num_classes)] = True
        rest[poison_idx] = False
        rest_idx = rest.nonzero().flatten()
        n_cover = min(int(round(self.cover_rate * n)), len(rest_idx))
        cover_idx = rest_idx[torch.randperm(len(rest_idx), generator=generator)[:n_cover]].sort().values

        images = dataset.images.clone()
        new_labels = labels.clone()
        parts = self._parts(tuple(images.shape[1:]), torch.device("cpu"))
        for chunk in poison_idx.split(1024):
            images[chunk] = to_uint8(self.trigger_train(to_float(images[chunk]), parts, generator).clamp(0, 1))
        for chunk in cover_idx.split(1024):
            images[chunk] = to_uint8(self.trigger_cover(to_float(images[chunk]), parts, generator).clamp(0, 1))
        if not self.clean_label:
            new_labels[poison_idx] = self.target_of(labels[poison_idx], dataset.num_classes)
        return dataset.with_data(
            images, new_labels, name=f"{dataset.name}+{self.name}",
            poison_indices=poison_idx.tolist(), cover_indices=cover_idx.tolist(),
        )

    # --- serialisation -------------------------------------------------------------------
    def params(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)
             if not (f.metadata.get("omit_default") and getattr(self, f.name) == f.default)}
        if d.get("source_classes") is not None:
            d["source_classes"] = list(d["source_classes"])
        return d

    def to_dict(self) -> dict:
        return {"name": self.name, **self.params()}

    def describe_target(self, class_names: list[str] | None = None) -> str:
        """What triggered inputs should become, for reports: the target class (named), or
        ``(y + 1) mod C`` for an all-to-all attack, and the source classes of a source-specific one."""
        def named(c: int) -> str:
            return f"{c} ({class_names[c]})" if class_names is not None and 0 <= c < len(class_names) else str(c)

        text = "(y + 1) mod C (all-to-all)" if self.all_to_all else named(self.target)
        if self.source_classes is not None:
            text += f", from source class(es) {', '.join(named(c) for c in self.source_classes)} only"
        return text

    def describe(self) -> str:
        p = ", ".join(f"{k}={v}" for k, v in self.params().items() if v not in (None, 0.0) or k == "target")
        return f"{self.name}({p})"


def place_bottom_right(h: int, w: int, size: tuple[int, int], margin: int) -> tuple[slice, slice]:
    """Rows and columns of a ``size`` patch ``margin`` pixels from the bottom-right corner."""
    ph, pw = size
    if ph + margin > h or pw + margin > w:
        raise BadExpertError(f"a {ph}x{pw} trigger does not fit in a {h}x{w} image")
    return slice(h - margin - ph, h - margin), slice(w - margin - pw, w - margin)


def load_trigger_image(path: str, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """A user's trigger image as float ``[C, h, w]`` in ``[0, 1]`` (resized bilinearly to ``size``).

    Decoded with the same checks as dataset images (format, file size, pixel count before
    decoding: a decompression bomb is a one-line error).
    """
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from ..data.imagefolder import open_image

    p = Path(path).expanduser()
    if not p.is_file():
        raise BadExpertError(f"trigger image '{p}' does not exist")
    im = open_image(p, name=str(p), mode="L" if channels == 1 else "RGB")
    arr = np.asarray(im.resize((size[1], size[0]), getattr(Image, "Resampling", Image).BILINEAR), dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).float() / 255
    return t[None] if t.dim() == 2 else t.permute(2, 0, 1)
