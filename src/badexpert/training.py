"""One loop for training and finetuning, driven by a :class:`Recipe`.

The suspect model, the backdoor expert and the auxiliary model are all produced by :func:`train`;
they differ only in their recipe and labels. Data stays as uint8 tensors and is augmented in
batches on the device; every random choice (batch order, augmentation) comes from a generator
derived from the seed.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .data.core import Dataset, as_tensors, augment, batches, default_pad, to_float
from .errors import BadExpertError, TimeBudgetReached
from .models import channels_last, use_channels_last  # noqa: F401 - channels_last: part of this module's API
from .utils import derive_generator, eval_mode, model_device, progress
from .validation import OneOf, PositiveInt, Range, expect, validate_fields


@dataclass
class Recipe:
    """How to train or finetune: optimiser, schedule, epochs, batch size, augmentation.

    ``schedule``: ``"step"`` (multiply the lr by ``gamma`` at each epoch in ``milestones``),
    ``"cosine"`` (cosine decay to zero over all steps, with ``warmup_epochs`` of linear warm-up)
    or ``"constant"``. ``augment``: random crop (``pad`` pixels, default scaled to the image
    size) and horizontal flip where ``hflip`` allows it; ``hflip=None`` takes the dataset's own
    flag (:attr:`Dataset.hflip`), and no flips for a bare ``(images, labels)`` pair.
    """

    optimizer: Annotated[str, OneOf("sgd", "adam", "adamw")] = "sgd"
    lr: Annotated[float, Range(gt=0)] = 0.1
    epochs: PositiveInt = 10
    batch_size: PositiveInt = 128
    momentum: Annotated[float, Range(ge=0, lt=1)] = 0.9
    nesterov: bool = False
    weight_decay: Annotated[float, Range(ge=0)] = 5e-4
    schedule: Annotated[str, OneOf("cosine", "step", "constant")] = "cosine"
    milestones: tuple[Annotated[int, Range(ge=0)], ...] = ()
    gamma: Annotated[float, Range(gt=0)] = 0.1
    warmup_epochs: Annotated[float, Range(ge=0)] = 0.0
    augment: bool = True
    hflip: bool | None = None
    pad: Annotated[int, Range(ge=0)] | None = None
    label_smoothing: Annotated[float, Range(ge=0, lt=1)] = 0.0
    amp: bool = True
    max_steps: PositiveInt | None = None

    def __post_init__(self) -> None:
        validate_fields(self, "recipe field")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise BadExpertError(f"unknown recipe field(s) {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**d)

    def crop_and_flip(self, image_size: tuple[int, int], data=None) -> tuple[int, bool]:
        """``(pad, hflip)`` the augmentation uses on images of ``image_size``: the recipe's own, or
        the default pad for the size and the data's flip flag (:attr:`Dataset.hflip`; other data:
        no flips)."""
        pad = default_pad(tuple(image_size)) if self.pad is None else self.pad
        hflip = self.hflip if self.hflip is not None else (data.hflip if isinstance(data, Dataset) else False)
        return pad, hflip

    def replace(self, **kw) -> "Recipe":
        return replace(self, **kw)


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    name = recipe.optimizer.lower()
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov and recipe.momentum > 0,
            weight_decay=recipe.weight_decay,
        )
    if name == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    raise BadExpertError(f"unknown optimizer '{recipe.optimizer}'; choose one of: adam, adamw, sgd")


def lr_at(recipe: Recipe, step: int, steps_per_epoch: int) -> float:
    """The learning rate of ``recipe`` at a global step (0-based)."""
    total = max(1, recipe.epochs * steps_per_epoch)
    epoch = step / steps_per_epoch
    warm = recipe.warmup_epochs * steps_per_epoch
    if warm > 0 and step < warm:
        return recipe.lr * (step + 1) / warm
    if recipe.schedule == "constant":
        return recipe.lr
    if recipe.schedule == "step":
        k = sum(1 for m in recipe.milestones if epoch >= m)
        return recipe.lr * (recipe.gamma**k)
    if recipe.schedule == "cosine":
        t = (step - warm) / max(1.0, total - warm)
        return recipe.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    raise BadExpertError(f"unknown schedule '{recipe.schedule}'; choose one of: constant, cosine, step")


StepCallback = Callable[[int, nn.Module], bool]
#: ``(images, labels, generator) -> (images, labels)``: changes each training batch after
#: augmentation (float images in [0, 1] on the model's device); attacks that poison online use it.
BatchTransform = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def _layout(model: nn.Module, images: torch.Tensor, device: torch.device) -> torch.memory_format | None:
    """The memory layout :func:`train` trains ``model`` in (``None``: the usual one)."""
    if use_channels_last(model, device) and images.dim() == 4 and any(p.dim() == 4 for p in model.parameters()):
        return torch.channels_last
    return None


@dataclass(frozen=True)
class TimeBudget:
    """A deadline for :func:`train` (``time.monotonic()`` seconds), the time to leave free after
    training (``reserve``: what follows it, such as fitting detectors) and where an interrupted
    training keeps its state (``checkpoint_dir``; ``None``: nothing is kept, the budget only stops)."""

    deadline: float
    reserve: float = 0.0
    checkpoint_dir: Path | None = None

    def left(self) -> float:
        return self.deadline - self.reserve - time.monotonic()


_BUDGET: ContextVar[TimeBudget | None] = ContextVar("badexpert_time_budget", default=None)


@contextlib.contextmanager
def time_budget(seconds: float | None, *, reserve: float = 0.0,
                checkpoint_dir: str | Path | None = None) -> Iterator[TimeBudget | None]:
    """Within this block, :func:`train` (without a ``callback``, or with one that hands over its
    state: a training that runs its whole schedule, as a suspect model's) stops at the end of an
    epoch when the next epoch would not end ``reserve`` seconds before the deadline (``seconds`` from now): it saves its state (model,
    optimiser, step, random generator) under ``checkpoint_dir`` and raises
    :class:`~badexpert.errors.TimeBudgetReached`. The same training started again with the same
    ``checkpoint_dir`` resumes from that state and ends with the very weights an uninterrupted run
    gives. ``seconds=None``: no deadline, but checkpoints are still resumed."""
    budget = TimeBudget(deadline=math.inf if seconds is None else time.monotonic() + seconds, reserve=reserve,
                        checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir))
    token = _BUDGET.set(budget)
    try:
        yield budget
    finally:
        _BUDGET.reset(token)


class _Checkpoint:
    """One training's saved state under the budget's checkpoint folder, keyed by everything the
    run depends on (the recipe, seed, purpose, data, labels and the initial weights) and the cache
    entry it builds (:func:`~badexpert.utils.building`: online poisoning changes batches, not the
    data, so two attacks' trainings can otherwise start alike)."""

    def __init__(self, folder: Path, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, recipe: "Recipe",
                 seed: int, desc: str) -> None:
        from .digests import json_digest, tensors_sha256
        from .utils import building

        key = json_digest({"recipe": recipe.to_dict(), "seed": seed, "desc": desc, "for": building(),
                           "data": tensors_sha256({"images": images, "labels": labels}),
                           "init": tensors_sha256(model.state_dict())}, length=24)
        self.path = folder / f"train-{key}.safetensors"

    def save(self, model: nn.Module, opt: torch.optim.Optimizer, g: torch.Generator, step: int, epoch: int,
             losses: list[torch.Tensor], callback_state: dict[str, torch.Tensor] | None = None) -> None:
        from safetensors.torch import save

        from .utils import atomic_write_bytes

        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        state = opt.state_dict()
        for idx, entries in state["state"].items():
            for name, v in entries.items():
                tensors[f"opt.{idx}.{name}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
        tensors["rng"] = g.get_state()
        tensors["losses"] = torch.stack(losses).float().cpu() if losses else torch.zeros(0)
        for k, v in (callback_state or {}).items():
            tensors[f"callback.{k}"] = v.detach().cpu().contiguous()
        meta = {"step": str(step), "epoch": str(epoch), "param_groups": json.dumps(state["param_groups"])}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, save(tensors, metadata=meta))

    def restore(self, model: nn.Module, opt: torch.optim.Optimizer, g: torch.Generator
                ) -> tuple[int, int, list, dict[str, torch.Tensor]]:
        """Load the saved state into ``model``, ``opt`` and ``g``; returns (step, epoch, losses,
        the callback's state)."""
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        device = model_device(model)
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        state: dict = {"state": {}, "param_groups": json.loads(meta["param_groups"])}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, idx, name = k.split(".", 2)
                state["state"].setdefault(int(idx), {})[name] = v.to(device) if name != "step" else v
        opt.load_state_dict(state)
        g.set_state(tensors["rng"])
        losses = [t for t in tensors["losses"].to(device)]
        state = {k[9:]: v for k, v in tensors.items() if k.startswith("callback.")}
        return int(meta["step"]), int(meta["epoch"]), losses, state


@dataclass
class TrainLog:
    steps: int = 0
    epochs_run: float = 0.0
    losses: list[float] = field(default_factory=list)
    stopped_early: bool = False


def train(
    model: nn.Module,
    data,
    recipe: Recipe,
    *,
    seed: int = 0,
    labels: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    callback_every: int = 0,
    batch_transform: BatchTransform | None = None,
    desc: str = "train",
) -> TrainLog:
    """Train ``model`` in place on ``data`` (a Dataset or ``(images, labels)``) with ``recipe``.

    ``labels`` overrides the dataset's labels (the backdoor expert trains on wrong labels).
    ``callback(step, model)`` runs every ``callback_every`` steps and after every epoch; if it
    returns True, training stops there (the model is left in train mode either way). Under a
    :func:`time_budget`, a training with a callback is stopped and resumed only when the callback
    hands over its state (``state_dict() -> dict[str, Tensor]``, ``load_state_dict(dict)``). The
    model stays on its device; data is moved there batch by batch. ``batch_transform(x, y, generator)``
    changes each batch after augmentation (online poisoning: BPP's backdoor and negative samples,
    finetuning attacks); it draws its randomness from the loop's seeded generator.
    """
    expect(model, nn.Module, "the model")
    expect(recipe, Recipe, "the recipe")
    images, y = as_tensors(data)
    if labels is not None:
        _, y = as_tensors((images, labels))
    if y is None:
        raise BadExpertError("training needs labels: pass a Dataset or an (images, labels) pair")
    if len(images) == 0:
        raise BadExpertError("cannot train on an empty dataset")
    model_outputs(model, images, y)  # the model takes these images, and the labels fit its outputs
    device = model_device(model)
    g = derive_generator(seed, f"train:{desc}")
    layout = _layout(model, images, device)
    if layout is not None:  # before the optimiser sees the weights
        model.to(memory_format=layout)
    opt = make_optimizer(model, recipe)
    bs = min(recipe.batch_size, len(images))
    steps_per_epoch = max(1, len(images) // bs)  # drop_last: keeps BatchNorm away from 1-sample batches
    pad, hflip = recipe.crop_and_flip(tuple(images.shape[2:]), data)
    use_amp = recipe.amp and device.type == "cuda"
    amp_ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else contextlib.nullcontext
    log = TrainLog()
    total = recipe.epochs * steps_per_epoch
    if recipe.max_steps is not None:
        total = min(total, recipe.max_steps)
    model.train()
    bar = progress(total=total, desc=desc)
    losses: list[torch.Tensor] = []  # kept on the device: no host sync per step
    last_check = -1
    # a budget applies to trainings whose whole state it can keep: those without a callback (a
    # suspect model) and those whose callback hands over its state (``state_dict``/``load_state_dict``:
    # the BaDExpert-aware attack's simulated expert); one with a stopping rule that keeps its state
    # to itself (the detectors' finetuning) is short and left alone
    resumable = callback is None or (callable(getattr(callback, "state_dict", None))
                                     and callable(getattr(callback, "load_state_dict", None)))
    budget = _BUDGET.get() if resumable else None
    saved = None if budget is None or budget.checkpoint_dir is None else _Checkpoint(
        budget.checkpoint_dir, model, images, y, recipe, seed, desc)
    step, first_epoch = 0, 0
    if saved is not None and saved.path.is_file():
        step, first_epoch, losses, state = saved.restore(model, opt, g)
        if callback is not None:
            callback.load_state_dict(state)
            last_check = step  # it ran at this epoch's end before the state was kept
        bar.update(step)

    def check(step: int) -> bool:
        nonlocal last_check
        if callback is None or step == last_check:
            return False
        last_check = step
        return bool(callback(step, model))

    # trainings nested in this one (a simulated expert in a callback) run whole: the budget stops
    # the outermost training, at its own epoch's end
    nested = _BUDGET.set(None)
    try:
        epoch_started = time.monotonic()
        for epoch in range(first_epoch, recipe.epochs):
            for xb, yb in batches(images, y, batch_size=bs, device=device, shuffle=True, generator=g, drop_last=True):
                if step >= total:
                    break
                if recipe.augment:
                    xb = augment(xb, pad=pad, hflip=hflip, generator=g)
                if batch_transform is not None:
                    xb, yb = batch_transform(xb, yb, g)
                if layout is not None:
                    xb = xb.contiguous(memory_format=layout)
                for group in opt.param_groups:
                    group["lr"] = lr_at(recipe, step, steps_per_epoch)
                with amp_ctx():
                    loss = F.cross_entropy(model(xb), yb, label_smoothing=recipe.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                losses.append(loss.detach())
                bar.update(1)
                if callback_every and step % callback_every == 0 and step < total and check(step):
                    log.stopped_early = True
                    return log
            if check(step):  # after every epoch (unless it just ran at this step)
                log.stopped_early = step < total
                break
            if step >= total:
                break
            now = time.monotonic()
            if budget is not None and budget.left() < now - epoch_started:  # the next epoch would not fit
                if saved is not None:
                    saved.save(model, opt, g, step, epoch + 1, losses,
                               None if callback is None else callback.state_dict())
                raise TimeBudgetReached(f"{desc}: stopped at its time budget after epoch {epoch + 1} of "
                                        f"{recipe.epochs}" + (f"; its state is kept in {saved.path}"
                                                              if saved is not None else ""))
            epoch_started = now
        if saved is not None:
            saved.path.unlink(missing_ok=True)
        return log
    finally:
        _BUDGET.reset(nested)
        log.losses = torch.stack(losses).float().tolist() if losses else []
        log.steps = len(log.losses)
        log.epochs_run = log.steps / steps_per_epoch
        bar.close()
        if layout is not None:
            model.to(memory_format=torch.contiguous_format)
        model.train()


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)``, with a model that cannot take these images (wrong channels, too small) or does
    not return logits ``[N, classes]`` reported as one line."""
    try:
        out = model(x)
    except (RuntimeError, ValueError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise BadExpertError(
            f"the model cannot take images of shape {tuple(x.shape[1:])} ({first}); give images of the size and "
            "channels it was built for"
        ) from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise BadExpertError(f"the model must return logits [N, classes], got {getattr(out, 'shape', type(out).__name__)}")
    return out


@torch.no_grad()
def model_outputs(model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None) -> int:
    """The number of outputs (classes) of ``model``, from one forward pass on two of ``images``;
    labels beyond it are a one-line error."""
    expect(model, nn.Module, "the model")
    with eval_mode(model):
        out = forward(model, to_float(images[:2]).to(model_device(model)))
    n = int(out.shape[1])
    if labels is not None and len(labels) and int(labels.max()) >= n:
        raise BadExpertError(f"labels go up to {int(labels.max())} but the model has {n} outputs (classes 0..{n - 1})")
    return n


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
    """Logits of ``model`` (eval mode) for uint8 or float images, returned on the CPU."""
    expect(model, nn.Module, "the model")
    device = model_device(model)
    out = []
    with eval_mode(model):
        for xb, _ in batches(images, None, batch_size=batch_size, device=device):
            out.append(forward(model, xb).float().cpu())
    if not out:
        return torch.empty(0)
    return torch.cat(out)


def accuracy(model: nn.Module, data, *, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on a Dataset or ``(images, labels)`` pair."""
    images, y = as_tensors(data)
    if y is None or len(y) == 0:
        raise BadExpertError("accuracy needs a non-empty labelled dataset")
    pred = predict_logits(model, images, batch_size=batch_size).argmax(1)
    return float((pred == y).float().mean())
