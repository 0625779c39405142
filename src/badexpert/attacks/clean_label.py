"""Clean-label (Turner, Tsipras and Madry, 2019, "Label-consistent backdoor attacks").

A clean-label attack may not change labels, so the images it poisons must be of the target class
and look it. If they are easy to classify, the model learns them from their content and ignores
the trigger; Turner et al. make them *hard* first: an adversarial perturbation (projected gradient
descent against a model trained on clean data) destroys the features that identify the class,
within a small norm ball, so the model has to rely on the trigger to fit their (correct) label.
Then the trigger is stamped on them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..data.core import Dataset
from ..errors import BadExpertError
from ..validation import OneOf, PositiveInt, Range
from .base import Attack, Rate
from .components import Components
from .patch import BadNet, paste

#: The reference's l2 radius: MadryLab's ``two_600`` images, 600 on the 0-255 scale.
REFERENCE_L2_EPS = 600 / 255
#: Images perturbed per forward/backward pass (bounds the memory PGD needs).
PGD_BATCH = 256


@dataclass
class CleanLabel(Attack):
    """Label-consistent backdoor: target-class training images, made hard to classify by PGD
    against a surrogate model, carry a 3x3 patch in each of the four corners; labels are kept.

    **Poisoning.** ``round(poison_rate * N)`` training images of the target class (capped at the
    class size) are chosen exactly as :meth:`Attack.poison` chooses clean-label samples (the
    base machinery is used unchanged: a seeded permutation of the target-class indices). Each
    chosen image ``x`` (true label ``y = target``) becomes::

        x_adv = PGD(x): maximise CE(f(x_adv), y) over ||x_adv - x|| <= eps, x_adv in [0, 1]
        x'    = stamp(x_adv)

    with ``pgd_steps`` steps of size ``step_size`` from ``x`` (no random start, so the result is
    a deterministic function of the surrogate): l2 steps move along the normalised gradient and
    project back on the l2 ball; l_inf steps move along the gradient's sign and clip to the
    l_inf ball; every step clamps to [0, 1] (which never leaves the ball). ``f`` is a surrogate
    model, in eval mode. **Test time**: the stamp only.

    **Trigger.** The BadNet 3x3 pattern of :class:`~badexpert.attacks.patch.BadNet` (white
    anti-diagonal and bottom-right pixel, black elsewhere; the whole square replaced), pasted in
    each of the four corners (the reference's four-corner trigger). It fits any image of at
    least ``2 * patch_size`` pixels a side (28x28 grayscale included; one channel there).

    **Surrogate.** The reference perturbs with MadryLab's precomputed images from an adversarially
    trained CIFAR-10 model. Here :meth:`implant` first trains a surrogate on the *clean* training
    set with the same architecture (``build_model()``) and the suspect model's recipe (or
    ``surrogate_epochs`` epochs of it), standard (not adversarial) training; then poisons and
    trains the suspect model. :meth:`poison` on its own needs a surrogate:
    ``poison(dataset, generator, surrogate=model)``; without one it is a one-line error.

    Parameters (reference: the BaDExpert research code's settings):

    - ``poison_rate``: **0.003** (reference), a fraction of the whole training set, all drawn
      from the target class; capped at the number of target-class images.
    - ``norm``: ``"l2"`` (**reference**) or ``"linf"``.
    - ``eps``: the radius in pixel units of [0, 1]; default **600/255 ~ 2.35** (reference l2
      radius, "600 on the 0-255 scale"). It is the l2 default: with ``norm="linf"`` pass the
      radius explicitly (typically 8/255 or 16/255); a radius above 1 is refused for l_inf.
    - ``pgd_steps``: **10**; ``step_size``: ``None`` = ``2.5 * eps / pgd_steps`` (Madry et
      al.'s rule; the reference's precomputed images do not record their step schedule).
    - ``surrogate_epochs``: ``None`` = the recipe's epochs.
    - ``patch_size``: **3** (reference, 3x3 patches on 32x32 images).

    ``implant``'s ``info`` records the surrogate's accuracy on the clean training set, the mean
    and largest perturbation norm, the surrogate's loss and accuracy on the chosen images before
    and after the perturbation, and the seconds each phase took.
    """

    poison_rate: Rate = 0.003
    norm: Annotated[str, OneOf("l2", "linf")] = "l2"
    eps: Annotated[float, Range(gt=0)] = REFERENCE_L2_EPS
    pgd_steps: PositiveInt = 10
    step_size: Annotated[float, Range(gt=0)] | None = None
    surrogate_epochs: PositiveInt | None = None
    patch_size: Annotated[int, Range(ge=1)] = 3

    name: ClassVar[str] = "cl"
    clean_label: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.norm == "linf" and self.eps > 1:
            raise BadExpertError(
                f"attack 'cl' parameter 'eps' is {self.eps:g} with norm 'linf', more than the whole pixel range; "
                "pass an l_inf radius in [0, 1] units, e.g. eps=8/255 or 16/255 (600/255 is the l2 default)"
            )
        self._adversary: dict[str, Any] | None = None

    @property
    def pgd_step(self) -> float:
        """The PGD step length actually used."""
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.pgd_steps

    # --- trigger ---------------------------------------------------------------------------
    def build_trigger(self, shape):
        c, h, w = shape
        s = self.patch_size
        if 2 * s > h or 2 * s > w:
            raise BadExpertError(
                f"four {s}x{s} corner patches do not fit in a {h}x{w} image; lower the attack parameter patch_size"
            )
        patch, _, _ = BadNet(size=s).pattern(c, s, s)  # the BadNet 3x3 pattern, alone
        pattern = torch.zeros(c, h, w)
        mask = torch.zeros(1, h, w)
        for rows in (slice(0, s), slice(h - s, h)):
            for cols in (slice(0, s), slice(w - s, w)):
                pattern[:, rows, cols] = patch
                mask[:, rows, cols] = 1.0
        return {"pattern": pattern, "mask": mask}

    def trigger(self, x, parts):
        return paste(x, parts)

    def trigger_train(self, x, parts, generator):
        adv = self._adversary
        if adv is None:
            raise BadExpertError(self._no_surrogate())
        y = torch.full((len(x),), self.target, dtype=torch.long)
        out = torch.empty_like(x)
        for start in range(0, len(x), PGD_BATCH):
            sl = slice(start, start + PGD_BATCH)
            out[sl] = self._perturb_and_record(adv, x[sl], y[sl])
        return self.trigger(out, parts)

    def trigger_cover(self, x, parts, generator):
        return self.trigger(x, parts)  # covers (cover_rate > 0) keep their content and labels: stamp only

    # --- the adversarial perturbation ------------------------------------------------------
    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """PGD on float images ``x`` in [0, 1] (any device; returned on it): maximise the
        cross-entropy of ``model`` on labels ``y`` within the ``norm`` ball of radius ``eps``."""
        from ..utils import eval_mode, model_device

        device = model_device(model)
        x0 = x.detach().to(device, torch.float32)
        y = y.to(device)
        eps, step = self.eps, self.pgd_step
        xa = x0.clone()
        with eval_mode(model), torch.enable_grad():
            for _ in range(self.pgd_steps):
                xa.requires_grad_(True)
                loss = F.cross_entropy(model(xa), y, reduction="sum")
                (grad,) = torch.autograd.grad(loss, xa)
                xa = xa.detach()
                if self.norm == "linf":
                    delta = (xa + step * grad.sign() - x0).clamp(-eps, eps)
                else:
                    gnorm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                    delta = xa + step * grad / gnorm - x0
                    dnorm = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                    delta = delta * (eps / dnorm).clamp(max=1.0)
                xa = (x0 + delta).clamp(0, 1)  # clamping moves each pixel towards x0: stays in the ball
        return xa.to(x.device)

    def _perturb_and_record(self, adv: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from ..utils import eval_mode, model_device

        model = adv["model"]
        t0 = time.perf_counter()
        xa = self.perturb(model, x, y)
        adv["seconds"] += time.perf_counter() - t0
        with torch.no_grad(), eval_mode(model):
            dev = model_device(model)
            yd = y.to(dev)
            for key, images in (("before", x), ("after", xa)):
                logits = model(images.to(dev, torch.float32))
                adv[f"loss_{key}"] += float(F.cross_entropy(logits, yd, reduction="sum"))
                adv[f"correct_{key}"] += int((logits.argmax(1) == yd).sum())
        d = (xa - x).flatten(1)
        adv["n"] += len(x)
        adv["l2_sum"] += float(d.norm(dim=1).sum())
        adv["l2_max"] = max(adv["l2_max"], float(d.norm(dim=1).max())) if len(x) else adv["l2_max"]
        adv["linf_max"] = max(adv["linf_max"], float(d.abs().max())) if len(x) else adv["linf_max"]
        return xa

    # --- poisoning and implanting ----------------------------------------------------------
    def _no_surrogate(self) -> str:
        return ("attack 'cl' perturbs its poisoned images against a surrogate model: use implant(...), which trains "
                "one on the clean training set, or pass poison(dataset, generator, surrogate=model)")

    def poison(self, dataset: Dataset, generator: torch.Generator, surrogate: nn.Module | None = None) -> Dataset:
        """A poisoned copy of ``dataset``: the target-class images :meth:`Attack.poison` chooses,
        perturbed by PGD against ``surrogate`` and stamped, labels kept. The perturbation's
        statistics are in the result's ``meta["perturbation"]``."""
        if surrogate is None:
            raise BadExpertError(self._no_surrogate())
        if not isinstance(surrogate, nn.Module):
            raise BadExpertError(f"the surrogate must be a torch.nn.Module, got {type(surrogate).__name__}")
        self._adversary = {"model": surrogate, "n": 0, "l2_sum": 0.0, "l2_max": 0.0, "linf_max": 0.0, "seconds": 0.0,
                           "loss_before": 0.0, "loss_after": 0.0, "correct_before": 0, "correct_after": 0}
        try:
            out = super().poison(dataset, generator)
            adv = self._adversary
        finally:
            self._adversary = None
        n = max(1, adv["n"])
        out.meta["perturbation"] = {
            "norm": self.norm, "eps": self.eps, "steps": self.pgd_steps, "step_size": self.pgd_step,
            "images": adv["n"], "mean_l2": adv["l2_sum"] / n, "max_l2": adv["l2_max"], "max_linf": adv["linf_max"],
            "surrogate_loss_before": adv["loss_before"] / n, "surrogate_loss_after": adv["loss_after"] / n,
            "surrogate_accuracy_before": adv["correct_before"] / n, "surrogate_accuracy_after": adv["correct_after"] / n,
            "seconds": adv["seconds"],
        }
        return out

    def implant(self, train_set: Dataset, build_model: Callable[[], nn.Module], recipe, seed: int, *,
                log: Callable[[str], Any] = print, components: Components | None = None) -> tuple[nn.Module, dict]:
        """Train a surrogate on the clean ``train_set`` (a cached component: the clean model of
        the same recipe), poison with PGD against it, train the suspect model on the poisoned set
        (all with ``recipe``, seeded by ``seed``)."""
        from ..training import accuracy, train
        from ..utils import derive_generator

        components = components if components is not None else Components(log=log)
        self.poison_count(train_set)  # a rate that poisons nothing fails before the surrogate trains
        srecipe = recipe if self.surrogate_epochs is None else recipe.replace(epochs=self.surrogate_epochs)
        log(f"clean-label: a surrogate model trained on the clean training set ({srecipe.epochs} epochs)")
        surrogate = components.clean_model(build_model, train_set, srecipe, seed, desc="surrogate model")
        surrogate_acc = accuracy(surrogate, train_set)
        with components.phase("perturb_and_poison"):
            data = self.poison(train_set, derive_generator(seed, "poison"), surrogate=surrogate)
        pert = data.meta["perturbation"]
        del surrogate
        log(f"poisoned {len(data.meta['poison_indices'])} of {len(data)} training samples with {self.describe()} "
            f"(surrogate accuracy on them {pert['surrogate_accuracy_before']:.2f} -> {pert['surrogate_accuracy_after']:.2f})")
        model = build_model()
        with components.phase("suspect_model"):
            train(model, data, recipe, seed=seed, desc="suspect model")
        info = {
            "poisoned_samples": len(data.meta["poison_indices"]), "cover_samples": len(data.meta["cover_indices"]),
            "surrogate_train_accuracy": surrogate_acc, "surrogate_epochs": srecipe.epochs,
            "perturbation": {k: v for k, v in pert.items() if k != "seconds"},
        }
        return model, {**info, **components.info()}
