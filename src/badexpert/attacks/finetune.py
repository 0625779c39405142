"""FT: a backdoor injected by finetuning a clean model (the "post-development" attack of the
BaDExpert evaluation): the clean model is trained first, then finetuned briefly on the training
set with part of every batch carrying another attack's trigger."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, ClassVar

import torch
from torch import nn

from ..data.core import Dataset
from ..errors import BadExpertError
from ..validation import PositiveInt, Range
from .base import Attack, Rate
from .components import Components

#: Momentum of the finetuning SGD (reference, FT and TrojanNN).
FINETUNE_MOMENTUM = 0.9
#: Weight decay of the finetuning SGD: the reference's TrojanNN retraining value (its FT setting
#: is not recorded in the reference description; the same short-finetune value is used for both).
FINETUNE_WEIGHT_DECAY = 1e-4
#: Parameters the FT attack sets on its base attack itself (they may not appear in ``base_params``).
FORWARDED = ("target", "source_classes", "trigger_seed")
#: The base attack's own rates have no meaning under FT (FT's rates are per batch).
OWN_RATES = ("poison_rate", "cover_rate")


def finetune_recipe(recipe, *, lr: float, epochs: int):
    """The recipe of a short finetune of a trained model (FT's poisoned epoch, TrojanNN's
    retraining): SGD (momentum 0.9, weight decay 1e-4) at a constant ``lr`` for ``epochs``
    epochs, with the suspect recipe's batch size, augmentation and mixed precision."""
    return recipe.replace(optimizer="sgd", lr=lr, epochs=epochs, momentum=FINETUNE_MOMENTUM, nesterov=False,
                          weight_decay=FINETUNE_WEIGHT_DECAY, schedule="constant", milestones=(), warmup_epochs=0.0,
                          label_smoothing=0.0, max_steps=None)


def valid_bases() -> list[str]:
    """Registry names FT accepts as ``base``: attacks whose trigger is built from their parameters
    (not learned while implanting) and that relabel what they poison (not clean-label)."""
    from . import ATTACKS

    return [n for n, cls in ATTACKS.items()
            if not cls.learned and not cls.clean_label and not issubclass(cls, FineTune)]


