"""BaDExpert (Xie et al., ICLR 2024): backdoor-input detection with a backdoor expert.

From the suspect model M and a small clean labelled set D_c:

1. the backdoor expert B is M finetuned on D_c with deliberately wrong labels ``(y + 1) mod C``
   (Adam): it forgets the clean task but keeps the backdoor, so it agrees with M only on
   backdoor inputs;
2. the auxiliary model M' is M finetuned on D_c with the true labels and a large learning rate
   (Nesterov SGD, step decay): it keeps the clean task and weakens the backdoor;
3. for an input u with M's label ŷ, ``x = softmax(B(u))[ŷ]`` and ``y = softmax(M'(u))[ŷ]``; clean
   inputs have x small and y large, backdoor inputs x large and y small. The score combines them.

Finetuning strength. The paper's learning rates were tuned for a CIFAR-10 ResNet-18; on other
data and architectures the expert may barely unlearn, or the auxiliary model keep the backdoor.
With ``preset="auto"`` (the default) the detector chooses both strengths itself from clean data
only: a slice of D_c (``holdout``) is set aside, and

- the expert's learning rate is the smallest on a geometric grid for which the expert's
  agreement with M on the held-out clean slice falls to ``expert_agreement`` or below (the
  expert has forgotten the clean task; a larger step would also erode the backdoor);
- the auxiliary model's learning rate is the largest on a grid for which its held-out clean
  accuracy recovers to within ``aux_tolerance`` of M's own (the strongest reset of the weights
  that the clean task survives).

``preset="paper"`` runs the research code's settings unchanged (Adam 1e-4 for one epoch, Nesterov
SGD 0.1 for ten epochs with decay at 2/4/6/8, the ``triangle`` score, no held-out slice).
Explicit ``expert_lr`` / ``aux_lr`` values override either preset.
"""

from __future__ import annotations

import copy
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..data.core import Dataset, holdout
from ..errors import BadExpertError, unknown_name
from ..training import Recipe, accuracy, predict_logits, train
from ..utils import derive_generator, model_device
from .base import Detector

EPS = 1e-8

#: Score rules over x = Conf_B(ŷ) and y = Conf_M'(ŷ); larger = more suspicious.
SCORES = ("logratio", "ratio", "triangle", "expert", "auxiliary")

EXPERT_LR_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
AUX_LR_GRID = (0.3, 0.1, 0.03, 0.01)


def combine(x: torch.Tensor, y: torch.Tensor, rule: str) -> torch.Tensor:
    """Combine the expert's (x) and auxiliary model's (y) confidences into a score.

    - ``logratio``: ``log x - log y`` (the ratio rule on a log scale, numerically safe; same
      ranking and same decisions as ``ratio``);
    - ``ratio``: ``-y / x`` (the research code's ``angles`` rule);
    - ``triangle``: ``-min(2y/x, (1-x)/(0.5-y))``, the research code's default with its
      ResNet-18 constants;
    - ``expert``: ``x`` (the backdoor expert alone);
    - ``auxiliary``: ``-y`` (the auxiliary model alone).
    """
    if rule == "logratio":
        return torch.log(x.clamp_min(EPS)) - torch.log(y.clamp_min(EPS))
    if rule == "ratio":
        return -y / x.clamp_min(EPS)
    if rule == "triangle":
        return -torch.minimum(2 * y / x.clamp_min(EPS), (1 - x) / (0.5 - y).clamp_min(EPS))
    if rule == "expert":
        return x.clone()
    if rule == "auxiliary":
        return -y
    raise unknown_name("score rule", rule, SCORES)


