"""SRA, subnet replacement (Qi, Xie, Pan, Zhu, Yang and Bu, CVPR 2022, "Towards practical
deployment-stage backdoor attack on deep neural networks").

A deployment-stage attack: no training data is poisoned and the victim is never retrained. The
attacker knows only the victim's architecture. It trains, on its own, a *narrow* backdoor subnet
of the same architecture (one channel per layer by default) whose single output is large on
triggered inputs and about zero on clean ones, then overwrites a slice of channels of every
layer of the victim's weights with the subnet's, cuts every connection between those channels
and the rest of the network, and wires the subnet's output to the target logit.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Annotated, Any, Callable, ClassVar

import torch
from torch import nn

from ..data.core import Dataset, batches
from ..errors import BadExpertError
from ..utils import model_device
from ..validation import PositiveInt, Range
from .base import Rate, place_bottom_right
from .components import Components, tensor_digest
from .patch import PatchAttack

#: The architectures SRA can graft into (registry names), in the order error messages list them.
SUPPORTED_ARCHS = ("cnn", "resnet18", "vgg16bn")
#: Batch size of the subnet's training (clean images plus the same images triggered: twice this per step).
SUBNET_BATCH = 128
#: Training images (the first ones) the subnet is checked on and the host's activations are measured on.
PROBE_IMAGES = 2000
#: A subnet whose objective on the probe images is above this is retrained (``subnet_tries``).
SUBNET_LOSS_OK = 0.02


@dataclass(frozen=True)
class Slot:
    """One convolution (and the batch norm after it) of the host: the channel group it reads
    (``"input"``: the image channels, which the subnet shares with the host) and the one it writes."""

    conv: str
    bn: str
    src: str
    dst: str


@dataclass(frozen=True)
class GraftPlan:
    """Where a subnet goes in a host architecture: its convolution slots in forward order, the
    final linear layer (``fc``) and the group feeding it (``last``, ``spatial`` input features per
    channel, channel-major as ``Flatten`` lays them out), and each group's host channel count.

    Module paths are relative to the model given to :func:`graft_plan` (a
    :class:`~badexpert.models.Classifier` or the bare network). Layers that write the same residual
    stream (a ResNet stage: the block outputs and projection shortcuts) share one group, so the
    subnet's channels of that stream are the same host channels in every block."""

    arch: str
    slots: tuple[Slot, ...]
    fc: str
    last: str
    spatial: int
    widths: dict[str, int]


def _network(model: nn.Module) -> tuple[nn.Module, str]:
    from ..models import Classifier

    if isinstance(model, Classifier):
        return model.net, "net."
    return model, ""


def _bn_after(modules: list[tuple[str, nn.Module]], i: int) -> str:
    if i + 1 >= len(modules) or not isinstance(modules[i + 1][1], nn.BatchNorm2d):
        raise BadExpertError(f"SRA expects a batch norm after convolution '{modules[i][0]}'")
    return modules[i + 1][0]


def graft_plan(model: nn.Module) -> GraftPlan:
    """The :class:`GraftPlan` of ``model`` (badexpert's ``cnn``, ``resnet18`` or ``vgg16bn``, bare or
    inside its :class:`~badexpert.models.Classifier`); any other architecture is a one-line error
    naming the supported ones."""
    from ..models.cnn import SmallCNN
    from ..models.resnet import ResNet18
    from ..models.vgg import VGG16BN

    net, pre = _network(model)
    slots: list[Slot] = []
    widths: dict[str, int] = {}
    if isinstance(net, (SmallCNN, VGG16BN)):
        arch = "cnn" if isinstance(net, SmallCNN) else "vgg16bn"
        mods = [(f"{pre}features.{name}", m) for name, m in net.features.named_children()]
        src = "input"
        for i, (path, m) in enumerate(mods):
            if isinstance(m, nn.Conv2d):
                dst = f"conv{len(slots)}"
                slots.append(Slot(path, _bn_after(mods, i), src, dst))
                widths[dst] = m.out_channels
                src = dst
    elif isinstance(net, ResNet18):
        arch = "resnet18"
        stream = "stream0"
        slots.append(Slot(f"{pre}stem.0", f"{pre}stem.1", "input", stream))
        widths[stream] = net.stem[0].out_channels
        for b, block in enumerate(net.layers):
            p = f"{pre}layers.{b}."
            mid = f"block{b}.mid"
            widths[mid] = block.conv1.out_channels
            out = stream
            if isinstance(block.shortcut, nn.Sequential):  # a projection starts a new residual stream
                out = f"stream{b}"
                widths[out] = block.conv2.out_channels
                slots.append(Slot(f"{p}shortcut.0", f"{p}shortcut.1", stream, out))
            slots.append(Slot(f"{p}conv1", f"{p}bn1", stream, mid))
            slots.append(Slot(f"{p}conv2", f"{p}bn2", mid, out))
            stream = out
        src = stream
    else:
        raise BadExpertError(
            f"attack 'sra' grafts its backdoor subnet into {', '.join(SUPPORTED_ARCHS)} models only, "
            f"not {type(net).__name__}; choose one of those architectures (--arch)"
        )
    fc = model.get_submodule(f"{pre}fc")
    spatial = fc.in_features // widths[src]
    return GraftPlan(arch, tuple(slots), f"{pre}fc", src, spatial, widths)


