"""Input-aware dynamic backdoor (Nguyen and Tran, NeurIPS 2020, "Input-Aware Dynamic Backdoor
Attack"): a pattern generator and a mask generator, trained with the classifier, give every input
its own trigger."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Annotated, Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..data.core import Dataset, to_float
from ..models.cnn import conv_bn_relu
from ..validation import PositiveInt, Range
from .base import Attack, Rate
from .components import Components, prefixed, tensor_digest, unprefixed

#: Added to the denominator of the diversity ratio (the reference's ``EPSILON``).
DIV_EPSILON = 1e-7
#: Training images the saved model's metadata measures the trained mask density on.
DENSITY_SAMPLES = 1024
#: Images put through the generators at once when triggering a large batch.
APPLY_BATCH = 512


class EncoderDecoder(nn.Module):
    """The generators' network (the paper's, without skip connections): ``blocks`` down blocks
    (two 3x3 conv-BN-ReLU, 2x2 max pool; ``channels`` channels, doubled per block), one middle
    conv-BN-ReLU, ``blocks`` up blocks (nearest 2x upsampling, two convs halving the channels; the
    last conv a plain 3x3 conv to ``out_channels``), then ``tanh(.) / 2 + 0.5`` into (0, 1).

    Any image size works: the input is padded (replicating its border, split evenly between the
    two sides) to a multiple of ``2 ** blocks`` and the output cropped back, so 28x28 runs at 32x32
    and 12x12 at 16x16.
    """

    def __init__(self, in_channels: int, out_channels: int, channels: int, blocks: int) -> None:
        from ..models import he_init

        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i in range(blocks):
            w = channels * 2**i
            layers += [*conv_bn_relu(c, w), *conv_bn_relu(w, w), nn.MaxPool2d(2)]
            c = w
        layers += conv_bn_relu(c, c)
        for i in reversed(range(blocks)):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), *conv_bn_relu(c, c)]
            if i > 0:
                layers += conv_bn_relu(c, c // 2)
                c //= 2
            else:
                layers.append(nn.Conv2d(c, out_channels, 3, padding=1))
        self.net = nn.Sequential(*layers)
        self.multiple = 2**blocks
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = -h % self.multiple, -w % self.multiple
        top, left = ph // 2, pw // 2
        if ph or pw:
            x = F.pad(x, (left, pw - left, top, ph - top), mode="replicate")
        out = self.net(x)[..., top:top + h, left:left + w]
        return torch.tanh(out) / 2 + 0.5


def threshold(m: torch.Tensor) -> torch.Tensor:
    """The reference's soft threshold of the mask generator's output: ``tanh(20 m - 10) / 2 + 0.5``
    (a steep step at 0.5, so masks are nearly binary but keep a gradient)."""
    return torch.tanh(20 * m - 10) / 2 + 0.5


def stamp(x: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x + (pattern - x) * mask``: the pattern where the mask is 1, the image where it is 0."""
    return x + (pattern - x) * mask


def _rms(d: torch.Tensor) -> torch.Tensor:
    """Per-sample root mean square of a batch (``1e-12`` inside the root keeps its gradient finite at 0)."""
    return (d.flatten(1).pow(2).mean(1) + 1e-12).sqrt()


def diversity_loss(x1: torch.Tensor, x2: torch.Tensor, out1: torch.Tensor, out2: torch.Tensor) -> torch.Tensor:
    """The paper's diversity loss: the mean over pairs of ``rms(x1 - x2) / (rms(g(x1) - g(x2)) + 1e-7)``,
    small when different inputs get different generator outputs. Pairs of identical images are
    left out (the ratio is 0/0 there)."""
    d_in = (x1 - x2).flatten(1).pow(2).mean(1).sqrt()
    keep = d_in > 0
    if not bool(keep.any()):
        return out1.sum() * 0
    return (d_in[keep] / (_rms(out1[keep] - out2[keep]) + DIV_EPSILON)).mean()


