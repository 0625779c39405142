"""TrojanNN (Liu et al., NDSS 2018, "Trojaning attack on neural networks"): a trigger optimised
against a clean model to excite a few of its internal neurons, then a brief retraining with part
of the data carrying that trigger."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Annotated, Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..data.core import Dataset, to_float
from ..errors import BadExpertError
from ..validation import PositiveInt, Range
from .base import Attack, Rate
from .components import Components, tensor_digest
from .finetune import finetune_recipe
from .patch import Trojan, paste

#: The reference selects 100 neurons of ResNet-18's 512 penultimate features; a narrower layer
#: gets the same share (see :meth:`TrojanNN.neuron_count`).
REFERENCE_NEURONS, REFERENCE_FEATURES = 100, 512
#: Images whose selected-neuron activation is reported before and after the optimisation.
PROBE_IMAGES = 256


def final_linear(model: nn.Module, x: torch.Tensor) -> nn.Linear:
    """The ``nn.Linear`` layer whose output is ``model``'s output (the classification head), found
    by running ``x`` through the model with every Linear layer watched: architecture-independent
    (``fc`` of the CNN, ResNet and VGG, MobileNet's ``classifier[1]``, the ViT's ``head``, a
    user's module)."""
    from ..utils import eval_mode

    calls: list[tuple[nn.Module, torch.Tensor]] = []
    handles = [m.register_forward_hook(lambda mod, _inp, out: calls.append((mod, out)))
               for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad(), eval_mode(model):
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    for mod, o in reversed(calls):
        if o is out or (isinstance(o, torch.Tensor) and o.shape == out.shape and torch.equal(o, out)):
            return mod
    raise BadExpertError(
        "attack 'trojannn' needs a model whose logits are the output of a final torch.nn.Linear layer (its input "
        "features are the neurons the trigger excites); every badexpert architecture has one, this model does not"
    )


def penultimate(model: nn.Module, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The input features of ``layer`` (the final Linear) for images ``x``, ``[N, D]``; keeps the
    autograd graph, so gradients flow back to ``x`` when it requires them."""
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda _mod, inp: captured.append(inp[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return captured[0].flatten(1)


@functools.lru_cache(maxsize=16)
def trojan_square(c: int, h: int, w: int) -> tuple[slice, slice]:
    """Rows and columns of the :class:`~badexpert.attacks.patch.Trojan` square in ``c x h x w`` images."""
    return Trojan().pattern(c, h, w)[2]


@dataclass
class TrojanNN(Attack):
    """TrojanNN: optimise the Trojan square's pattern so that it drives chosen penultimate-layer
    neurons of a clean model to a high activation, then retrain that model briefly with part of
    the training set carrying the trigger (relabelled to the target).

    **Implanting** (:meth:`implant`):

    1. The clean model: ``build_model()`` trained on the clean training set with the suspect
       recipe (``components.clean_model``, a cached component shared with FT, SRA and the
       clean-label surrogate).
    2. Neurons: the input features of the model's final ``nn.Linear`` layer (found by
       :func:`final_linear`, so any architecture whose logits come from one works), ranked by
       the summed absolute weight they send to the logits, ``sum_k |W[k, j]|``; the top
       :meth:`neuron_count` are chosen.
    3. Trigger: a pattern ``p = (tanh(w) + 1) / 2`` inside the Trojan square (the geometry of
       :class:`~badexpert.attacks.patch.Trojan`: 8x8 at rows/cols 21-28 of a 32x32 image, scaled
       with the image size), pasted over the pixels there. ``w`` starts from a normal draw
       seeded by ``trigger_seed``; Adam (lr ``trigger_lr``, cosine decay to 0 over
       ``trigger_steps`` steps) minimises the mean squared error between the chosen neurons'
       activations on triggered images and ``target_activation``. Each step uses
       ``trigger_batch`` clean training images drawn with the run's seed. The pattern is a
       cached component, keyed on the clean model's weights, the data and these parameters.
    4. Retraining: ``round(poison_rate * N)`` non-target training samples get the trigger and
       the target label (:meth:`Attack.poison`), and the clean model is finetuned on that set for
       ``retrain_epochs`` epochs: SGD, momentum 0.9, weight decay 1e-4, constant ``retrain_lr``,
       the suspect recipe's batch size and augmentation.

    The optimised pattern (``"pattern"``, full image size, and the square ``"mask"``) is the
    attack's trigger state, saved with the suspect model; before :meth:`implant` there is no
    trigger (a one-line error), since it is learned.

    Parameters (reference: the BaDExpert research code's TrojanNN settings):

    - ``neurons``: ``None`` = the reference's 100 of ResNet-18's 512 features, kept as a share
      for other widths: ``min(100, round(D * 100 / 512))`` of the layer's ``D`` features (the
      default CNN, ``D = 576``: 100; width 8, ``D = 288``: 56). An explicit number is used as is.
    - ``target_activation``: **100** (reference).
    - ``trigger_steps``: **1000** (reference, also the CPU default: ~20 s on one thread for the
      default CNN on Fashion-MNIST); ``trigger_lr``: **0.1** (reference, Adam, cosine schedule);
      ``trigger_batch``: 32 (not in the reference: see the departures).
    - ``poison_rate``: **0.1** of the training set (reference: 10% during retraining).
    - ``retrain_epochs``: **1** (reference); ``retrain_lr``: **0.01** (reference, CIFAR-10; pass
      0.001 for GTSRB).

    Departures: the reference does not record what the trigger is pasted on while it is
    optimised; here it is optimised on random clean training images, ``trigger_batch`` per step
    (so it excites the neurons whatever the background). The schedule of the retraining rate,
    not recorded either, is constant. The reference keeps one optimised trigger image per dataset
    (seed 2333); here the trigger belongs to the clean model it was optimised against, cached
    with it and saved with the suspect model.
    """

    poison_rate: Rate = 0.1
    neurons: PositiveInt | None = None
    target_activation: Annotated[float, Range(gt=0)] = 100.0
    trigger_steps: PositiveInt = 1000
    trigger_lr: Annotated[float, Range(gt=0)] = 0.1
    trigger_batch: PositiveInt = 32
    retrain_epochs: PositiveInt = 1
    retrain_lr: Annotated[float, Range(gt=0)] = 0.01

    name: ClassVar[str] = "trojannn"
    learned: ClassVar[bool] = True

    # --- the trigger: a pattern inside the Trojan square ----------------------------------
    def square(self, shape: tuple[int, int, int]) -> tuple[slice, slice]:
        """Rows and columns of the Trojan square for images of ``shape`` (the ``trojan`` attack's)."""
        return trojan_square(*(int(v) for v in shape))

    def initial_weights(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """The tanh-space pattern ``w`` the optimisation starts from, ``[C, s, s]``, seeded by
        ``trigger_seed``."""
        from ..utils import derive_generator

        rows, cols = self.square(shape)
        g = derive_generator(self.trigger_seed, "trojannn:init")
        return torch.randn(shape[0], rows.stop - rows.start, cols.stop - cols.start, generator=g)

    def state_of(self, w: torch.Tensor, shape: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        """The trigger state for tanh-space pattern ``w``: the full-size ``pattern`` (zero
        outside the square) and the square ``mask``, on ``w``'s device (differentiable in ``w``)."""
        c, h, w_ = shape
        rows, cols = self.square(shape)
        pattern = F.pad((torch.tanh(w) + 1) / 2, (cols.start, w_ - cols.stop, rows.start, h - rows.stop))
        mask = torch.zeros(1, h, w_, device=w.device)
        mask[:, rows, cols] = 1.0
        return {"pattern": pattern, "mask": mask}

    def initial_state(self, shape):
        shape = tuple(int(v) for v in shape)
        return self.state_of(self.initial_weights(shape), shape)

    def trigger(self, x, parts):
        return paste(x, parts)

    # --- neurons and the optimisation -----------------------------------------------------
    def neuron_count(self, features: int) -> int:
        """How many of ``features`` penultimate neurons are chosen (see ``neurons``)."""
        if self.neurons is None:
            return min(REFERENCE_NEURONS, max(1, round(features * REFERENCE_NEURONS / REFERENCE_FEATURES)))
        if self.neurons > features:
            raise BadExpertError(
                f"attack 'trojannn' parameter 'neurons' is {self.neurons} but the model's last layer has only "
                f"{features} input features; choose at most {features} (or leave it out)"
            )
        return self.neurons

    def select_neurons(self, layer: nn.Linear) -> torch.Tensor:
        """Indices of the chosen input features of ``layer``: the largest summed absolute outgoing
        weights (ties to the lower index), on the CPU."""
        strength = layer.weight.detach().abs().sum(0).cpu()
        return torch.sort(strength, descending=True, stable=True).indices[: self.neuron_count(len(strength))]

    @torch.no_grad()
    def neuron_activation(self, model: nn.Module, layer: nn.Linear, neurons: torch.Tensor, images: torch.Tensor,
                          parts: dict[str, torch.Tensor] | None = None) -> float:
        """Mean activation of ``neurons`` (input features of ``layer``) on ``images`` (uint8 or
        float), with the trigger ``parts`` pasted on them (none: clean images)."""
        from ..utils import eval_mode, model_device

        dev = model_device(model)
        x = to_float(images).to(dev)
        if parts is not None:
            x = self.trigger(x, {k: v.to(dev) for k, v in parts.items()})
        with eval_mode(model):
            return float(penultimate(model, layer, x)[:, neurons.to(dev)].mean())

    def optimise_trigger(self, model: nn.Module, images: torch.Tensor, generator: torch.Generator, *,
                         layer: nn.Linear | None = None, neurons: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The trigger state optimised against ``model`` (in eval mode, weights untouched) on
        ``images`` (uint8 ``[N, C, H, W]``, batches drawn with ``generator``), see the class
        docstring; on the CPU. ``layer`` and ``neurons``: the model's final Linear layer and the
        chosen neurons, when the caller has them (found here otherwise)."""
        from ..utils import eval_mode, model_device, progress

        shape = tuple(int(v) for v in images.shape[1:])
        dev = model_device(model)
        if layer is None:
            layer = final_linear(model, to_float(images[:2]).to(dev))
        idx = (neurons if neurons is not None else self.select_neurons(layer)).to(dev)
        w = self.initial_weights(shape).to(dev).requires_grad_(True)
        opt = torch.optim.Adam([w], lr=self.trigger_lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trigger_steps)
        goal = torch.full((min(self.trigger_batch, len(images)), len(idx)), float(self.target_activation), device=dev)
        with eval_mode(model), torch.enable_grad():
            for _ in progress(range(self.trigger_steps), desc="trojannn trigger"):
                pick = torch.randint(len(images), (len(goal),), generator=generator)
                x = to_float(images[pick]).to(dev)
                feats = penultimate(model, layer, self.trigger(x, self.state_of(w, shape)))[:, idx]
                loss = F.mse_loss(feats, goal)
                (w.grad,) = torch.autograd.grad(loss, [w])
                opt.step()
                sched.step()
        return {k: v.detach().cpu() for k, v in self.state_of(w.detach(), shape).items()}

    # --- implanting -----------------------------------------------------------------------
    def implant(self, train_set: Dataset, build_model: Callable[[], nn.Module], recipe, seed: int, *,
                log: Callable[[str], Any] = print, components: Components | None = None) -> tuple[nn.Module, dict]:
        """Clean model, neuron selection, trigger optimisation (cached), poisoning and retraining
        (see the class docstring). ``info`` records the neurons and the chosen neurons' mean
        activation on clean, initially triggered and finally triggered training images."""
        from ..training import train
        from ..utils import derive_generator, model_device

        self.poison_count(train_set)  # so is a rate that poisons nothing
        shape = (train_set.channels, *train_set.image_size)
        self.square(shape)  # an image too small for the square is a one-line error before any training
        components = components if components is not None else Components(log=log)
        log(f"TrojanNN: a clean model first ({recipe.epochs} epochs), then the trigger is optimised against it")
        model = components.clean_model(build_model, train_set, recipe, seed)
        layer = final_linear(model, to_float(train_set.images[:2]).to(model_device(model)))
        neurons = self.select_neurons(layer)
        spec = {"clean_model": tensor_digest(model.state_dict()), "shape": list(shape), "seed": seed,
                "trigger_seed": self.trigger_seed, "neurons": len(neurons),
                "target_activation": self.target_activation, "steps": self.trigger_steps, "lr": self.trigger_lr,
                "batch": self.trigger_batch}

        def build() -> dict[str, torch.Tensor]:
            log(f"optimising the trigger to excite {len(neurons)} of {layer.in_features} penultimate neurons "
                f"({self.trigger_steps} steps)")
            return self.optimise_trigger(model, train_set.images, derive_generator(seed, "trojannn:trigger"),
                                         layer=layer, neurons=neurons)

        state = components.fetch("trojannn_trigger", spec, build, data=train_set)
        self.use_state(shape, state)
        probe = train_set.images[torch.randperm(len(train_set), generator=derive_generator(seed, "trojannn:probe"))
                                 [:PROBE_IMAGES]]
        activation = {key: self.neuron_activation(model, layer, neurons, probe, parts)
                      for key, parts in (("clean", None), ("initial", self.initial_state(shape)), ("optimised", state))}
        log(f"selected neurons' mean activation: clean {activation['clean']:.2f}, initial trigger "
            f"{activation['initial']:.2f}, optimised trigger {activation['optimised']:.2f} "
            f"(goal {self.target_activation:g})")
        with components.phase("poison"):
            data = self.poison(train_set, derive_generator(seed, "poison"))
        rt = finetune_recipe(recipe, lr=self.retrain_lr, epochs=self.retrain_epochs)
        log(f"retraining {rt.epochs} epoch(s) at lr {rt.lr:g} with {len(data.meta['poison_indices'])} of {len(data)} "
            f"samples poisoned by {self.describe()}")
        with components.phase("retrain"):
            train(model, data, rt, seed=seed, desc="retrain")
        info = {"poisoned_samples": len(data.meta["poison_indices"]), "cover_samples": len(data.meta["cover_indices"]),
                "neurons": neurons.tolist(), "penultimate_features": layer.in_features,
                "neuron_activation": activation, "retrain_recipe": rt.to_dict()}
        return model, {**info, **components.info()}