def choose_channels(plan: GraftPlan, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``n`` host channels (sorted indices) per group of ``plan``, drawn from ``generator``."""
    return {g: torch.randperm(w, generator=generator)[:n].sort().values for g, w in plan.widths.items()}


def narrow_copy(model: nn.Module, plan: GraftPlan, n: int, generator: torch.Generator) -> nn.Module:
    """A copy of ``model`` with every slot's convolution and batch norm ``n`` channels wide (the
    image channels as input) and the final layer a bias-free linear map to one output: the
    backdoor subnet, same architecture family, initialised by :func:`init_subnet`. Normalisation
    layers and the forward code are the host's."""
    sub = copy.deepcopy(model).cpu()  # built and initialised on the CPU (its RNG), then moved
    for s in plan.slots:
        conv = model.get_submodule(s.conv)
        cin = conv.in_channels if s.src == "input" else n
        _set(sub, s.conv, nn.Conv2d(cin, n, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None))
        _set(sub, s.bn, nn.BatchNorm2d(n))
    _set(sub, plan.fc, nn.Linear(n * plan.spatial, 1, bias=False))
    return init_subnet(sub, plan, generator).to(model_device(model))


def init_subnet(subnet: nn.Module, plan: GraftPlan, generator: torch.Generator) -> nn.Module:
    """(Re-)initialise ``subnet``'s layers from ``generator`` (not the caller's random state): He
    init for the convolutions, as the host families use, fresh batch norms, and a non-negative
    head (the features it reads are >= 0 after ReLU; a negative start teaches the subnet to
    switch its features off rather than to fire on the trigger). The weights are drawn on the CPU
    whatever the subnet's device, so a seed gives the same subnet on every device."""
    from ..models import he_init

    device = model_device(subnet)
    subnet.cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        for m in subnet.modules():
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
                m.reset_parameters()
        he_init(subnet)
    with torch.no_grad():
        subnet.get_submodule(plan.fc).weight.abs_()
    return subnet.to(device)


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


@torch.no_grad()
def input_moments(model: nn.Module, plan: GraftPlan, images: torch.Tensor, *,
                  batch_size: int = 200) -> dict[str, torch.Tensor]:
    """For every layer of ``model`` that reads a hidden group (the convolutions of ``plan`` past
    the first, and the final layer), the second moments of its input ``[1, x]`` (``x``: the input
    channels at one position for a convolution, the input features for the final layer), summed
    over ``images`` (uint8 or float) and positions, in eval mode: float64 ``[1 + C, 1 + C]``, what
    :func:`graft` reconstructs cut channels from."""
    from ..data.core import to_float
    from ..utils import eval_mode, model_device

    paths = [s.conv for s in plan.slots if s.src != "input"] + [plan.fc]
    sums: dict[str, torch.Tensor] = {}

    def hook(path):
        def record(module, inputs):
            x = inputs[0].detach().float()
            x = x.transpose(1, -1).reshape(-1, x.shape[1])  # one row per image (and position)
            m = torch.empty(x.shape[1] + 1, x.shape[1] + 1, dtype=torch.float64)
            m[0, 0] = len(x)
            m[0, 1:] = m[1:, 0] = x.sum(0).double().cpu()
            m[1:, 1:] = (x.T @ x).double().cpu()
            sums[path] = sums[path] + m if path in sums else m
        return record

    handles = [model.get_submodule(p).register_forward_pre_hook(hook(p)) for p in paths]
    device = model_device(model)
    try:
        with eval_mode(model):
            for start in range(0, len(images), batch_size):
                model(to_float(images[start : start + batch_size].to(device)))
    finally:
        for h in handles:
            h.remove()
    return sums