class AddLoss(torch.autograd.Function):
    """``x`` unchanged, with ``loss`` riding along: the backward pass of whatever ``x`` feeds into
    also runs ``loss``'s (as if ``loss`` were added to it), in the same single pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.loss_dtype = loss.dtype
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones((), dtype=ctx.loss_dtype, device=grad.device)


@dataclass
class Dynamic(Attack):
    """Input-aware dynamic backdoor: ``x' = x + (G(x) - x) * m(x)``, a pattern ``G(x)`` and a
    nearly binary mask ``m(x)`` (:func:`threshold` of the mask generator's output) that both
    depend on the input; the classifier learns that an image carrying *its own* trigger is of
    the target class, and that one carrying a trigger made for *another* image is not.

    **Training** (:meth:`implant`, the paper's two stages):

    1. The mask generator ``M`` alone, ``mask_epochs`` epochs of Adam (``mask_lr``, betas
       (0.5, 0.9), lr x0.1 at 40% and 80% of the steps: the reference's epochs 10 and 20 of 25),
       each image paired with another of its (shuffled) batch, on
       ``lambda_norm * mean_i relu(mean(m(x_i)) - mask_density) + lambda_div * diversity(x, x', m)``
       (:func:`diversity_loss`). Then ``M`` is **frozen** (as in the reference) and used in eval mode.
    2. The classifier (``build_model()``, the recipe, the one training loop) and the pattern
       generator ``G`` (Adam, ``generator_lr``, betas (0.5, 0.9), constant) jointly. In every
       batch (after augmentation) ``round(poison_rate * B)`` non-target samples get their own
       trigger and the target label; ``round(cross_rate * B)`` other samples get the trigger of
       another random image of the batch (its pattern and mask) and keep their true labels (the
       cross-trigger samples); the rest stay clean. The loss is the classifier's cross-entropy
       on the whole batch plus ``lambda_div * diversity(x, x', G)`` over the images ``G`` ran on
       (each paired with the next one). One step updates both networks.

    **State.** The trained ``G`` and ``M`` (``"pattern.*"``, ``"mask.*"``: their state dicts,
    BatchNorm statistics included) are the attack's trigger state, saved with the model;
    :meth:`trigger` rebuilds the two networks from it (once per state and device) and runs them
    in eval mode. Before :meth:`implant` (or a saved model) there is no trigger. Initial weights
    come from ``trigger_seed``; the training's random choices from the run's ``seed``.

    **Cache.** The pretrained mask generator is the component ``"mask_generator"`` (keyed on
    its initial weights, its parameters, the batch size, the seed and the training images), so
    runs that change only the second stage share it. ``G`` is trained jointly with the
    classifier, so the second stage is one component, ``"dynamic_suspect"``: the classifier's and
    ``G``'s final weights, keyed on every attack parameter, the recipe, the seed, the classifier's
    and ``G``'s initial weights, the mask generator's weights and the training images. (The
    classifier's initial weights are drawn from the seed, not the caller's random state.)

    Parameters (reference: the original authors' code, the CIFAR-10/GTSRB settings):

    - ``poison_rate``: **0.1**, a fraction **per batch** (reference ``p_attack``).
    - ``cross_rate``: **0.1** per batch (reference ``p_cross``); ``poison_rate + cross_rate <= 1``.
    - ``mask_density``: **0.032**, the fraction of the image the mask may cover for free.
    - ``lambda_div``: **1**; ``lambda_norm``: **100**.
    - ``generator_channels``: **8**, the first block's channels (reference **32**; 16 for
      MNIST): a CPU-friendly default, about 16x fewer multiply-adds than the reference width.
    - ``generator_blocks``: **3** down/up blocks (reference 3; 2 for MNIST).
    - ``mask_epochs``: **2** (reference **25**, affordable on a GPU); ``mask_lr``: **0.01**;
      ``generator_lr``: **0.01** (reference values). The classifier's epochs and learning rate
      are the recipe's (reference: SGD lr 0.01, 600 epochs, ``G``'s lr x0.1 from epoch 200).
    - ``cover_rate``: 0; used only by the static :meth:`~badexpert.attacks.base.Attack.poison`
      after implanting, where cover samples get a cross trigger (:meth:`trigger_cover`).

    Departures: the reference's mask-norm loss is ``mean(relu(m - mask_density))`` over pixels,
    which treats the density as a pixel value and penalises every pixel the mask covers, so the
    covered fraction ends wherever the diversity loss balances it; here the penalty is on each
    mask's covered *fraction* above ``mask_density``, so the trained masks cover about that
    fraction. The reference poisons the first samples of each batch whatever their class; here
    only non-target samples get the backdoor trigger. The reference pairs images from two
    independent loaders; here pairs are drawn within the batch. The toolbox the BaDExpert paper
    used poisons a static 0.3% of the set with the authors' pretrained generators; here both are
    trained on the dataset at hand, jointly with the classifier, as in the original paper. The
    mask generator sees no augmentation.
    """

    poison_rate: Rate = 0.1
    cross_rate: Rate = 0.1
    mask_density: Annotated[float, Range(gt=0, lt=1)] = 0.032
    lambda_div: Annotated[float, Range(ge=0)] = 1.0
    lambda_norm: Annotated[float, Range(ge=0)] = 100.0
    generator_channels: Annotated[int, Range(ge=1, le=256)] = 8
    generator_blocks: Annotated[int, Range(ge=1, le=5)] = 3
    mask_epochs: PositiveInt = 2
    mask_lr: Annotated[float, Range(gt=0)] = 0.01
    generator_lr: Annotated[float, Range(gt=0)] = 0.01

    name: ClassVar[str] = "dynamic"
    second_batch_rate: ClassVar[str] = "cross_rate"
    learned: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self._nets: dict[int, tuple[dict, nn.Module, nn.Module]] = {}

    # --- the networks --------------------------------------------------------------------
    def networks(self, channels: int,
                 state: dict[str, torch.Tensor] | None = None) -> tuple[EncoderDecoder, EncoderDecoder]:
        """The pattern and mask generators for ``channels``-channel images (on the CPU): initial
        weights drawn from ``trigger_seed`` (the global random state is left alone), or those of
        ``state`` (``"pattern.*"`` and ``"mask.*"``) loaded into them."""
        from ..utils import seeded_rng

        nets = []
        for part, out in (("pattern", channels), ("mask", 1)):
            with seeded_rng(self.trigger_seed, f"dynamic:{part}"):
                net = EncoderDecoder(channels, out, self.generator_channels, self.generator_blocks)
            if state is not None:
                net.load_state_dict(unprefixed(part, state))
            nets.append(net)
        return nets[0], nets[1]

    def initial_state(self, shape):
        pattern, mask = self.networks(int(shape[0]))
        return {**prefixed("pattern", pattern.state_dict()), **prefixed("mask", mask.state_dict())}

    def use_state(self, shape, state):
        super().use_state(shape, state)
        self._nets = {}

    def _networks(self, parts: dict[str, torch.Tensor]) -> tuple[nn.Module, nn.Module]:
        """The two generators built from ``parts`` in eval mode on its device (cached while
        ``parts`` is the state in use)."""
        hit = self._nets.get(id(parts))
        if hit is not None and hit[0] is parts:
            return hit[1], hit[2]
        weight = parts["pattern.net.0.weight"]
        pattern, mask = self.networks(int(weight.shape[1]), parts)
        pattern, mask = (n.to(weight.device).eval().requires_grad_(False) for n in (pattern, mask))
        self._nets[id(parts)] = (parts, pattern, mask)
        return pattern, mask

    def patterns_and_masks(self, x: torch.Tensor,
                           parts: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(G(x), m(x))`` of the trained (or restored) generators for a float batch in [0, 1]."""
        if parts is None:
            parts = self._parts(tuple(x.shape[1:]), x.device)
        pattern, mask = self._networks(parts)
        pats, masks = [], []
        for xb in x.split(APPLY_BATCH):
            pats.append(pattern(xb))
            masks.append(threshold(mask(xb)))
        if not pats:
            return x.clone(), x[:, :1].clone()
        return torch.cat(pats), torch.cat(masks)

    def trigger(self, x, parts):
        return stamp(x, *self.patterns_and_masks(x, parts))

    def cross_trigger(self, x: torch.Tensor, other: torch.Tensor,
                      parts: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``x`` stamped with the trigger (pattern and mask) the generators make for ``other``."""
        return stamp(x, *self.patterns_and_masks(other, parts))

    def trigger_cover(self, x, parts, generator):
        """A cross-trigger sample (label kept): each image stamped with the trigger of another
        random image of ``x`` (of a uniform random image when ``x`` holds a single image)."""
        n = len(x)
        if n == 0:
            return x.clone()
        if n == 1:
            other = torch.rand(x.shape, generator=generator).to(x.device, x.dtype)
        else:
            other = x[((torch.arange(n) + torch.randint(1, n, (n,), generator=generator)) % n).to(x.device)]
        return self.cross_trigger(x, other, parts)

    # --- training ------------------------------------------------------------------------
    def mask_loss(self, x: torch.Tensor, masks: torch.Tensor, shift: int) -> torch.Tensor:
        """The mask generator's loss on a batch and its masks, each image paired with the one
        ``shift`` places further (see the class docstring)."""
        norm = F.relu(masks.flatten(1).mean(1) - self.mask_density).mean()
        div = diversity_loss(x, x.roll(shift, 0), masks, masks.roll(shift, 0))
        return self.lambda_norm * norm + self.lambda_div * div

    def pretrain_mask(self, mask: nn.Module, images: torch.Tensor, batch_size: int, seed: int,
                      device: torch.device) -> dict[str, torch.Tensor]:
        """Stage 1: train the mask generator on ``images`` (uint8 or float); its state dict."""
        from ..data.core import batches
        from ..utils import derive_generator, progress

        g = derive_generator(seed, "dynamic:mask_generator")
        mask = mask.to(device).train()
        opt = torch.optim.Adam(mask.parameters(), lr=self.mask_lr, betas=(0.5, 0.9))
        total = self.mask_epochs * max(1, len(images) // batch_size)
        decay_at = (round(0.4 * total), round(0.8 * total))
        bar = progress(total=total, desc="mask generator")
        step = 0
        try:
            for _ in range(self.mask_epochs):
                for x, _ in batches(images, None, batch_size=batch_size, device=device, shuffle=True, generator=g,
                                    drop_last=True):
                    for group in opt.param_groups:
                        group["lr"] = self.mask_lr * 0.1 ** sum(step >= s for s in decay_at)
                    shift = int(torch.randint(1, len(x), (1,), generator=g)) if len(x) > 1 else 0
                    loss = self.mask_loss(x, threshold(mask(x)), shift)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
                    bar.update(1)
        finally:
            bar.close()
        return mask.eval().state_dict()

    def batch_plan(self, batch_size: int) -> list[tuple[str, str, int]]:
        """``(info key, what, count)`` for each kind of triggered sample in a training batch of
        ``batch_size`` (the implant's log line and its ``info``)."""
        n_bd, n_cross = self.per_batch(batch_size)
        return [("poisoned_per_batch", "backdoor", n_bd), ("cross_per_batch", "cross-trigger", n_cross)]

    def batch_samples(self, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Which samples of one training batch (labels ``y``) get a trigger: ``(changed, source,
        relabelled)``, the indices of the changed samples, for each the index of the image whose
        trigger (pattern and mask) it gets, and the changed samples relabelled to the target.
        Dynamic: backdoor samples with their own trigger, relabelled, then cross-trigger samples
        with a random partner's trigger, labels kept (:meth:`batch_roles`, :meth:`partners`)."""
        backdoor, cross = self.batch_roles(y, generator, partnered=True)
        partners = self.partners(cross, len(y), generator)
        return torch.cat([backdoor, cross]), torch.cat([backdoor, partners]), backdoor

    def joint_batch(self, pattern: nn.Module, mask: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 2, one training batch (the training loop's ``batch_transform``): the samples
        :meth:`batch_samples` chooses, stamped with the pattern generator in train mode,
        differentiably, so the classifier's loss reaches it; the diversity loss rides along with
        the returned batch (:class:`AddLoss`), so the loop's one backward pass gives the pattern
        generator the gradient of both. Random choices come from ``generator``."""
        changed, source, backdoor = self.batch_samples(y, generator)
        if len(changed) == 0:
            return x, y
        dev = x.device
        changed = changed.to(dev)
        sources = x[source.to(dev)]
        patterns = pattern.train()(sources)
        with torch.no_grad():
            masks = threshold(mask(sources))
        x, y = x.clone(), y.clone()
        x[changed] = stamp(x[changed], patterns, masks)
        y[backdoor.to(dev)] = self.target
        if self.lambda_div > 0 and len(sources) >= 2:
            div = diversity_loss(sources, sources.roll(1, 0), patterns, patterns.roll(1, 0))
            x = AddLoss.apply(x, self.lambda_div * div)
        return x, y

    def implant(self, train_set: Dataset, build_model: Callable[[], nn.Module], recipe, seed: int, *,
                log: Callable[[str], Any] = print, components: Components | None = None) -> tuple[nn.Module, dict]:
        """Pretrain the mask generator, then train ``build_model()`` (with ``recipe``) jointly with
        the pattern generator (see the class docstring); both stages are cached components. The
        trained generators become the attack's trigger. ``info``: samples per batch, the mask
        density measured on training images, and the phase times."""
        from ..io import load_weights
        from ..training import train
        from ..utils import model_device, seeded_rng

        components = components if components is not None else Components(log=log)
        bs, _, _ = self.online_counts(train_set, recipe)
        plan = self.batch_plan(bs)
        shape = (train_set.channels, *train_set.image_size)
        with seeded_rng(seed, "init:dynamic_suspect"):
            model = build_model()
        device = model_device(model)
        pattern, mask = self.networks(shape[0])

        log(f"{self.name}: pretraining the mask generator ({self.mask_epochs} epochs, density {self.mask_density:g})")
        mask_params = ("mask_epochs", "mask_lr", "mask_density", "lambda_div", "lambda_norm")
        mask_spec = {"shape": list(shape), "init": tensor_digest(mask.state_dict()), "seed": seed, "batch_size": bs,
                     **{k: getattr(self, k) for k in mask_params}}
        mask_state = components.fetch(
            "mask_generator", mask_spec, lambda: self.pretrain_mask(mask, train_set.images, bs, seed, device),
            data=train_set)
        mask.load_state_dict(mask_state)
        mask = mask.to(device).eval().requires_grad_(False)

        log(f"{self.name}: training the suspect model jointly with the pattern generator: "
            f"{' and '.join(f'{n} {what}' for _, what, n in plan)} samples in every batch of {bs} ({recipe.epochs} epochs)")
        joint_spec = {"attack": self.to_dict(), "recipe": recipe.to_dict(), "seed": seed,
                      "init": tensor_digest(model.state_dict()), "pattern_init": tensor_digest(pattern.state_dict()),
                      "mask": tensor_digest(mask_state)}
        pattern = pattern.to(device)

        def build() -> dict[str, torch.Tensor]:
            opt = torch.optim.Adam(pattern.parameters(), lr=self.generator_lr, betas=(0.5, 0.9))
            opt.zero_grad(set_to_none=True)

            def step_pattern(step: int, _model: nn.Module) -> bool:  # after every classifier step
                opt.step()
                opt.zero_grad(set_to_none=True)
                return False

            train(model, train_set, recipe, seed=seed, desc="suspect model",
                  batch_transform=functools.partial(self.joint_batch, pattern, mask),
                  callback=step_pattern, callback_every=1)
            return {**prefixed("classifier", model.state_dict()), **prefixed("pattern", pattern.state_dict())}

        joint = components.fetch("dynamic_suspect", joint_spec, build, data=train_set)
        if components.records["dynamic_suspect"]["cached"]:
            load_weights(model, unprefixed("classifier", joint), source="the cached dynamic suspect model")
        self.use_state(shape, {**prefixed("pattern", unprefixed("pattern", joint)), **prefixed("mask", mask_state)})
        with torch.no_grad():
            _, masks = self.patterns_and_masks(to_float(train_set.images[:DENSITY_SAMPLES]))
        info = {**{key: n for key, _, n in plan}, "batch_size": bs, "mask_density": float(masks.mean())}
        log(f"{self.name}: trained masks cover {info['mask_density']:.3f} of the image on average "
            f"(target {self.mask_density:g})")
        return model.eval(), {**info, **components.info()}
