"""BaDExpert (Xie et al., ICLR 2024): backdoor-input detection with a backdoor expert.

From the suspect model M and a small clean labelled set D_c:

1. the backdoor expert B is M finetuned on D_c with deliberately wrong labels ``(y + 1) mod C``
   (Adam): it forgets the clean task but keeps the backdoor, so it agrees with M only on
   backdoor inputs;
2. the auxiliary model M' is M finetuned on D_c with the true labels and a large learning rate
   (Nesterov SGD, step decay): it keeps the clean task and weakens the backdoor;
3. for an input u with M's label ŷ, ``x = softmax(B(u))[ŷ]`` and ``y = softmax(M'(u))[ŷ]``; clean
   inputs have x small and y large, backdoor inputs x large and y small. The score combines them.

Finetuning strength. The paper's settings were tuned for a CIFAR-10 ResNet-18; on other data or
architectures the expert may not unlearn at all, or the auxiliary model keep the backdoor. With
``preset="auto"`` (the default) the detector adapts both, from clean data only: a slice of D_c
(``holdout``, 20%) is set aside, and

- the expert trains (Adam, lr 1e-4) for at least the paper's one epoch and then until it agrees
  with M on at most ``expert_agreement`` (90%) of the held-out clean slice, i.e. until it has
  measurably begun to forget, and no further: on Fashion-MNIST a Blend backdoor fades from the
  expert as unlearning goes on (trained to 20% agreement, the expert kept 60% of it), while the
  log-odds score already separates a barely-unlearned expert well. Only if ``expert_max_steps``
  pass without that does it restart at a 3x larger lr;
- the auxiliary model's lr is the smallest in ``AUX_LR_LADDER`` whose held-out clean accuracy
  dips, within its first epoch, to at most ``aux_dip`` (65%) of M's: the paper's criterion of a
  large lr ("clean accuracy first drops ... and recovers"). Too gentle an auxiliary model keeps
  the backdoor; needlessly large ones cost clean accuracy without removing more of it;
- the score is ``logodds``, ``logit(x) - logit(y)``, computed exactly from the logits: it needs
  no constants and beat the research code's ``triangle`` rule on every attack we measured;
- finetuning uses only the augmentations M was trained with, as measured on the held-out slice:
  random crops (and horizontal flips, where the data allows them) are used only if M keeps at
  least ``augment_accuracy`` (90%) of its held-out accuracy on cropped (flipped) inputs. The
  Fashion-MNIST models, trained without either, keep 0.79-0.86 of it on crops and about 0.69 on
  flips; CIFAR-10 models trained with both keep all of it (0.98-1.02). Finetuning copies of M on images it
  never saw makes them disagree with M on clean inputs, which the score reads as evidence: on the
  17 Fashion-MNIST attacks, mean ASR after defense 7.8% with crops, 3.8% without.

``preset="paper"`` runs the research code's settings unchanged (Adam 1e-4 for one epoch, Nesterov
SGD 0.1 for ten epochs with decay at 2/4/6/8, the ``triangle`` score, no held-out slice, crops
and flips).
Explicit ``expert_lr`` / ``aux_lr`` / ``score_rule`` values override either preset.

Shared trunk (``shared_trunk``, default off). Both finetuned copies may be finetuned only after a
cut point the model's architecture declares (:func:`badexpert.models.cut_points`: a conv block of
the CNN, a stage of the ResNet or VGG, a block of MobileNetV2 or the ViT): everything before it is
frozen (no gradients, and held in eval mode, so its batch-norm statistics never move) and stays
bit-identical to the model's own. The detector then holds, and its file stores, only the two
heads; scoring (and the guard, and its ONNX graph) computes the trunk once per input and runs the
model's head, the expert's and the auxiliary model's on it. A model that declares no cut points
(one from Hugging Face, an ONNX file or a factory) is refused in one line.

Expert ensemble (``expert_ensemble``, default off; ``auto`` only). An attacker who knows the defense
can train the backdoor to fade in an expert finetuned to the default agreement (the
``expert_aware`` attack); an expert finetuned further keeps more of such a backdoor but less of
some ordinary ones. With agreement levels below ``expert_agreement`` (e.g. ``(0.4,)``) the
expert's finetuning goes on past the point where the expert is taken (the same run: same learning
rate, optimiser state and data order, so the expert itself is bit-identical to the one fitted
without the option), and a copy is kept when its held-out agreement with M first drops to each
level. The expert's log-odds ``logit_x`` is then the mean of every expert's log-odds of M's label
(the expert's and each snapshot's), and ``x`` its sigmoid. Each level costs one more forward pass
per input (a head pass with a shared trunk).
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Annotated, ClassVar

import torch
from torch import nn

from ..data.core import Dataset, augment, default_pad, holdout, to_float, to_uint8
from ..errors import BadExpertError, unknown_name
from ..models import cut_points, split_model
from ..training import Recipe, accuracy, model_outputs, predict_logits, train
from ..utils import derive_generator, eval_mode
from ..validation import Fraction, NonNegativeInt, OneOf, PositiveFloat, PositiveInt, Range
from .base import Detector, Option

EPS = 1e-8

#: Score rules over x = Conf_B(ŷ) and y = Conf_M'(ŷ); larger = more suspicious.
SCORES = ("logodds", "logratio", "ratio", "triangle", "expert", "auxiliary")

#: Expert learning rates tried in turn when the step budget runs out before the expert forgets.
EXPERT_LR_LADDER = (1e-4, 3e-4, 1e-3, 3e-3)
#: Auxiliary learning rates probed in increasing order for the accuracy dip.
AUX_LR_LADDER = (0.01, 0.03, 0.1, 0.3, 1.0)


def combine(x: torch.Tensor, y: torch.Tensor, rule: str) -> torch.Tensor:
    """Combine the expert's (x) and auxiliary model's (y) confidences into a score.

    - ``logodds`` (``auto``'s default): ``logit(x) - logit(y)``, the sum of the two models'
      log-odds evidence that M's label came from the backdoor. It needs no constants and, unlike
      the ratio, resolves confidences near 1 as finely as near 0, so neither a clean input the
      auxiliary model gets wrong (y near 0) nor a very confident expert (x near 1) dominates;
    - ``logratio``: ``log x - log y`` (the ratio rule on a log scale, numerically safe; same
      ranking and same decisions as ``ratio``);
    - ``ratio``: ``-y / x`` (the research code's ``angles`` rule);
    - ``triangle``: ``-min(2y/x, (1-x)/(0.5-y))``, the research code's default with its
      ResNet-18 constants;
    - ``expert``: ``x`` (the backdoor expert alone);
    - ``auxiliary``: ``-y`` (the auxiliary model alone).
    """
    if rule == "logodds":
        return _logit(x) - _logit(y)
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


def expert_recipe(lr: float, *, epochs: int = 1, batch_size: int = 128, augment: bool = False, pad: int | None = 0,
                  hflip: bool = False, max_steps: int | None = None) -> Recipe:
    """The backdoor expert's finetuning recipe: Adam at a constant ``lr``, no weight decay (the paper's
    schedule never acts within its one epoch), with the given crops / flips and step budget."""
    return Recipe(optimizer="adam", lr=lr, epochs=epochs, batch_size=batch_size, weight_decay=0.0,
                  schedule="constant", augment=augment, pad=pad, hflip=hflip, max_steps=max_steps)


def agreement_levels(text: str) -> tuple[float, ...]:
    """``--expert-ensemble``'s value: agreement levels separated by commas (``"0.6,0.4"``); their
    ranges and order are checked with the detector's other parameters."""
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:  # argparse: "invalid agreement_levels value: '...'", exit status 2
        raise ValueError(f"not comma-separated numbers: {text!r}") from None


def finetune_expert(source: nn.Module, data: Dataset, recipe: Recipe, *, num_classes: int, seed: int,
                    callback=None, callback_every: int = 0, desc: str = "expert") -> nn.Module:
    """A backdoor expert: a copy of ``source`` (left untouched) finetuned with ``recipe`` on ``data``
    relabelled ``(y + 1) mod num_classes``. The detector builds its expert with it, and the
    BaDExpert-aware attack (:mod:`badexpert.attacks.expert_aware`) its simulated one.
    ``callback(step, expert)`` / ``callback_every``: as in :func:`~badexpert.training.train` (a
    stopping rule). The copy is returned in train mode, as the training loop leaves it."""
    expert = copy.deepcopy(source)
    train(expert, data, recipe, seed=seed, labels=(data.labels + 1) % num_classes, callback=callback,
          callback_every=callback_every, desc=desc)
    return expert


class BaDExpert(Detector):
    """BaDExpert (Xie et al., ICLR 2024): a backdoor expert and an auxiliary finetuned model, 3 passes per input
    (one more per expert ensemble level).

    See the module docstring for the method and the presets.

    Parameters
    ----------
    preset: ``"auto"`` (strengths chosen from clean data, ``logodds`` score) or ``"paper"``
        (the research code's settings, ``triangle`` score).
    score_rule: one of :data:`SCORES`; ``None`` takes the preset's.
    expert_lr, aux_lr: fixed learning rates (``None``: the preset's rule).
    expert_epochs, expert_batch_size: the expert's finetuning under ``paper`` (1 epoch, batch 128).
    expert_max_steps: ``auto``'s step budget per learning rate for the expert.
    aux_epochs, aux_batch_size, aux_milestones, aux_gamma: the auxiliary model's finetuning
        (10 epochs, batch 64, x0.1 at epochs 2, 4, 6, 8).
    holdout: fraction of the clean set held out to choose strengths (``auto`` only).
    expert_agreement: ``auto`` stops the expert, after at least ``expert_epochs`` epochs, once it
        agrees with M on at most this fraction of held-out clean inputs (it has measurably begun
        to forget the clean task).
    expert_ensemble: ``()`` (default): one expert. Agreement levels, strictly decreasing and below
        ``expert_agreement`` (e.g. ``(0.4,)``): the expert's finetuning continues and a snapshot is
        kept at each level (``auto`` only; module docstring); ``logit_x`` is the mean of the experts'
        log-odds. A level not reached within ``expert_max_steps`` takes the last expert of the run
        (a warning says so).
    aux_dip: ``auto`` takes the smallest auxiliary learning rate whose held-out clean accuracy
        dips, during the first epoch, to at most this fraction of M's.
    aux_recover: ... and keeps it only if, trained in full, it recovers at least this fraction of
        M's held-out accuracy; otherwise the next smaller learning rate is trained (the paper's
        good auxiliary model "first drops ... and recovers").
    augment: ``None`` (default): ``auto`` finetunes with random crops, and flips where ``hflip``,
        only where M is invariant to them (``augment_accuracy``), ``paper`` always; ``True`` /
        ``False``: always / never.
    augment_accuracy: the share of M's held-out accuracy it must keep on cropped (flipped)
        inputs for ``auto`` to finetune with crops (flips).
    hflip: whether horizontal flips preserve labels for this data; ``None`` (default) takes the
        fitting data's own flag (:attr:`Dataset.hflip`; a bare ``(images, labels)`` pair: no flips).
    shared_trunk: ``None`` (default): the expert and the auxiliary model are whole finetuned copies
        of M. A cut point of M's architecture (``block2`` of the CNN, ``stage3`` of the ResNet; see
        :func:`badexpert.models.cut_points`): both are finetuned only after it, the part before it
        stays M's own and is computed once per input (module docstring).
    """

    name: ClassVar[str] = "badexpert"
    forward_passes_per_input: ClassVar[int] = 3
    scatter_axes: ClassVar[dict] = {
        "x": "x", "y": "y", "limits": (0.0, 1.0),
        "x_label": "x: backdoor expert B's confidence in M's label",
        "y_label": "y: auxiliary model M\u2032's confidence in M's label",
        "title": "Clean inputs: x low, y high (top left)\nbackdoor inputs: x high, y low (bottom right)",
        "caption": "Decision space: backdoor expert vs auxiliary model confidence",
    }
    shares_model_pass: ClassVar[bool] = True
    cli_options: ClassVar[tuple[Option, ...]] = (
        Option("--preset", "preset", choices=("auto", "paper"), default="auto",
               help="auto chooses finetuning strengths from clean data (default); paper: the research code's settings"),
        Option("--score-rule", "score_rule", help=f"{', '.join(SCORES)} (default: the preset's)"),
        Option("--expert-lr", "expert_lr", type=float, help="fix the backdoor expert's learning rate"),
        Option("--aux-lr", "aux_lr", type=float, help="fix the auxiliary model's learning rate"),
        Option("--shared-trunk", "shared_trunk", metavar="CUT",
               help="finetune the expert and the auxiliary model only after this cut point of the model (cnn: "
                    "block1-3; resnet18: stem, stage1-4; vgg16bn: stage1-5; mobilenetv2: stem, stage1-7, last_conv; "
                    "vit: embed, block1-N); the layers before it are shared and computed once (default: off)"),
        Option("--expert-ensemble", "expert_ensemble", type=agreement_levels, metavar="LEVELS",
               help="keep finetuning the backdoor expert and snapshot it when its held-out agreement with the model "
                    "first drops to each of these levels (comma-separated, decreasing, below expert_agreement, 0.9 "
                    "by default; e.g. 0.4); the score averages the experts' log-odds; one more forward pass per "
                    "level (default: off)"),
    )
    exportable: ClassVar[bool] = True

    def __init__(
        self,
        *,
        preset: Annotated[str, OneOf("auto", "paper")] = "auto",
        score_rule: Annotated[str, OneOf(*SCORES)] | None = None,
        expert_lr: PositiveFloat | None = None,
        expert_epochs: PositiveInt = 1,
        expert_max_steps: PositiveInt = 300,
        expert_batch_size: PositiveInt = 128,
        aux_lr: PositiveFloat | None = None,
        aux_epochs: PositiveInt = 10,
        aux_batch_size: PositiveInt = 64,
        aux_milestones: tuple[NonNegativeInt, ...] = (2, 4, 6, 8),
        aux_gamma: PositiveFloat = 0.1,
        holdout: Annotated[float, Range(gt=0, lt=1)] = 0.2,
        expert_agreement: Fraction = 0.9,
        expert_ensemble: tuple[float, ...] = (),
        aux_dip: Annotated[float, Range(gt=0, le=1)] = 0.65,
        aux_recover: Fraction = 0.75,
        augment: bool | None = None,
        augment_accuracy: Fraction = 0.9,
        hflip: bool | None = None,
        shared_trunk: str | None = None,
        batch_size: PositiveInt = 256,
        seed: NonNegativeInt = 0,
        device: str | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, device=device)
        self.preset = preset
        self.score_rule = score_rule
        self.expert_lr = expert_lr
        self.expert_epochs = expert_epochs
        self.expert_max_steps = expert_max_steps
        self.expert_batch_size = expert_batch_size
        self.aux_lr = aux_lr
        self.aux_epochs = aux_epochs
        self.aux_batch_size = aux_batch_size
        self.aux_milestones = tuple(aux_milestones) if isinstance(aux_milestones, (list, tuple)) else aux_milestones
        self.aux_gamma = aux_gamma
        self.holdout = holdout
        self.expert_agreement = expert_agreement
        self.expert_ensemble = tuple(expert_ensemble) if isinstance(expert_ensemble, (list, tuple)) else expert_ensemble
        self.aux_dip = aux_dip
        self.aux_recover = aux_recover
        self.augment = augment
        self.augment_accuracy = augment_accuracy
        self.hflip = hflip
        self.shared_trunk = shared_trunk

    # --- configuration -------------------------------------------------------------------
    @property
    def rule(self) -> str:
        if self.score_rule is not None:
            return self.score_rule
        return "triangle" if self.preset == "paper" else "logodds"

    @property
    def score_kind(self) -> str:
        return self.rule

    @property
    def cost(self) -> dict[str, int]:
        """The model, the expert and the auxiliary model, plus one pass per expert ensemble snapshot
        (those held once fitted, else one per ``expert_ensemble`` level)."""
        snapshots = getattr(self, "expert_snapshots_", self.expert_ensemble)
        return {"forward": int(self.forward_passes_per_input) + len(snapshots), "backward": 0}

    @property
    def submodels(self) -> tuple[str, ...]:
        """The expert, the auxiliary model and, with ``expert_ensemble``, the expert's snapshots."""
        snapshots = getattr(self, "expert_snapshots_", None)
        return ("expert_", "auxiliary_") + (("expert_snapshots_",) if snapshots is not None and len(snapshots) else ())

    def check_params(self) -> "BaDExpert":
        super().check_params()
        levels, top = self.expert_ensemble, self.expert_agreement
        where = f"detector '{self.name}' parameter 'expert_ensemble'"
        if any(not 0 < v < top for v in levels) or any(b >= a for a, b in zip(levels, levels[1:])):
            raise BadExpertError(f"{where} must be agreement levels above 0, below expert_agreement ({top:g}) and "
                                 f"strictly decreasing, e.g. [0.4] or [0.6, 0.4]; got {list(levels)}")
        if levels and self.preset == "paper":
            raise BadExpertError(f"{where} needs preset 'auto': its snapshots are taken at agreement levels measured "
                                 "on a held-out clean slice, which preset 'paper' does not set aside")
        return self

    def expert_recipe(self, lr: float) -> Recipe:
        """Adam, wrong labels, ``expert_epochs`` epochs, constant lr (the paper's schedule never acts)."""
        return expert_recipe(lr, epochs=self.expert_epochs, batch_size=self.expert_batch_size,
                             **self._augmentation_fields())

    def aux_recipe(self, lr: float) -> Recipe:
        """Nesterov SGD (momentum 0.9, weight decay 1e-4) with step decay, true labels."""
        return Recipe(
            optimizer="sgd", lr=lr, epochs=self.aux_epochs, batch_size=self.aux_batch_size, momentum=0.9,
            nesterov=True, weight_decay=1e-4, schedule="step", milestones=self.aux_milestones,
            gamma=self.aux_gamma, **self._augmentation_fields(),
        )

    def _augmentation_fields(self) -> dict:
        """The finetuning recipes' augmentation: crops (the default pad) and flips as chosen."""
        crop, flip = self.augmentation_["crop"], self.augmentation_["flip"]
        return {"augment": crop or flip, "pad": None if crop else 0, "hflip": flip}

    def _choose_augmentation(self, source: nn.Module, hold: Dataset | None) -> dict:
        """Crops and flips for finetuning: fixed (``augment`` given, or no held-out slice under
        ``paper``: both, flips only where ``hflip``), or ``auto``: each only if M keeps at least
        ``augment_accuracy`` of its held-out accuracy on inputs so transformed."""
        if self.augment is not None or hold is None:
            on = True if self.augment is None else bool(self.augment)
            return {"crop": on, "flip": on and self.hflip_, "rule": "fixed"}
        images = to_float(hold.images)
        g = derive_generator(self.seed, "badexpert-augment")

        def acc(x: torch.Tensor) -> float:
            return accuracy(source, (x, hold.labels), batch_size=self.batch_size)

        plain = acc(images)
        cropped = acc(augment(images, pad=default_pad(tuple(images.shape[2:])), generator=g))
        flipped = acc(images.flip(3)) if self.hflip_ else None
        bar = self.augment_accuracy * plain
        return {"crop": cropped >= bar, "flip": flipped is not None and flipped >= bar, "rule": "auto",
                "accuracy": plain, "cropped_accuracy": cropped, "flipped_accuracy": flipped}

    # --- fitting -------------------------------------------------------------------------
    def _fit(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
        if self.shared_trunk is not None:  # a model without that cut point: refused before any work
            _check_cut(model, self.shared_trunk)
        # flips only where the data says they preserve labels (or the user says so)
        self.hflip_ = self.hflip if self.hflip is not None else self.data_info_["hflip"]
        num_classes = model_outputs(model, images, labels)
        source = model  # on self.device_ already (Detector.fit); only copies of it are trained
        data = Dataset(images=to_uint8(images), labels=labels, classes=[str(i) for i in range(num_classes)], name="clean")
        if self.preset == "paper":
            fit_part, hold_part = data, None
        else:
            fit_part, hold_part = holdout(data, self.holdout, derive_generator(self.seed, "badexpert-holdout"))
        self.fit_report_ = {"clean_size": len(data), "fit_size": len(fit_part),
                            "holdout_size": len(hold_part) if hold_part is not None else 0}
        self.augmentation_ = self._choose_augmentation(source, hold_part)
        self.fit_report_["augmentation"] = self.augmentation_
        # what the copies start from: M itself, or M with its trunk frozen (same outputs, head trainable)
        start = source if self.shared_trunk is None else _with_frozen_trunk(source, self.shared_trunk, images)
        self.expert_, snapshots = self._fit_expert(start, fit_part, hold_part, num_classes)
        self.auxiliary_ = self._fit_auxiliary(start, fit_part, hold_part)
        if self.shared_trunk is not None:  # the heads on M's own trunk (checked bit-identical)
            self.expert_, self.auxiliary_, *snapshots = (_bind_head(source, self.shared_trunk, net) for net in
                                                         (self.expert_, self.auxiliary_, *snapshots))
            self.fit_report_["shared_trunk"] = _trunk_record(source, self.shared_trunk)
        self.expert_snapshots_ = _Snapshots(snapshots)
        self.expert_.eval()
        self.auxiliary_.eval()
        self.expert_snapshots_.eval()

    def _fit_expert(self, source: nn.Module, fit_part: Dataset, hold: Dataset | None,
                    num_classes: int) -> tuple[nn.Module, list[nn.Module]]:
        """The backdoor expert, and its ``expert_ensemble`` snapshots: Adam on wrong labels ``(y + 1) mod C``.

        ``paper``: ``expert_epochs`` epochs at ``expert_lr`` (1e-4). ``auto``: from lr 1e-4 (or
        ``expert_lr``), train at least ``expert_epochs`` epochs and then until the expert's
        agreement with M on the held-out clean slice is at most ``expert_agreement`` (checked
        every few steps), within ``expert_max_steps``; if the budget runs out first, restart from
        M at a 3x larger lr (``EXPERT_LR_LADDER``). With ``expert_ensemble``, the run that reached
        ``expert_agreement`` goes on (within the same ``expert_max_steps``), and a copy is kept
        at the first check where the agreement is at most each further level; a level the run
        does not reach takes the run's last expert (a warning says so).
        """
        if hold is None:
            lr = self.expert_lr if self.expert_lr is not None else 1e-4
            expert = finetune_expert(source, fit_part, self.expert_recipe(lr), num_classes=num_classes, seed=self.seed,
                                     desc=f"expert lr={lr:g}")
            self.expert_lr_ = lr
            self.fit_report_["expert"] = {"lr": lr, "steps": None, "rule": "fixed"}
            return expert.eval(), []

        ref = predict_logits(source, hold.images, batch_size=self.batch_size).argmax(1)
        steps_per_epoch = max(1, len(fit_part) // min(self.expert_batch_size, len(fit_part)))
        check_every = max(1, min(4, steps_per_epoch))
        min_steps = steps_per_epoch * self.expert_epochs  # at least the paper's schedule
        ladder = [self.expert_lr] if self.expert_lr is not None else list(EXPERT_LR_LADDER)
        levels = (self.expert_agreement, *self.expert_ensemble)
        trace: list[dict] = []
        best = None
        for lr in ladder:
            state = {"steps": 0, "agreement": 1.0}
            kept: list[tuple[nn.Module, dict]] = []  # (expert, where) at each level reached, in order

            def check(step: int, m: nn.Module) -> bool:
                pred = predict_logits(m, hold.images, batch_size=self.batch_size).argmax(1)
                state["agreement"] = float((pred == ref).float().mean())
                state["steps"] = step
                while step >= min_steps and len(kept) < len(levels) and state["agreement"] <= levels[len(kept)]:
                    last = len(kept) == len(levels) - 1  # training stops here: the run's own model is that expert
                    # a copy of the model mid-training holds the layout train() uses (channels-last
                    # on a CPU); the usual one, as the saved file will, so its scores do not move
                    kept.append((m if last else copy.deepcopy(m).to(memory_format=torch.contiguous_format),
                                 dict(state)))
                return len(kept) == len(levels)

            epochs = max(1, math.ceil(self.expert_max_steps / steps_per_epoch))
            recipe = self.expert_recipe(lr).replace(epochs=epochs, max_steps=self.expert_max_steps)
            final = finetune_expert(source, fit_part, recipe, num_classes=num_classes, seed=self.seed, callback=check,
                                    callback_every=check_every, desc=f"expert lr={lr:g}")
            expert, where = kept[0] if kept else (final, dict(state))
            entry = {"lr": lr, **where}
            trace.append(entry)
            if best is None or entry["agreement"] < best[1]["agreement"]:
                best = (expert, entry, kept, final, dict(state))
            if kept:
                break
        expert, entry, kept, final, last_state = best
        reached = entry["agreement"] <= self.expert_agreement
        if not reached:
            warnings.warn(
                f"BaDExpert: the backdoor expert still agrees with the model on {entry['agreement']:.0%} of held-out "
                f"clean inputs (target {self.expert_agreement:.0%}); detection may be weak. A larger clean set helps.",
                stacklevel=3,
            )
        self.expert_lr_ = entry["lr"]
        self.fit_report_["expert"] = {"lr": entry["lr"], "steps": entry["steps"], "agreement": entry["agreement"],
                                      "target_agreement": self.expert_agreement, "reached_target": reached,
                                      "rule": "auto", "trace": trace}
        if not self.expert_ensemble:
            return expert.eval(), []
        snapshots, records = [], []
        for i, level in enumerate(self.expert_ensemble, start=1):
            # a level not reached: a copy of the run's last (most finetuned) expert stands in
            net, where = kept[i] if i < len(kept) else (copy.deepcopy(final), last_state)
            snapshots.append(net.eval())
            records.append({"level": level, "steps": where["steps"], "agreement": where["agreement"],
                            "reached": i < len(kept)})
        missed = [r["level"] for r in records if not r["reached"]]
        if missed:
            warnings.warn(
                f"BaDExpert: the expert ensemble did not reach agreement {', '.join(f'{v:.0%}' for v in missed)} "
                f"within expert_max_steps ({self.expert_max_steps}); the run's last expert "
                f"({last_state['agreement']:.0%} agreement) stands in for it. A larger expert_max_steps helps.",
                stacklevel=3,
            )
        self.fit_report_["expert"]["ensemble"] = records
        return expert.eval(), snapshots

    def _fit_auxiliary(self, source: nn.Module, fit_part: Dataset, hold: Dataset | None) -> nn.Module:
        """The auxiliary model: Nesterov SGD on the true labels with step decay.

        ``auto``: probe learning rates in increasing order (``AUX_LR_LADDER``) for one epoch
        each, watching held-out clean accuracy; the first whose accuracy dips to at most
        ``aux_dip`` times M's (the paper's large-lr regime: clean accuracy "first drops ... and
        recovers") is trained in full. If that run does not recover ``aux_recover`` (75%) of M's
        held-out accuracy, the next smaller rung is trained instead, and so on: a learning rate
        just past the dip bar can destroy the clean task (on Fashion-MNIST Blend, lr 0.3 recovered
        to 66% of 90% and detected far less than lr 0.1, which recovered to 84%).
        """
        if hold is None or self.aux_lr is not None:
            lr = self.aux_lr if self.aux_lr is not None else 0.1
            aux = copy.deepcopy(source)
            train(aux, fit_part, self.aux_recipe(lr), seed=self.seed, desc=f"auxiliary lr={lr:g}")
            self.aux_lr_ = lr
            self.fit_report_["auxiliary"] = {"lr": lr, "rule": "fixed"}
            return aux.eval()

        ref_acc = accuracy(source, hold, batch_size=self.batch_size)
        steps_per_epoch = max(1, len(fit_part) // min(self.aux_batch_size, len(fit_part)))
        check_every = max(1, steps_per_epoch // 5)
        probes = []
        chosen = len(AUX_LR_LADDER) - 1
        for i, lr in enumerate(AUX_LR_LADDER):
            accs: list[float] = []

            def watch(step: int, m: nn.Module) -> bool:
                accs.append(accuracy(m, hold, batch_size=self.batch_size) if _finite(m) else 0.0)
                return False

            probe = copy.deepcopy(source)
            train(probe, fit_part, self.aux_recipe(lr).replace(epochs=1, schedule="constant"), seed=self.seed,
                  callback=watch, callback_every=check_every, desc=f"auxiliary probe lr={lr:g}")
            lowest = min(accs) if accs else 1.0
            probes.append({"lr": lr, "lowest_accuracy": lowest})
            if lowest <= self.aux_dip * ref_acc:
                chosen = i
                break
        runs = []
        for i in range(chosen, -1, -1):
            lr = AUX_LR_LADDER[i]
            aux = copy.deepcopy(source)
            train(aux, fit_part, self.aux_recipe(lr), seed=self.seed, desc=f"auxiliary lr={lr:g}")
            acc = accuracy(aux, hold, batch_size=self.batch_size) if _finite(aux) else 0.0
            runs.append({"lr": lr, "accuracy": acc})
            if acc >= self.aux_recover * ref_acc:
                break
        self.aux_lr_ = runs[-1]["lr"]
        self.fit_report_["auxiliary"] = {"lr": self.aux_lr_, "accuracy": runs[-1]["accuracy"],
                                         "model_accuracy": ref_acc, "dip_target": self.aux_dip * ref_acc,
                                         "recover_target": self.aux_recover * ref_acc,
                                         "rule": "auto", "probes": probes, "runs": runs}
        return aux.eval()

    # --- scoring -------------------------------------------------------------------------
    @torch.no_grad()
    def confidences(self, x) -> dict[str, torch.Tensor]:
        """Per input: M's label ``pred``, the expert's (``x``) and the auxiliary model's (``y``)
        confidence in it, and the matching log-odds ``logit_x`` / ``logit_y``. With
        ``expert_ensemble``, ``logit_x`` is the mean of the experts' log-odds and ``x`` its sigmoid."""
        self._check_fitted("confidences")
        images, bad = self._scorable(x)
        parts: dict[str, list[torch.Tensor]] = {}
        for xb in self._batches(images):
            for k, v in self._forward(xb).items():
                parts.setdefault(k, []).append(v.cpu())
        out = {k: torch.cat(v) for k, v in parts.items()}
        if bool(bad.any()):  # inputs that could not be scored: no confidences
            for k in ("x", "y", "logit_x", "logit_y"):
                out[k][bad] = float("nan")
        return out

    def score_details(self, x) -> dict:
        """Scores together with ``pred``, ``x``, ``y``, ``logit_x``, ``logit_y`` (numpy arrays);
        NaN where the input could not be scored."""
        conf = self.confidences(x)
        return {"score": self._combine(conf).float().numpy(), **{k: v.numpy() for k, v in conf.items()}}

    def fit_summary(self) -> str:
        out = f"expert lr {self.expert_lr_:g}, auxiliary lr {self.aux_lr_:g}"
        aug = getattr(self, "augmentation_", None)
        if aug is None:  # a detector file from before the augmentation was recorded
            return out
        what = " and ".join(name for key, name in (("crop", "crops"), ("flip", "flips")) if aug.get(key))
        out = f"{out}, finetuned with {what or 'no augmentation'}"
        out += f", trunk up to {self.shared_trunk} shared with the model" if self.shared_trunk else ""
        if self.expert_ensemble:
            out += f", expert ensemble at agreement {', '.join(f'{v:g}' for v in self.expert_ensemble)}"
        return out

    def diagnostics(self, clean: dict, triggered: dict) -> dict:
        """The AUROC (all clean vs all triggered inputs) every score rule would give on these same
        expert and auxiliary models: how much the rule, rather than the models, contributes."""
        from ..metrics import auroc

        out = {}
        for rule in SCORES:
            sc, st = (self._combine({k: torch.from_numpy(d[k]) for k in ("x", "y", "logit_x", "logit_y")}, rule)
                      for d in (clean, triggered))
            out[rule] = auroc(sc.numpy(), st.numpy())
        return {"auroc_by_score_rule": out}

    def _forward(self, xb: torch.Tensor, logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self._outputs(xb, logits)[1]

    def _outputs(self, xb: torch.Tensor, logits: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """M's logits (``logits`` when given) and the confidences of :meth:`confidences`. With a
        shared trunk, the trunk runs once and feeds M's head (unless ``logits`` are given), the
        experts' and the auxiliary model's."""
        features, experts, aux = xb, [self.expert_, *self.expert_snapshots_], self.auxiliary_
        with eval_mode(self.model_):
            if self.shared_trunk is not None:
                trunk, head = split_model(self.model_, self.shared_trunk)
                features, experts, aux = trunk(xb), [net.head for net in experts], aux.head
                if logits is None:
                    logits = head(features)
            elif logits is None:
                logits = self.model_(xb)
        pred = logits.argmax(1)
        out = {"pred": pred}
        logp, out["logit_y"] = _label_log_odds(aux(features).float(), pred)
        out["y"] = logp.exp()
        if len(experts) == 1:
            logp, out["logit_x"] = _label_log_odds(experts[0](features).float(), pred)
            out["x"] = logp.exp()
        else:  # the expert ensemble: the mean of the experts' log-odds, and its sigmoid
            out["logit_x"] = torch.stack([_label_log_odds(net(features).float(), pred)[1] for net in experts]).mean(0)
            out["x"] = torch.sigmoid(out["logit_x"])
        return logits, {k: out[k] for k in ("pred", "x", "logit_x", "y", "logit_y")}

    def _combine(self, conf: dict[str, torch.Tensor], rule: str | None = None) -> torch.Tensor:
        rule = rule or self.rule
        if rule == "logodds":  # exact from the logits, even where a softmax rounds to 1
            return conf["logit_x"] - conf["logit_y"]
        return combine(conf["x"], conf["y"], rule)

    def _score_batch(self, xb: torch.Tensor) -> torch.Tensor:
        return self._combine(self._forward(xb)).cpu()

    def score_given_logits(self, xb: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return self._combine(self._forward(xb, logits)).cpu()

    def logits_and_score(self, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, conf = self._outputs(xb)  # with a shared trunk: the trunk once for the three heads
        return logits, self._combine(conf).cpu()

    # --- persistence ---------------------------------------------------------------------
    def _state_tensors(self):
        # with a shared trunk, the heads only: the trunk is the model's own, checked on load;
        # the expert ensemble's snapshots as expert1., expert2., ... beside expert.
        nets = {"expert": self.expert_, "auxiliary": self.auxiliary_,
                **{f"expert{i}": net for i, net in enumerate(self.expert_snapshots_, start=1)}}
        if self.shared_trunk is not None:
            nets = {k: v.head for k, v in nets.items()}
        return {f"{name}.{k}": v for name, net in nets.items() for k, v in net.state_dict().items()}

    def _state_meta(self):
        return {"expert_lr": self.expert_lr_, "aux_lr": self.aux_lr_, "hflip": self.hflip_, "fit_report": self.fit_report_}

    def _load_state(self, model, tensors, meta):
        device = self.device_
        snapshots = [f"expert{i}" for i in range(1, len(self.expert_ensemble) + 1)]
        missing = [name for name in snapshots if not any(k.startswith(f"{name}.") for k in tensors)]
        if missing:
            raise BadExpertError(f"the detector declares {len(snapshots)} expert ensemble snapshot(s) but holds no "
                                 f"weights for {', '.join(missing)}; the file is damaged: fit it again")
        if self.shared_trunk is not None:
            _check_trunk(model, self.shared_trunk, (meta.get("fit_report") or {}).get("shared_trunk"))
            self.expert_, self.auxiliary_, *nets = (_load_head(model, self.shared_trunk, tensors, f"{name}.", device)
                                                    for name in ("expert", "auxiliary", *snapshots))
        else:
            self.expert_, self.auxiliary_, *nets = (_load_copy(model, tensors, f"{name}.", device)
                                                    for name in ("expert", "auxiliary", *snapshots))
        self.expert_snapshots_ = _Snapshots(nets).eval()
        self.expert_lr_ = meta.get("expert_lr")
        self.aux_lr_ = meta.get("aux_lr")
        self.hflip_ = meta.get("hflip")
        self.fit_report_ = meta.get("fit_report", {})
        # recorded in the fit report (absent in files written before the choice was made)
        self.augmentation_ = self.fit_report_.get("augmentation")


def _label_log_odds(logits: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p[label]`` and ``log(p[label] / (1 - p[label]))`` from logits, computed stably:
    the log-odds is ``z[label] - logsumexp(z[others])``."""
    z = logits.double()
    zk = z.gather(1, label[:, None]).squeeze(1)
    others = z.scatter(1, label[:, None], float("-inf"))
    rest = torch.logsumexp(others, dim=1)
    logp = zk - torch.logsumexp(z, dim=1)
    return logp.float(), (zk - rest).float()


def _logit(p: torch.Tensor) -> torch.Tensor:
    """``log(p / (1 - p))`` with ``p`` kept in ``[1e-8, 1 - 1e-8]`` (float64 inside for resolution near 1)."""
    q = p.double().clamp(EPS, 1 - EPS)
    return (torch.log(q) - torch.log1p(-q)).to(p.dtype)


def _finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


class _Snapshots(nn.ModuleList):
    """The expert ensemble's snapshots (``expert_snapshots_``; empty without ``expert_ensemble``).
    Called, it runs each one (stacked outputs): export's preparation of a network probes it so."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([net(x) for net in self])


# --- the shared trunk --------------------------------------------------------------------------------
class _Frozen(nn.Module):
    """A module held in eval mode whatever ``train()`` asks (batch norm uses, and never updates, its
    running statistics; dropout is off): the frozen trunk of a finetuned copy."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def train(self, mode: bool = True) -> "_Frozen":
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class _TrunkHead(nn.Module):
    """``head(trunk(x))``: a finetuned copy of M whose part before the cut is M's (frozen)."""

    def __init__(self, trunk: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk if isinstance(trunk, _Frozen) else _Frozen(trunk)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def _check_cut(model: nn.Module, cut: str) -> None:
    """One line for a model that declares no cut points, or not this one."""
    points = cut_points(model)
    if not points:
        raise BadExpertError(
            f"BaDExpert: a shared trunk needs a model that declares cut points, and this {type(model).__name__} "
            "declares none (badexpert's own architectures do; a model from Hugging Face, an ONNX file or a factory "
            "does not); fit it without a shared trunk"
        )
    if cut not in points:
        raise BadExpertError(f"BaDExpert: shared trunk '{cut}' is not a cut point of this model; choose one of: "
                             f"{', '.join(points)}")


def _with_frozen_trunk(model: nn.Module, cut: str, images: torch.Tensor) -> nn.Module:
    """A copy of ``model`` split at ``cut``, its trunk frozen (no gradients, eval mode): what both
    finetuned copies start from. Checked to compute ``model``'s own outputs on a few clean images
    (a model's ``split`` must; badexpert's architectures match operation for operation)."""
    from ..utils import model_device

    trunk, head = split_model(copy.deepcopy(model), cut)
    trunk.requires_grad_(False)
    net = _TrunkHead(trunk, head).eval()
    x = to_float(images[:32]).to(model_device(model))
    with torch.no_grad(), eval_mode(model):
        ours, theirs = net(x), model(x)
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5):
        raise BadExpertError(f"BaDExpert: this model split at '{cut}' does not compute the model's own outputs; "
                             "its split() is wrong: fit it without a shared trunk")
    return net


def _bind_head(model: nn.Module, cut: str, net: _TrunkHead) -> _TrunkHead:
    """``net``'s finetuned head on ``model``'s own trunk, once the trunk ``net`` was finetuned
    with is checked bit-identical to it (weights and batch-norm statistics)."""
    trunk, _ = split_model(model, cut)
    mine, theirs = trunk.state_dict(), net.trunk.module.state_dict()
    if mine.keys() != theirs.keys() or not all(torch.equal(mine[k], theirs[k].to(mine[k].device)) for k in mine):
        raise BadExpertError(f"BaDExpert: the frozen trunk (up to '{cut}') changed while finetuning; "
                             "the model's split() shares modules it should not")
    return _TrunkHead(trunk, net.head).eval()


def _trunk_record(model: nn.Module, cut: str) -> dict:
    """What the fit report (and so the detector file) records of the shared trunk: the cut, the
    trunk's weights fingerprint (checked on load) and how the parameters divide."""
    from ..io import model_fingerprint

    trunk, head = split_model(model, cut)
    return {"cut": cut, "trunk_fingerprint": model_fingerprint(trunk),
            "trunk_parameters": sum(p.numel() for p in trunk.parameters()),
            "head_parameters": sum(p.numel() for p in head.parameters())}


def _check_trunk(model: nn.Module, cut: str, record: dict | None) -> None:
    """On load: the model has the cut, and its trunk is the one the heads were finetuned on."""
    from ..io import model_fingerprint

    _check_cut(model, cut)
    trunk, _ = split_model(model, cut)
    if isinstance(record, dict) and record.get("trunk_fingerprint") not in (None, model_fingerprint(trunk)):
        raise BadExpertError(f"the detector's heads were finetuned on another trunk (up to '{cut}') than this "
                             "model's; load it with the model it was fitted on")


def _load_head(model: nn.Module, cut: str, tensors: dict[str, torch.Tensor], prefix: str, device) -> _TrunkHead:
    """A finetuned head restored from ``tensors`` on ``model``'s own trunk."""
    trunk, head = split_model(model, cut)
    return _TrunkHead(trunk, _load_copy(head, tensors, prefix, device)).eval()


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