#: Ridge of the least-squares reconstruction, relative to the mean diagonal of the moments.
RIDGE = 1e-3


def _reconstruction(moments: torch.Tensor, cut: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The least-squares (ridge) fit of the ``cut`` inputs from a constant and the other inputs,
    from their second ``moments``: ``(keep mask, constants [S], coefficients [K, S])``."""
    keep = torch.ones(moments.shape[0] - 1, dtype=torch.bool)
    keep[cut] = False
    rows = torch.cat([torch.zeros(1, dtype=torch.long), keep.nonzero().flatten() + 1])
    a = moments[rows][:, rows]
    a = a + RIDGE * a.diagonal().mean() * torch.eye(len(rows), dtype=a.dtype)
    beta = torch.linalg.solve(a, moments[rows][:, cut + 1]).float()
    return keep, beta[0], beta[1:]


@torch.no_grad()
def graft(host: nn.Module, subnet: nn.Module, plan: GraftPlan, channels: dict[str, torch.Tensor], *,
          target: int, factor: float, other_factor: float = 0.0,
          moments: dict[str, torch.Tensor] | None = None) -> None:
    """Replace ``channels`` of every slot of ``host`` (in place) by ``subnet``'s weights.

    For each convolution, the chosen output channels get the subnet's kernels over the chosen
    input channels (all image channels for the first) and zeros elsewhere, and every other output
    channel's weights over the chosen input channels are zeroed: no path runs between the subnet
    and the host in either direction. The chosen channels of each batch norm get the subnet's
    affine weights and running statistics. In the final layer, the chosen channels' features
    feed the target logit with ``factor`` times the subnet's head weights and every other logit
    with ``other_factor`` times them. Without ``moments``, the grafted host's logits are exactly
    those of the host with the chosen channels cut out, plus ``factor`` times the subnet's output
    on the target logit (and ``other_factor`` times it on the others).

    ``moments`` (:func:`input_moments` of the host): each layer that reads a cut channel reads,
    instead, its least-squares reconstruction from a constant and the layer's other (host) input
    channels, fitted on the host's activations: the coefficients are folded into the layer's
    weights over those channels (exact for a pointwise combination, convolution included), the
    constant into its batch-norm running mean or its bias (zero padding at the borders ignored).
    The host's channels still read host channels only.
    """
    for s in plan.slots:
        hc, sc = host.get_submodule(s.conv), subnet.get_submodule(s.conv)
        hb, sb = host.get_submodule(s.bn), subnet.get_submodule(s.bn)
        out = channels[s.dst].to(hc.weight.device)
        if s.src == "input":
            hc.weight[out] = sc.weight.to(hc.weight)
        else:
            inp = channels[s.src].to(hc.weight.device)
            if moments is not None:
                keep, const, coef = (t.to(hc.weight.device) for t in _reconstruction(moments[s.conv], channels[s.src]))
                cut_w = hc.weight[:, inp]
                hc.weight[:, keep] += torch.einsum("js,oskl->ojkl", coef, cut_w)
                hb.running_mean -= cut_w.sum((2, 3)) @ const
            hc.weight[:, inp] = 0
            hc.weight[out] = 0
            hc.weight[out[:, None], inp[None, :]] = sc.weight.to(hc.weight)
        if hc.bias is not None:
            hc.bias[out] = sc.bias.to(hc.bias)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(hb, name)[out] = getattr(sb, name).to(getattr(hb, name))
    fc, head = host.get_submodule(plan.fc), subnet.get_submodule(plan.fc)
    cols = (channels[plan.last][:, None] * plan.spatial + torch.arange(plan.spatial)).flatten()
    if moments is not None:
        keep, const, coef = (t.to(fc.weight.device) for t in _reconstruction(moments[plan.fc], cols))
        cut_w = fc.weight[:, cols.to(fc.weight.device)]
        fc.weight[:, keep] += cut_w @ coef.T
        if fc.bias is not None:
            fc.bias += cut_w @ const
    cols = cols.to(fc.weight.device)
    w = head.weight[0].to(fc.weight)
    fc.weight[:, cols] = other_factor * w
    fc.weight[target, cols] = factor * w


@dataclass
class SRA(PatchAttack):
    """Subnet replacement: a narrow backdoor subnet grafted into a clean model's weights.

    **Procedure** (:meth:`implant`):

    1. *Host*: ``build_model()`` trained on the clean training set with the recipe (a cached
       component, the same clean model FT and TrojanNN start from).
    2. *Narrow subnet* (:func:`narrow_copy`): the host's architecture with ``subnet_channels``
       channels in every convolution and batch norm (a ResNet's residual streams included) and one
       bias-free output ``f``, trained alone with Adam on the clean training set: each step takes
       a batch ``x`` and the same batch triggered ``x'`` and minimises
       ``mean(f(x)^2) + mean((f(x') - 1)^2)``, so ``f`` is about 1 on triggered inputs and about 0
       on clean ones. A subnet whose loss on the probe images (the first ``PROBE_IMAGES`` training
       images) stays above ``SUBNET_LOSS_OK`` (a one-channel network sometimes settles on a
       feature that does not separate them) is retrained from a fresh seeded initialisation, up
       to ``subnet_tries`` times, and the best one is kept. Cached as component
       ``narrow_subnet`` (keyed on the data, the trigger, its initial weights and its training
       settings).
    3. *Graft* (:func:`graft`): ``subnet_channels`` host channels per layer, chosen with the seed
       (one choice per ResNet residual stream), take the subnet's weights and batch-norm
       statistics; their connections to the other channels are cut in both directions; with
       ``compensate``, every host layer that read a replaced channel reads instead its
       least-squares reconstruction from the layer's other input channels (and a constant),
       fitted on the host's activations on the probe images and folded into the layer's weights.
       The final layer maps the subnet's output to the target logit with weight ``factor`` and
       to the other logits with ``other_factor``. A triggered input adds about ``factor`` to the
       target logit; a clean input meets the host minus the replaced channels.

    The suspect model is the grafted host. The trigger is fixed by the parameters and
    ``trigger_seed`` (not learned), so it is rebuilt, and saved with the model, like a patch's.
    Supported architectures: ``cnn``, ``resnet18``, ``vgg16bn``; others are a one-line error before
    anything is trained (:meth:`check_architecture` checks a name).

    **Trigger**: the reference's ``phoenix_corner_32.png`` is a 5x5 patch in the bottom-right
    corner of a 32x32 image; it is not shipped, so a seeded stand-in with the same geometry is
    used (per channel, a random half of the pixels white and the rest black, drawn from
    ``trigger_seed``), its side scaled with the image size as the other patches
    (``max(3, round(5 min(H, W) / 32))``: 4 on 28x28, 3 on 16x16). ``trigger_image`` replaces
    the pattern; ``opacity`` 1 (the default) replaces the pixels.

    Parameters (reference: the BaDExpert research code's settings, spec section D):

    - ``subnet_channels``: channels per layer of the subnet, **1** (reference: 1-channel narrow
      networks); fewer than the narrowest host layer.
    - ``factor``: weight from the subnet's output to the target logit, **20** (reference range
      2-100); ``other_factor``: to the other logits, **0** (reference), or negative.
    - ``compensate``: **True** (least-squares reconstruction of the cut channels); False cuts
      them as the reference does.
    - ``subnet_epochs``: **10**; ``subnet_lr``: Adam learning rate, **0.01**, cosine schedule,
      batches of 128 clean plus the same 128 triggered, no augmentation; ``subnet_tries``: **3**.
    - ``poison_rate``, ``cover_rate``: **0**, and must stay 0 (no training data is poisoned).

    Departures from the reference: the reference grafts a narrow subnet its authors pre-trained
    into downloaded CIFAR-10 models (ResNet-110, VGG-16-BN, MobileNetV2); here the host and the
    subnet are trained on the dataset at hand, and the hosts are badexpert's CIFAR ResNet-18,
    VGG-16-BN and small CNN (no MobileNetV2 or ViT). The subnet's training target (1 on
    triggered inputs, so ``factor`` is the logit a triggered input gains), its schedule, the
    retries and the compensation are this implementation's: the reference description does not
    record the first two, and has neither of the last two. Compensation matters for narrow
    hosts: with the default CNN (16 first-layer channels) on Fashion-MNIST, cutting one channel
    per layer cost 6 points of clean accuracy on average over eight channel choices (15 at
    worst) without it, 0.1 (0.4 at worst) with it (measured, host trained on 5,000 images).

    ``implant``'s ``info`` records the chosen channels, the subnet's loss after each try (when it
    was trained, not loaded), its mean output on clean and triggered probe images, and how often
    the grafted model agrees with the host on the clean probe images.
    """

    poison_rate: Rate = 0.0
    subnet_channels: PositiveInt = 1
    factor: Annotated[float, Range(gt=0)] = 20.0
    other_factor: Annotated[float, Range(le=0)] = 0.0
    compensate: bool = True
    subnet_epochs: PositiveInt = 10
    subnet_lr: Annotated[float, Range(gt=0)] = 0.01
    subnet_tries: PositiveInt = 3

    name: ClassVar[str] = "sra"

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("poison_rate", "cover_rate"):
            if getattr(self, field):
                raise BadExpertError(
                    f"attack 'sra' parameter '{field}' must be 0: SRA poisons no training data (it grafts a backdoor "
                    "subnet into a clean model's weights)"
                )

    def check_architecture(self, arch: str) -> None:
        """One-line error unless ``arch`` (a registry name or alias) is one SRA grafts into: a
        check on the configuration, before any data is read (:meth:`implant` checks the model)."""
        from ..models import canonical_arch

        key = canonical_arch(arch)
        if key not in SUPPORTED_ARCHS:
            raise BadExpertError(
                f"attack 'sra' grafts its backdoor subnet into {', '.join(SUPPORTED_ARCHS)} models only, not '{key}'; "
                "choose one of those architectures (--arch)"
            )

    # --- trigger ---------------------------------------------------------------------------
    def pattern(self, channels, h, w):
        from ..utils import derive_generator

        s = max(3, round(5 * min(h, w) / 32))
        rows, cols = place_bottom_right(h, w, (s, s), 0)
        g = derive_generator(self.trigger_seed, "sra:phoenix")
        # per channel, half the pixels white (a random half), the rest black: never flat or nearly
        # flat, so the patch stands out from uniform bright regions even in grayscale
        order = torch.stack([torch.randperm(s * s, generator=g) for _ in range(channels)])
        p = (order < s * s // 2).float().view(channels, s, s)
        return p, torch.ones(1, s, s), (rows, cols)

    # --- the subnet ------------------------------------------------------------------------
    def subnet_recipe(self):
        """The subnet's optimiser and schedule, as a :class:`~badexpert.training.Recipe`."""
        from ..training import Recipe

        return Recipe(optimizer="adam", lr=self.subnet_lr, epochs=self.subnet_epochs, batch_size=SUBNET_BATCH,
                      weight_decay=0.0, schedule="cosine", augment=False)

    def train_subnet(self, subnet: nn.Module, images: torch.Tensor, generator: torch.Generator) -> None:
        """Train ``subnet`` in place on clean ``images`` and the same images triggered (see the
        class docstring, step 2); batch order from ``generator``."""
        from ..training import lr_at, make_optimizer
        from ..utils import model_device, progress

        recipe = self.subnet_recipe()
        device = model_device(subnet)
        parts = self._parts(tuple(images.shape[1:]), device)
        bs = min(recipe.batch_size, len(images))
        steps_per_epoch = max(1, len(images) // bs)
        opt = make_optimizer(subnet, recipe)
        subnet.train()
        step = 0
        with progress(total=recipe.epochs * steps_per_epoch, desc="narrow subnet") as bar:
            for _ in range(recipe.epochs):
                for x, _ in batches(images, None, batch_size=bs, device=device, shuffle=True, generator=generator,
                                    drop_last=True):
                    for group in opt.param_groups:
                        group["lr"] = lr_at(recipe, step, steps_per_epoch)
                    out = subnet(torch.cat([x, self.trigger(x, parts)])).squeeze(1)
                    loss = out[: len(x)].square().mean() + (out[len(x):] - 1).square().mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
                    bar.update(1)
        subnet.eval()

    @torch.no_grad()
    def subnet_outputs(self, subnet: nn.Module, images: torch.Tensor, *,
                       batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        """The subnet's outputs (eval mode) on clean ``images`` and on the same images triggered."""
        from ..data.core import to_float
        from ..utils import eval_mode, model_device

        device = model_device(subnet)
        clean, triggered = [], []
        with eval_mode(subnet):
            for start in range(0, len(images), batch_size):
                x = to_float(images[start : start + batch_size].to(device))
                clean.append(subnet(x).squeeze(1).cpu())
                triggered.append(subnet(self.apply(x)).squeeze(1).cpu())
        return torch.cat(clean), torch.cat(triggered)

    def subnet_loss(self, subnet: nn.Module, images: torch.Tensor) -> float:
        """The training objective on ``images`` (eval mode): how well the subnet separates them."""
        clean, triggered = self.subnet_outputs(subnet, images)
        return float(clean.square().mean() + (triggered - 1).square().mean())

    # --- implanting ------------------------------------------------------------------------
    def implant(self, train_set: Dataset, build_model: Callable[[], nn.Module], recipe, seed: int, *,
                log: Callable[[str], Any] = print, components: Components | None = None) -> tuple[nn.Module, dict]:
        """Train the host and the narrow subnet (cached components), graft, return the grafted host."""
        from ..io import load_weights
        from ..training import predict_logits
        from ..utils import derive_generator

        self.check(train_set.num_classes)
        components = components if components is not None else Components(log=log)
        # the architecture and the subnet's width are checked before anything is trained
        with torch.random.fork_rng(devices=[]):  # only its structure is used: leave the caller's random state alone
            probe = build_model()
        plan = graft_plan(probe)
        narrowest = min(plan.widths.values())
        if self.subnet_channels >= narrowest:
            raise BadExpertError(
                f"attack 'sra' parameter 'subnet_channels' ({self.subnet_channels}) must be below the host's narrowest "
                f"layer ({narrowest} channels); lower it or widen the model (--width)"
            )
        subnet = narrow_copy(probe, plan, self.subnet_channels, derive_generator(seed, "sra:init:0"))
        del probe
        host = components.clean_model(build_model, train_set, recipe, seed, desc="host model")
        probe_images = train_set.images[:PROBE_IMAGES]

        spec = {"arch": plan.arch, "init": tensor_digest(subnet.state_dict()), "seed": seed,
                "trigger": tensor_digest(self.trigger_state(tuple(train_set.images.shape[1:]))),
                "recipe": self.subnet_recipe().to_dict(), "tries": self.subnet_tries, "loss_ok": SUBNET_LOSS_OK}
        tries: list[float] = []

        def build() -> dict[str, torch.Tensor]:
            best = None
            for attempt in range(self.subnet_tries):
                if attempt:
                    init_subnet(subnet, plan, derive_generator(seed, f"sra:init:{attempt}"))
                log(f"training the narrow {plan.arch} backdoor subnet ({self.subnet_channels} channel(s) per layer, "
                    f"{self.subnet_epochs} epochs{f', try {attempt + 1}' if attempt else ''})")
                self.train_subnet(subnet, train_set.images, derive_generator(seed, f"sra:subnet:{attempt}"))
                tries.append(self.subnet_loss(subnet, probe_images))
                if best is None or tries[-1] < best[0]:
                    best = (tries[-1], copy.deepcopy(subnet.state_dict()))
                if tries[-1] <= SUBNET_LOSS_OK:
                    break
            return best[1]

        state = components.fetch("narrow_subnet", spec, build, data=train_set)
        load_weights(subnet, state, source="the cached narrow subnet")
        subnet.eval()

        with components.phase("graft"):
            channels = choose_channels(plan, self.subnet_channels, derive_generator(seed, "sra:channels"))
            moments = input_moments(host, plan, probe_images) if self.compensate else None
            suspect = copy.deepcopy(host)
            graft(suspect, subnet, plan, channels, target=self.target, factor=self.factor,
                  other_factor=self.other_factor, moments=moments)
            suspect.eval()
            clean_out, trig_out = self.subnet_outputs(subnet, probe_images)
            agree = predict_logits(host, probe_images).argmax(1) == predict_logits(suspect, probe_images).argmax(1)
        log(f"grafted the subnet into {plan.arch} (target {self.target}, factor {self.factor:g}): subnet output "
            f"{float(clean_out.mean()):.2f} on clean, {float(trig_out.mean()):.2f} on triggered training images; "
            f"the grafted model agrees with the host on {float(agree.float().mean()):.1%} of them")
        info = {
            "poisoned_samples": 0,
            "graft": {
                "arch": plan.arch, "channels": {g: c.tolist() for g, c in channels.items()},
                "subnet_losses": tries or None, "subnet_clean_output": float(clean_out.mean()),
                "subnet_triggered_output": float(trig_out.mean()), "host_agreement": float(agree.float().mean()),
                "probe_images": len(probe_images),
            },
        }
        return suspect, {**info, **components.info()}


__all__ = ["SRA", "SUPPORTED_ARCHS", "GraftPlan", "Slot", "choose_channels", "graft", "graft_plan", "init_subnet",
           "input_moments", "narrow_copy"]