@dataclass
class FineTune(Attack):
    """FT: finetune a clean model for one epoch with a share of every batch poisoned online by a
    base attack's trigger.

    **Implanting** (:meth:`implant`): the clean model is ``build_model()`` trained on the clean
    training set with the suspect recipe (``components.clean_model``: a cached component shared
    with TrojanNN, SRA and the clean-label surrogate). It is then finetuned for
    ``finetune_epochs`` epochs on the whole training set, SGD with momentum 0.9, weight decay
    1e-4, a constant ``finetune_lr``, the suspect recipe's batch size and augmentation. In every
    batch (after augmentation), ``round(poison_rate * B)`` samples drawn among those the base
    attack counts (not of the target class, from its source classes if it has any) get the base
    attack's training trigger and its target label (``(y + 1) mod C`` for an all-to-all base);
    ``round(cover_rate * B)`` other samples among the base's cover candidates get its cover
    trigger and keep their labels. Every choice comes from the training loop's seeded generator.

    **The trigger is the base attack's**: ``base`` (a registry name) built with ``base_params``
    (its trigger parameters, e.g. ``{"alpha": 0.1}`` for blend) plus FT's own ``target``,
    ``source_classes`` (when set) and ``trigger_seed``, which FT passes on. FT delegates the
    trigger (test-time, training and cover triggers), the label map (:meth:`target_of`), which
    test inputs count (:meth:`counts`) and the class checks to it; its trigger state, saved with
    the suspect model, is the base's. On the command line ``base_params`` is JSON:
    ``--attack-param base=blend --attack-param 'base_params={"alpha": 0.1}'``.

    Accepted bases (:func:`valid_bases`): every registered attack whose trigger is built from its
    parameters and that relabels its poisoned samples (badnet, blend, trojan, all_to_all, tact,
    wanet, bpp, refool, the adaptive attacks...). Refused: ``ft`` itself, attacks that learn
    their trigger while implanting (their trigger does not exist before their own training), and
    clean-label attacks (their poisons keep target-class labels and need their own preparation,
    such as CL's adversarial perturbation; online relabelling has no meaning for them).

    **poison()** on its own (not used by :meth:`implant`) gives a static poisoned copy of a set:
    ``round(poison_rate * N)`` samples with the base trigger and the target label (and
    ``round(cover_rate * N)`` covers), i.e. what one finetuning epoch shows the model, in one set.

    Parameters (reference: the BaDExpert research code's FT settings):

    - ``base``: **badnet** (the reference's ``-poison_type``); ``base_params``: ``{}``.
    - ``poison_rate``: **0.2**, a fraction **per batch** (reference: 20% of every batch).
    - ``cover_rate``: **0** per batch (the reference has no cover samples).
    - ``finetune_epochs``: **1** (reference).
    - ``finetune_lr``: **0.01** (reference, CIFAR-10; pass 0.001 for GTSRB).

    Departures: the reference poisons the first 20% of each batch whatever their class; here
    only samples the base attack counts are poisoned (a batch with fewer poisons all it has).
    The reference's weight decay and schedule for FT are not recorded; here 1e-4 (its TrojanNN
    retraining value) and a constant rate. The reference's ViT/ImageNet variant (lr 1e-5 on 10%
    of the training set) is not special-cased: pass ``finetune_lr``.
    """

    poison_rate: Rate = 0.2
    base: str = "badnet"
    base_params: dict = field(default_factory=dict)
    finetune_epochs: PositiveInt = 1
    finetune_lr: Annotated[float, Range(gt=0)] = 0.01

    name: ClassVar[str] = "ft"
    second_batch_rate: ClassVar[str] = "cover_rate"

    def __post_init__(self) -> None:
        if isinstance(self.base_params, str):  # a CLI value that is not JSON stays a string
            raise BadExpertError(
                f"attack 'ft' parameter 'base_params' must be an object (JSON dict), got {self.base_params!r}; "
                """on the command line write it as JSON: --attack-param 'base_params={"alpha": 0.1}'"""
            )
        super().__post_init__()
        self._base = self._build_base()

    def _build_base(self) -> Attack:
        from ..utils import to_jsonable
        from . import ATTACKS, get_attack

        valid = valid_bases()
        choose = f"choose one of: {', '.join(valid)}"
        try:
            key = ATTACKS.canonical(self.base)
        except BadExpertError:
            raise BadExpertError(f"attack 'ft' parameter 'base' is '{self.base}', not an attack; {choose}") from None
        cls = ATTACKS[key]
        if key not in valid:
            why = ("FT finetunes with another attack's trigger" if issubclass(cls, FineTune) else
                   "it learns its trigger while it implants" if cls.learned else
                   "a clean-label attack (FT relabels what it poisons)")
            raise BadExpertError(f"attack 'ft' parameter 'base' is '{key}': {why}; {choose}")
        bad_keys = [k for k in self.base_params if not isinstance(k, str)]
        if bad_keys:
            raise BadExpertError(f"attack 'ft' parameter 'base_params' has a key that is not a name: {bad_keys[0]!r}")
        clash = sorted(set(self.base_params) & set(FORWARDED + OWN_RATES))
        if clash:
            raise BadExpertError(
                f"attack 'ft' parameter 'base_params' sets {clash}: pass target, source_classes and trigger_seed to "
                "the FT attack itself (it hands them to its base); its poison_rate and cover_rate are per batch"
            )
        params = {**self.base_params, "target": self.target, "trigger_seed": self.trigger_seed}
        if self.source_classes is not None:
            params["source_classes"] = self.source_classes
        try:
            base = get_attack(key, **params)
        except BadExpertError as exc:
            raise BadExpertError(f"attack 'ft' with base '{key}': {exc}") from None
        # a canonical, JSON-ready record: 'BadNet' -> 'badnet', tuples -> lists, 1 -> 1.0 where a float
        self.base = key
        own = base.params()
        self.base_params = {k: to_jsonable(own[k]) for k in self.base_params}
        return base

    @property
    def base_attack(self) -> Attack:
        """The base attack whose trigger FT uses (built from ``base`` and ``base_params``)."""
        return self._base

    # --- everything about the trigger is the base attack's --------------------------------
    trigger_extent = property(lambda self: self._base.trigger_extent, doc="The base attack's trigger extent.")

    def check_files(self) -> None:
        base = getattr(self, "_base", None)  # the base checks its files when it is built
        if base is not None:
            base.check_files()

    def source_files(self) -> list[str]:
        return self._base.source_files()

    def build_trigger(self, shape):
        return self._base.build_trigger(shape)

    def use_state(self, shape, state) -> None:
        super().use_state(shape, state)
        self._base.use_state(shape, state)

    def trigger(self, x, parts):
        return self._base.trigger(x, parts)

    def trigger_train(self, x, parts, generator):
        return self._base.trigger_train(x, parts, generator)

    def trigger_cover(self, x, parts, generator):
        return self._base.trigger_cover(x, parts, generator)

    def trigger_test(self, x, parts, generator):
        return self._base.trigger_test(x, parts, generator)

    def target_of(self, labels, num_classes=None):
        return self._base.target_of(labels, num_classes)

    def counts(self, labels, num_classes=None):
        return self._base.counts(labels, num_classes)

    def check(self, num_classes: int) -> None:
        self._base.check(num_classes)

    def cover_candidates(self, labels, num_classes):
        return self._base.cover_candidates(labels, num_classes)

    def describe_target(self, class_names=None) -> str:
        return self._base.describe_target(class_names)

    # --- online poisoning and finetuning --------------------------------------------------
    def batch_transform(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, *,
                        num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Online poisoning of one training batch (float images in ``[0, 1]``, labels), see the
        class docstring and :meth:`~badexpert.attacks.base.Attack.poison_batch`."""
        x, y, _, _ = self.poison_batch(x, y, generator, num_classes=num_classes)
        return x, y

    def implant(self, train_set: Dataset, build_model: Callable[[], nn.Module], recipe, seed: int, *,
                log: Callable[[str], Any] = print, components: Components | None = None) -> tuple[nn.Module, dict]:
        """Train (or load) the clean model, then finetune it with online poisoning (see the class
        docstring). ``info``: samples poisoned and covered per batch, the finetuning recipe, and
        the phase times and components."""
        from ..training import train

        bs, n_poison, n_cover = self.online_counts(train_set, recipe)
        components = components if components is not None else Components(log=log)
        log(f"FT: a clean model first ({recipe.epochs} epochs), then finetuned with the trigger of {self._base.name}")
        model = components.clean_model(build_model, train_set, recipe, seed)
        ft = finetune_recipe(recipe, lr=self.finetune_lr, epochs=self.finetune_epochs)
        log(f"finetuning the clean model {ft.epochs} epoch(s) at lr {ft.lr:g}, poisoning {n_poison} (and covering "
            f"{n_cover}) of every batch of {bs} with {self.describe()}")
        with components.phase("finetune"):
            train(model, train_set, ft, seed=seed, desc="finetune",
                  batch_transform=functools.partial(self.batch_transform, num_classes=train_set.num_classes))
        info = {"poisoned_per_batch": n_poison, "cover_per_batch": n_cover, "batch_size": bs,
                "finetune_recipe": ft.to_dict()}
        return model, {**info, **components.info()}