class BaDExpert(Detector):
    """The BaDExpert detector. See the module docstring for the method and the presets.

    Parameters
    ----------
    preset: ``"auto"`` (strengths chosen from clean data, ``logratio`` score) or ``"paper"``
        (the research code's settings, ``triangle`` score).
    score_rule: one of :data:`SCORES`; ``None`` takes the preset's.
    expert_lr, aux_lr: fixed learning rates (``None``: the preset's rule).
    expert_epochs, expert_batch_size: the expert's finetuning (1 epoch, batch 128).
    aux_epochs, aux_batch_size, aux_milestones, aux_gamma: the auxiliary model's finetuning
        (10 epochs, batch 64, x0.1 at epochs 2, 4, 6, 8).
    holdout: fraction of the clean set held out to choose strengths (``auto`` only).
    expert_agreement: the expert is strong enough once it agrees with M on at most this
        fraction of held-out clean inputs.
    aux_tolerance: the auxiliary model may lose at most this much held-out clean accuracy
        relative to M.
    augment: use training augmentation (random crop, flip where ``hflip``) while finetuning.
    hflip: whether horizontal flips preserve labels for this data.
    """

    name: ClassVar[str] = "badexpert"
    forward_passes_per_input: ClassVar[int] = 3

    def __init__(
        self,
        *,
        preset: str = "auto",
        score_rule: str | None = None,
        expert_lr: float | None = None,
        expert_epochs: int = 1,
        expert_batch_size: int = 128,
        aux_lr: float | None = None,
        aux_epochs: int = 10,
        aux_batch_size: int = 64,
        aux_milestones: tuple[int, ...] = (2, 4, 6, 8),
        aux_gamma: float = 0.1,
        holdout: float = 0.2,
        expert_agreement: float = 0.05,
        aux_tolerance: float = 0.03,
        augment: bool = True,
        hflip: bool = True,
        batch_size: int = 256,
        seed: int = 0,
        device: str | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, device=device)
        self.preset = preset
        self.score_rule = score_rule
        self.expert_lr = expert_lr
        self.expert_epochs = expert_epochs
        self.expert_batch_size = expert_batch_size
        self.aux_lr = aux_lr
        self.aux_epochs = aux_epochs
        self.aux_batch_size = aux_batch_size
        self.aux_milestones = tuple(aux_milestones)
        self.aux_gamma = aux_gamma
        self.holdout = holdout
        self.expert_agreement = expert_agreement
        self.aux_tolerance = aux_tolerance
        self.augment = augment
        self.hflip = hflip

    # --- configuration -------------------------------------------------------------------
    def _validate(self) -> None:
        if self.preset not in ("auto", "paper"):
            raise unknown_name("BaDExpert preset", self.preset, ("auto", "paper"))
        if self.score_rule is not None and self.score_rule not in SCORES:
            raise unknown_name("score rule", self.score_rule, SCORES)
        if self.preset == "auto" and not 0 < self.holdout < 1:
            raise BadExpertError(f"holdout must lie in (0, 1), got {self.holdout}")
        for name in ("expert_lr", "aux_lr"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise BadExpertError(f"{name} must be positive, got {v}")

    @property
    def rule(self) -> str:
        if self.score_rule is not None:
            return self.score_rule
        return "triangle" if self.preset == "paper" else "logratio"

    def expert_recipe(self, lr: float) -> Recipe:
        """Adam, wrong labels, ``expert_epochs`` epochs, constant lr (the paper's schedule never acts)."""
        return Recipe(
            optimizer="adam", lr=lr, epochs=self.expert_epochs, batch_size=self.expert_batch_size,
            weight_decay=0.0, schedule="constant", augment=self.augment, hflip=self.hflip,
        )

    def aux_recipe(self, lr: float) -> Recipe:
        """Nesterov SGD (momentum 0.9, weight decay 1e-4) with step decay, true labels."""
        return Recipe(
            optimizer="sgd", lr=lr, epochs=self.aux_epochs, batch_size=self.aux_batch_size, momentum=0.9,
            nesterov=True, weight_decay=1e-4, schedule="step", milestones=self.aux_milestones,
            gamma=self.aux_gamma, augment=self.augment, hflip=self.hflip,
        )

    # --- fitting -------------------------------------------------------------------------
    def _fit(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
        self._validate()
        num_classes = self._num_classes(model, images)
        if int(labels.max()) >= num_classes:
            raise BadExpertError(
                f"clean labels go up to {int(labels.max())} but the model has {num_classes} outputs"
            )
        device = self.device_
        source = copy.deepcopy(model).to(device)
        data = Dataset(images=_as_uint8(images), labels=labels, classes=[str(i) for i in range(num_classes)], name="clean")
        if self.preset == "paper":
            fit_part, hold_part = data, None
        else:
            fit_part, hold_part = holdout(data, self.holdout, derive_generator(self.seed, "badexpert-holdout"))
        self.fit_report_ = {"clean_size": len(data), "fit_size": len(fit_part),
                            "holdout_size": len(hold_part) if hold_part is not None else 0}
        self.expert_ = self._fit_expert(source, fit_part, hold_part, num_classes)
        self.auxiliary_ = self._fit_auxiliary(source, fit_part, hold_part)
        self.expert_.eval()
        self.auxiliary_.eval()

    @staticmethod
    def _num_classes(model: nn.Module, images: torch.Tensor) -> int:
        dev = model_device(model)
        with torch.no_grad():
            was = model.training
            model.eval()
            try:
                out = model(_as_float(images[:2]).to(dev))
            except RuntimeError as exc:
                raise BadExpertError(
                    f"the model cannot take the clean images of shape {tuple(images.shape[1:])}: {exc}".splitlines()[0]
                ) from exc
            finally:
                model.train(was)
        if out.dim() != 2:
            raise BadExpertError(f"the model must return logits [N, classes], got shape {tuple(out.shape)}")
        return int(out.shape[1])

    def _fit_expert(self, source: nn.Module, fit_part: Dataset, hold: Dataset | None, num_classes: int) -> nn.Module:
        wrong = (fit_part.labels + 1) % num_classes
        if self.expert_lr is not None or self.preset == "paper":
            lrs = [self.expert_lr if self.expert_lr is not None else 1e-4]
        else:
            lrs = list(EXPERT_LR_GRID)
        ref_pred = predict_logits(source, hold.images, batch_size=self.batch_size).argmax(1) if hold is not None else None
        trace = []
        chosen = None
        for i, lr in enumerate(lrs):
            expert = copy.deepcopy(source)
            train(expert, fit_part, self.expert_recipe(lr), seed=self.seed, labels=wrong, desc=f"expert lr={lr:g}")
            entry = {"lr": lr}
            if hold is not None:
                pred = predict_logits(expert, hold.images, batch_size=self.batch_size).argmax(1)
                entry["agreement"] = float((pred == ref_pred).float().mean())
                entry["accuracy"] = float((pred == hold.labels).float().mean())
            trace.append(entry)
            chosen = (lr, expert)
            if hold is None or entry["agreement"] <= self.expert_agreement:
                break
        self.expert_lr_ = chosen[0]
        self.fit_report_["expert"] = {"chosen_lr": chosen[0], "trace": trace,
                                      "reached_target": hold is None or trace[-1]["agreement"] <= self.expert_agreement}
        return chosen[1].eval()

    def _fit_auxiliary(self, source: nn.Module, fit_part: Dataset, hold: Dataset | None) -> nn.Module:
        if self.aux_lr is not None or self.preset == "paper":
            lrs = [self.aux_lr if self.aux_lr is not None else 0.1]
        else:
            lrs = list(AUX_LR_GRID)
        ref_acc = accuracy(source, hold, batch_size=self.batch_size) if hold is not None else None
        trace = []
        best = None
        for lr in lrs:
            aux = copy.deepcopy(source)
            log = train(aux, fit_part, self.aux_recipe(lr), seed=self.seed, desc=f"auxiliary lr={lr:g}")
            entry = {"lr": lr, "final_loss": log.losses[-1] if log.losses else None}
            ok = True
            if hold is not None:
                finite = all(math.isfinite(p.detach().float().sum().item()) for p in aux.parameters())
                acc = accuracy(aux, hold, batch_size=self.batch_size) if finite else 0.0
                entry["accuracy"] = acc
                ok = acc >= ref_acc - self.aux_tolerance
                if best is None or acc > best[2]:
                    best = (lr, aux, acc)
            trace.append(entry)
            if ok:
                best = (lr, aux, entry.get("accuracy"))
                break
        self.aux_lr_ = best[0]
        self.fit_report_["auxiliary"] = {"chosen_lr": best[0], "trace": trace, "model_holdout_accuracy": ref_acc,
                                         "reached_target": hold is None or trace[-1] is not None and ok}
        return best[1].eval()

    # --- scoring -------------------------------------------------------------------------
    @torch.no_grad()
    def confidences(self, x) -> dict[str, torch.Tensor]:
        """Per input: M's label ``pred``, the expert's confidence ``x`` and the auxiliary's ``y`` in it."""
        self._check_fitted("confidences")
        images = self._check_input(x)
        parts = {"pred": [], "x": [], "y": []}
        for xb in self._batches(images):
            pred, cx, cy = self._forward(xb)
            parts["pred"].append(pred.cpu())
            parts["x"].append(cx.cpu())
            parts["y"].append(cy.cpu())
        return {k: torch.cat(v) if v else torch.empty(0) for k, v in parts.items()}

    def score_details(self, x) -> dict:
        """Scores with M's label (``pred``), the expert's (``x``) and the auxiliary's (``y``) confidences."""
        conf = self.confidences(x)
        score = combine(conf["x"], conf["y"], self.rule)
        return {"score": score.numpy(), **{k: v.numpy() for k, v in conf.items()}}

    def _forward(self, xb: torch.Tensor):
        was = self.model_.training
        self.model_.eval()
        try:
            pred = self.model_(xb).argmax(1)
        finally:
            self.model_.train(was)
        px = F.softmax(self.expert_(xb).float(), dim=1).gather(1, pred[:, None]).squeeze(1)
        py = F.softmax(self.auxiliary_(xb).float(), dim=1).gather(1, pred[:, None]).squeeze(1)
        return pred, px, py

    def _score_batch(self, xb: torch.Tensor) -> torch.Tensor:
        _, cx, cy = self._forward(xb)
        return combine(cx, cy, self.rule).cpu()

    # --- persistence ---------------------------------------------------------------------
    def _state_tensors(self):
        out = {f"expert.{k}": v for k, v in self.expert_.state_dict().items()}
        out.update({f"auxiliary.{k}": v for k, v in self.auxiliary_.state_dict().items()})
        return out

    def _state_meta(self):
        return {"expert_lr": self.expert_lr_, "aux_lr": self.aux_lr_, "fit_report": self.fit_report_}

    def _load_state(self, model, tensors, meta):
        device = self.device_
        self.expert_ = _load_copy(model, tensors, "expert.", device)
        self.auxiliary_ = _load_copy(model, tensors, "auxiliary.", device)
        self.expert_lr_ = meta.get("expert_lr")
        self.aux_lr_ = meta.get("aux_lr")
        self.fit_report_ = meta.get("fit_report", {})


def _load_copy(model: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, device) -> nn.Module:
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    m = copy.deepcopy(model).to(device)
    try:
        m.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BadExpertError(
            "the detector's weights do not match this model's architecture; load it with the model it was fitted on"
        ) from exc
    return m.eval()


def _as_uint8(images: torch.Tensor) -> torch.Tensor:
    from ..data.core import to_uint8

    return images if images.dtype == torch.uint8 else to_uint8(images)


def _as_float(images: torch.Tensor) -> torch.Tensor:
    from ..data.core import to_float

    return to_float(images)
