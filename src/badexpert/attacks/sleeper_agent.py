"""Sleeper Agent (Souri, Fowl, Chellappa, Goldblum and Goldstein, NeurIPS 2022, "Sleeper Agent:
Scalable hidden trigger backdoors for neural networks trained from scratch").

A hidden-trigger, clean-label backdoor: the poisoned training images are images of the target
class with their own (correct) labels and a small, bounded perturbation; none of them carries the
trigger. The perturbations are crafted by *gradient matching*, so that training on the poisons
pushes the weights the way training on "source-class images + trigger -> target" would. At test
time the trigger (a random binary patch) sends source-class inputs to the target class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..data.core import Dataset, augment, to_float
from ..errors import BadExpertError
from ..utils import derive_generator, eval_mode, model_device, progress, seeded_rng
from ..validation import OneOf, PositiveInt, Range
from .base import Attack, ClassIndex, Rate
from .components import Components, tensor_digest

#: The two crafting budgets: ``gpu`` is the reference's (250 Adam steps, the surrogate retrained
#: from scratch every 50), ``cpu`` a short one that fits a 2-core machine (see the class docstring).
BUDGETS = {"cpu": {"craft_steps": 40, "retrain_every": 20}, "gpu": {"craft_steps": 250, "retrain_every": 50}}
#: The reference retrains for 40 epochs after a 100-epoch pretraining: the retraining schedule is
#: this fraction of the surrogate recipe's epochs (at least one) unless ``retrain_epochs`` is given.
RETRAIN_FRACTION = 0.4
#: Images per forward/backward pass when computing the source gradient.
EVAL_BATCH = 256
#: Per-sample gradient values held at once when scoring candidates (a chunk of images times the
#: parameter count; 2**26 floats = 256 MiB).
PER_SAMPLE_VALUES = 2**26


@dataclass
class SleeperAgent(Attack):
    """Hidden-trigger clean-label backdoor crafted by gradient matching on a surrogate model.

    **Trigger** (the attack's saved state, ``"patch"``): a ``patch_size`` x ``patch_size`` binary
    patch, every pixel of every channel 0 or 1 with probability 1/2, drawn from ``trigger_seed``.
    At test time it replaces the pixels at a uniformly random position of each input (fully
    inside the image), drawn from the generator the caller passes to :meth:`Attack.apply` (the
    evaluation's seeded one), so a triggered test set is reproducible; without a generator, from a
    fixed one seeded by ``trigger_seed``. The patch itself always comes from the state, so the
    patch the poisons were crafted for is the one tested (the research code draws an unseeded
    new patch for testing; that bug is not reproduced).

    **Poisons.** ``P = round(poison_rate * N)`` training images of the target class (capped at
    the class size), with their labels kept, each ``x_p`` replaced by ``x_p + delta_p`` with
    ``||delta_p||_inf <= eps`` and ``x_p + delta_p`` in [0, 1]. Which images: with
    ``selection="gradient_norm"`` (reference) the ``P`` target-class images whose training loss
    has the largest parameter-gradient norm on the clean surrogate; ``"random"``: a seeded draw.
    The perturbations minimise, for the surrogate ``f_theta`` (eval mode), the gradient
    alignment loss::

        g_adv    = grad_theta  mean_s CE(f(place(x_s, patch)), target)        (source images)
        g_poison = grad_theta  mean_p CE(f(aug(x_p + delta_p)), y_p)          (a batch of poisons)
        A        = 1 - <g_poison, g_adv> / (||g_poison|| ||g_adv||)

    with Adam on the deltas (one step per iteration over all poison batches of ``craft_batch``),
    projecting on the eps ball and [0, 1] after every step. The source images are the training
    images of the source classes (``n_sources`` of them drawn with the seed, or all), each with
    the patch at a random position. ``aug`` is the recipe's own random crop and flip
    (differentiable), when the recipe augments. Every ``retrain_every`` iterations the surrogate
    is retrained from scratch on the current poisoned training set (perturbations rounded to the
    uint8 the victim sees) and ``g_adv`` recomputed on it. The final perturbations are rounded
    to whole 1/255 steps, never beyond ``eps``.

    **Implanting** (:meth:`implant`): the surrogate is the clean model of the suspect recipe
    (``components.clean_model``, shared with the other attacks that train one), or of
    ``surrogate_epochs`` epochs of it; the crafted poisons are one component
    (``components.fetch("sleeper_agent_poisons", ...)``, keyed on the surrogate's weights, the
    data, the recipe, the seed and every parameter), so a grid crafts them once; then the suspect
    model trains on the poisoned set with the recipe. :meth:`poison` applies crafted
    perturbations (:meth:`craft`'s output) to a dataset.

    **Success rate**: counted on source-class test inputs only (``source_classes``).

    Parameters (reference: the BaDExpert research code's settings, which follow the paper):

    - ``target``: **0**; ``source_classes``: **(1,)** (reference); at least one, not the target.
    - ``poison_rate``: **0.01**, the paper's 1% budget (the research code's README gives none),
      a fraction of the whole training set, all of it from the target class.
    - ``eps``: **16/255** (reference), l_inf, in [0, 1] pixel units.
    - ``patch_size``: **8** (reference, on 32x32 images); any size that fits the images.
    - ``budget``: ``"cpu"`` (**default**) or ``"gpu"``, the defaults of the next two:
      ``gpu`` = the reference's 250 iterations, retraining every 50; ``cpu`` = 40 iterations,
      retraining once, after 20. Measured on the whole Fashion-MNIST training set (60,000
      images, CNN width 16, the default 4-epoch recipe, one thread of a shared 2-core machine):
      crafting 199 s, of which 106 s for the one 2-epoch retraining, beside 211 s for the clean
      surrogate (shared with other attacks) and 210 s for the suspect model. On a 12,000-image
      subset the ``gpu`` budget took 149 s of crafting against 40 s for ``cpu``.
    - ``craft_steps``, ``retrain_every``: ``None`` = the budget's; explicit values override it
      (``retrain_every >= craft_steps``: never retrain).
    - ``retrain_epochs``: ``None`` = 40% of the surrogate's epochs, at least 1 (the reference
      retrains 40 epochs, milestones 14/24/35, after 100 epochs of pretraining: here the
      recipe's schedule with its step milestones scaled by the same ratio).
    - ``surrogate_epochs``: ``None`` = the suspect recipe's epochs (the reference pretrains 100,
      its training length).
    - ``lr``: Adam's step, ``None`` = ``0.1 * eps * craft_batch / 128`` in pixel units, which is
      the reference's ``0.025 * batch / 128`` in its normalised input space (CIFAR-10's
      standard deviation ~0.25: 0.025 x 0.25 = 0.1 x 16/255).
    - ``craft_batch``: poisons per gradient-matching pass, **128**.
    - ``n_sources``: ``None`` = every training image of the source classes (this
      implementation's choice; the reference count was not verified).
    - ``selection``: ``"gradient_norm"`` (**reference**) or ``"random"``.

    Departures: the test-time patch is the crafted one (see above) and lands at a random
    position, as in the paper (the research code's settings place it at the bottom-right); the
    success rate counts the source classes only (BaDExpert's evaluation counts every non-target
    class); the gradients are taken in eval mode (batch-norm running statistics); the source
    images are not augmented; no ensemble of surrogates; the retraining schedule is the
    recipe's, shortened.

    **Strength.** Sleeper Agent is weak at small budgets. On Fashion-MNIST (source trousers,
    target T-shirts, 1% poisons, eps 16/255, default recipe) the ``cpu`` budget gave ASR 1.4%
    against 1.3% for the clean model (60,000 images), 2.3% against 1.9% on 12,000 images
    (``gpu`` budget: 2.4%), and no gain with a 12-epoch recipe. The paper's figures are for
    CIFAR-10 and ImageNet networks trained to full length (on CIFAR-10, ResNet-18, 1% and eps
    16/255: roughly 80% ASR; the exact table value was not re-checked for this implementation).
    """

    target: ClassIndex = 0
    poison_rate: Rate = 0.01
    source_classes: tuple[ClassIndex, ...] = (1,)
    eps: Annotated[float, Range(gt=0, le=1)] = 16 / 255
    patch_size: PositiveInt = 8
    budget: Annotated[str, OneOf("cpu", "gpu")] = "cpu"
    craft_steps: PositiveInt | None = None
    retrain_every: PositiveInt | None = None
    retrain_epochs: PositiveInt | None = None
    surrogate_epochs: PositiveInt | None = None
    lr: Annotated[float, Range(gt=0)] | None = None
    craft_batch: PositiveInt = 128
    n_sources: PositiveInt | None = None
    selection: Annotated[str, OneOf("gradient_norm", "random")] = "gradient_norm"

    name: ClassVar[str] = "sleeper_agent"
    clean_label: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_source_classes()
        if self.cover_rate > 0:
            raise BadExpertError(
                f"attack '{self.name}' parameter 'cover_rate' must be 0: its poisons carry no trigger, so it has no "
                "cover samples"
            )

    # --- budget ------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Gradient-matching iterations actually run."""
        return self.craft_steps if self.craft_steps is not None else BUDGETS[self.budget]["craft_steps"]

    @property
    def retrain_interval(self) -> int:
        """Iterations between two retrainings of the surrogate."""
        return self.retrain_every if self.retrain_every is not None else BUDGETS[self.budget]["retrain_every"]

    @property
    def step_size(self) -> float:
        """Adam's learning rate on the perturbations (pixel units)."""
        return self.lr if self.lr is not None else 0.1 * self.eps * self.craft_batch / 128

    def retrain_recipe(self, recipe) -> Any:
        """The surrogate's retraining recipe: ``retrain_epochs`` (default 40% of ``recipe``'s
        epochs, at least 1) of ``recipe``; its step milestones, warm-up and step cap scaled by the
        same ratio."""
        epochs = self.retrain_epochs or max(1, round(RETRAIN_FRACTION * recipe.epochs))
        ratio = epochs / recipe.epochs
        return recipe.replace(epochs=epochs, milestones=tuple(round(m * ratio) for m in recipe.milestones),
                              warmup_epochs=recipe.warmup_epochs * ratio,
                              max_steps=None if recipe.max_steps is None else max(1, round(recipe.max_steps * ratio)))

    # --- trigger -----------------------------------------------------------------------------
    def build_trigger(self, shape):
        c, h, w = shape
        s = self.patch_size
        if s > h or s > w:
            raise BadExpertError(
                f"a {s}x{s} Sleeper Agent patch does not fit in a {h}x{w} image; lower the attack parameter patch_size"
            )
        g = derive_generator(self.trigger_seed, "sleeper_agent:patch")
        return {"patch": torch.bernoulli(torch.full((c, s, s), 0.5), generator=g)}

    def place(self, x: torch.Tensor, patch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``x`` with ``patch`` pasted at a uniformly random position per input (drawn from
        ``generator``: rows then columns), fully inside the image."""
        n, c, h, w = x.shape
        if patch.dim() != 3 or patch.shape[0] != c or patch.shape[1] > h or patch.shape[2] > w:
            raise ValueError(f"a patch of shape {tuple(patch.shape)} does not fit {c}x{h}x{w} images")
        ph, pw = patch.shape[1:]
        rows = torch.randint(0, h - ph + 1, (n,), generator=generator).to(x.device)
        cols = torch.randint(0, w - pw + 1, (n,), generator=generator).to(x.device)
        dr = torch.arange(h, device=x.device)[None, :] - rows[:, None]  # [n, h]: row inside the patch
        dc = torch.arange(w, device=x.device)[None, :] - cols[:, None]  # [n, w]
        inside = ((dr >= 0) & (dr < ph))[:, :, None] & ((dc >= 0) & (dc < pw))[:, None, :]  # [n, h, w]
        p = patch.to(x.device, x.dtype)
        stamped = p[:, dr.clamp(0, ph - 1)[:, :, None], dc.clamp(0, pw - 1)[:, None, :]].transpose(0, 1)  # [n, c, h, w]
        return torch.where(inside[:, None], stamped, x)

    def trigger(self, x, parts):
        return self.place(x, parts["patch"], derive_generator(self.trigger_seed, "sleeper_agent:placement"))

    def trigger_test(self, x, parts, generator):
        if generator is None:
            return self.trigger(x, parts)
        return self.place(x, parts["patch"], generator)

    # --- crafting ----------------------------------------------------------------------------
    def select_poisons(self, dataset: Dataset, surrogate: nn.Module, generator: torch.Generator) -> torch.Tensor:
        """Sorted indices of the ``round(poison_rate * N)`` target-class images to poison (capped
        at the class size): largest per-sample gradient norm on ``surrogate``, or a seeded draw."""
        cand, n_poison = self.poison_count(dataset)
        if self.selection == "random":
            chosen = cand[torch.randperm(len(cand), generator=generator)[:n_poison]]
        else:
            norms = gradient_norms(surrogate, dataset.images[cand], dataset.labels[cand])
            chosen = cand[torch.sort(norms, descending=True, stable=True).indices[:n_poison]]
        return chosen.sort().values

    def source_indices(self, dataset: Dataset, generator: torch.Generator) -> torch.Tensor:
        """Sorted indices of the source images: the training images of the source classes
        (``n_sources`` of them drawn from ``generator``, or all)."""
        src = torch.isin(dataset.labels, torch.tensor(self.source_classes, dtype=dataset.labels.dtype))
        src = src.nonzero().flatten()
        if len(src) == 0:
            raise BadExpertError(
                f"the training set has no image of source class(es) {list(self.source_classes)}; attack "
                f"'{self.name}' needs some to craft its poisons (set source_classes)"
            )
        if self.n_sources is not None and self.n_sources < len(src):
            src = src[torch.randperm(len(src), generator=generator)[: self.n_sources]].sort().values
        return src

    def source_gradient(self, model: nn.Module, sources: torch.Tensor,
                        generator: torch.Generator) -> list[torch.Tensor]:
        """``g_adv``: the gradient of the mean cross-entropy of ``model`` (eval mode) on the
        ``sources`` (uint8 images) with the patch at random positions, labelled ``target``."""
        device = model_device(model)
        params = [p for p in model.parameters() if p.requires_grad]
        total = [torch.zeros_like(p) for p in params]
        patch = self._parts(tuple(sources.shape[1:]), torch.device("cpu"))["patch"]
        with eval_mode(model), torch.enable_grad():
            for chunk in sources.split(EVAL_BATCH):
                x = self.place(to_float(chunk), patch, generator).to(device)
                y = torch.full((len(x),), self.target, dtype=torch.long, device=device)
                grads = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), params)
                for t, g in zip(total, grads):
                    t += g
        return [t / len(sources) for t in total]

    def alignment_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target_grad: list[torch.Tensor],
                       target_norm: torch.Tensor) -> torch.Tensor:
        """``A = 1 - cos(grad_theta CE(model(x), y), target_grad)`` over all trainable parameters,
        differentiable in ``x`` (``model`` in eval mode; the caller sets it)."""
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
        dot = sum((g * t).sum() for g, t in zip(grads, target_grad))
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        return 1 - dot / (norm * target_norm).clamp_min(1e-12)

    def craft(self, train_set: Dataset, surrogate: nn.Module, build_model: Callable[[], nn.Module] | None, recipe,
              seed: int, *, components: Components | None = None,
              log: Callable[[str], Any] = print) -> dict[str, torch.Tensor]:
        """Select the poisons and craft their perturbations against ``surrogate`` (see the class
        docstring), retraining it from scratch with ``build_model()`` and :meth:`retrain_recipe`
        every :attr:`retrain_interval` iterations (``build_model`` may be ``None`` when no
        retraining falls inside :attr:`steps`). All random choices come from ``seed``.

        Returns ``{"indices": int64 [P], "delta": int16 [P, C, H, W]`` (the perturbation in
        1/255 steps), ``"alignment": float32 [steps]`` (the mean alignment loss at each
        iteration, before its step), ``"retrain_accuracy": float32 [retrains]`` (each retrained
        surrogate's accuracy on the poisoned training set)``}``.
        """
        self.check(train_set.num_classes)
        steps, every = self.steps, self.retrain_interval
        retrains = (steps - 1) // every
        if retrains and build_model is None:
            raise BadExpertError(f"attack '{self.name}' retrains its surrogate while crafting: pass build_model")
        components = components if components is not None else Components(log=log)
        g = derive_generator(seed, "sleeper_agent:craft")
        indices = self.select_poisons(train_set, surrogate, g)
        if len(indices) == 0:  # poison_rate 0: nothing to craft
            empty = torch.zeros(0, dtype=torch.float32)
            return {"indices": indices, "delta": self._quantised(train_set.images[indices], []), "alignment": empty,
                    "retrain_accuracy": empty}
        sources = train_set.images[self.source_indices(train_set, derive_generator(seed, "sleeper_agent:sources"))]
        device = model_device(surrogate)
        x0 = to_float(train_set.images[indices]).to(device)
        y = train_set.labels[indices].to(device)
        chunks = [slice(s, s + self.craft_batch) for s in range(0, len(indices), self.craft_batch)]
        deltas = [torch.zeros_like(x0[sl], requires_grad=True) for sl in chunks]
        optimizer = torch.optim.Adam(deltas, lr=self.step_size)
        pad, hflip = recipe.crop_and_flip(train_set.image_size, train_set)
        log(f"sleeper agent: crafting {len(indices)} poisons against {len(sources)} source images "
            f"({steps} iterations, {retrains} retraining(s) of the surrogate)")
        model, trace, accuracies = surrogate, [], []
        target_grad = self.source_gradient(model, sources, g)
        target_norm = torch.sqrt(sum(t.pow(2).sum() for t in target_grad))
        bar = progress(total=steps, desc="sleeper agent crafting")
        try:
            for step in range(steps):
                if step and step % every == 0:
                    model, acc = self._retrain(train_set, indices, deltas, build_model, recipe, seed,
                                               step // every, components)
                    accuracies.append(acc)
                    target_grad = self.source_gradient(model, sources, g)
                    target_norm = torch.sqrt(sum(t.pow(2).sum() for t in target_grad))
                total = 0.0
                with eval_mode(model), torch.enable_grad():
                    for sl, d in zip(chunks, deltas):
                        xb = x0[sl] + d
                        if recipe.augment:
                            xb = augment(xb, pad=pad, hflip=hflip, generator=g)
                        loss = self.alignment_loss(model, xb, y[sl], target_grad, target_norm)
                        (d.grad,) = torch.autograd.grad(loss, d)
                        total += float(loss.detach()) * len(d)
                trace.append(total / len(indices))
                optimizer.step()
                with torch.no_grad():
                    for sl, d in zip(chunks, deltas):
                        d.copy_((x0[sl] + d.clamp(-self.eps, self.eps)).clamp(0, 1) - x0[sl])
                bar.update(1)
        finally:
            bar.close()
        return {"indices": indices, "delta": self._quantised(train_set.images[indices], deltas),
                "alignment": torch.tensor(trace, dtype=torch.float32),
                "retrain_accuracy": torch.tensor(accuracies, dtype=torch.float32)}

    def _quantised(self, images: torch.Tensor, deltas: list[torch.Tensor]) -> torch.Tensor:
        """The perturbations in whole 1/255 steps (int16), within ``eps`` and the uint8 range."""
        if not deltas:
            return torch.zeros(images.shape, dtype=torch.int16)
        limit = math.floor(self.eps * 255 + 1e-6)
        d = torch.cat([t.detach().cpu() for t in deltas]).mul(255).round().clamp(-limit, limit)
        base = images.to(torch.int16)
        return ((base + d.to(torch.int16)).clamp(0, 255) - base).to(torch.int16)

    def _retrain(self, train_set: Dataset, indices: torch.Tensor, deltas: list[torch.Tensor], build_model, recipe,
                 seed: int, round_: int, components: Components) -> tuple[nn.Module, float]:
        """A surrogate trained from scratch (seeded initial weights) on the current poisoned set."""
        from ..training import accuracy, train

        crafted = {"indices": indices, "delta": self._quantised(train_set.images[indices], deltas)}
        data = self.poison(train_set, None, crafted)
        with seeded_rng(seed, f"init:sleeper_agent_retrain:{round_}"):
            model = build_model()
        rrecipe = self.retrain_recipe(recipe)
        with components.phase("surrogate_retraining"):
            train(model, data, rrecipe, seed=seed, desc=f"sleeper agent surrogate retraining {round_}")
        return model.eval(), accuracy(model, data)

    # --- poisoning and implanting ------------------------------------------------------------
    def poison(self, dataset: Dataset, generator: torch.Generator | None,
               crafted: dict[str, torch.Tensor] | None = None) -> Dataset:
        """A copy of ``dataset`` with :meth:`craft`'s perturbations added to its images (labels
        kept); ``meta["poison_indices"]`` lists them. Nothing is drawn at random here (the
        poisons were chosen while crafting), so ``generator`` is not used."""
        if crafted is None:
            raise BadExpertError(
                f"attack '{self.name}' crafts its poisons against a surrogate model: use implant(...), which trains "
                "one, or pass poison(dataset, generator, crafted=attack.craft(...))"
            )
        idx, delta = crafted["indices"].long(), crafted["delta"]
        if delta.shape != (len(idx), *dataset.images.shape[1:]) or (len(idx) and int(idx.max()) >= len(dataset)):
            raise BadExpertError(f"the crafted Sleeper Agent poisons do not fit this {len(dataset)}-image dataset")
        images = dataset.images.clone()
        images[idx] = (images[idx].to(torch.int16) + delta.to(torch.int16)).clamp(0, 255).to(torch.uint8)
        return dataset.with_data(images, dataset.labels.clone(), name=f"{dataset.name}+{self.name}",
                                 poison_indices=idx.tolist(), cover_indices=[])

    def implant(self, train_set: Dataset, build_model: Callable[[], nn.Module], recipe, seed: int, *,
                log: Callable[[str], Any] = print, components: Components | None = None) -> tuple[nn.Module, dict]:
        """Train the clean surrogate (a cached component), craft the poisons (a cached
        component), train the suspect model on the poisoned set; all seeded by ``seed``.

        ``info``: the surrogate's training accuracy, the number of poisons and source images, the
        alignment loss at the first and last iteration, the retrainings, the largest
        perturbation, and the seconds of each phase (``clean_model``, ``sleeper_agent_poisons``
        with ``surrogate_retraining`` inside it, ``suspect_model``).
        """
        from ..training import accuracy, train

        self.check(train_set.num_classes)
        components = components if components is not None else Components(log=log)
        srecipe = recipe if self.surrogate_epochs is None else recipe.replace(epochs=self.surrogate_epochs)
        log(f"sleeper agent: a surrogate model trained on the clean training set ({srecipe.epochs} epochs)")
        surrogate = components.clean_model(build_model, train_set, srecipe, seed, desc="surrogate model")
        surrogate_acc = accuracy(surrogate, train_set)
        spec = {"surrogate": tensor_digest(surrogate.state_dict()), "recipe": srecipe.to_dict(), "seed": seed,
                "attack": self.params()}
        crafted = components.fetch(
            "sleeper_agent_poisons", spec,
            lambda: self.craft(train_set, surrogate, build_model, srecipe, seed, components=components, log=log),
            data=train_set,
        )
        data = self.poison(train_set, None, crafted)
        trace = crafted["alignment"]
        info = {
            "poisoned_samples": len(crafted["indices"]), "cover_samples": 0,
            "surrogate_train_accuracy": surrogate_acc, "surrogate_epochs": srecipe.epochs,
            "crafting": {
                "iterations": len(trace), "retrainings": len(crafted["retrain_accuracy"]),
                "retrain_epochs": self.retrain_recipe(srecipe).epochs,
                "retrain_accuracy": crafted["retrain_accuracy"].tolist(),
                "source_images": len(self.source_indices(train_set, derive_generator(seed, "sleeper_agent:sources"))),
                "alignment_first": float(trace[0]) if len(trace) else None,
                "alignment_last": float(trace[-1]) if len(trace) else None,
                "max_linf": int(crafted["delta"].abs().max()) / 255 if crafted["delta"].numel() else 0.0,
                "step_size": self.step_size, "selection": self.selection,
            },
        }
        log(f"poisoned {info['poisoned_samples']} target-class training samples with {self.describe()} (alignment loss "
            f"{info['crafting']['alignment_first']} -> {info['crafting']['alignment_last']})")
        with seeded_rng(seed, "init:suspect_model"):
            model = build_model()
        with components.phase("suspect_model"):
            train(model, data, recipe, seed=seed, desc="suspect model")
        return model, {**info, **components.info()}


def gradient_norms(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample l2 norm of the gradient of ``model``'s cross-entropy (eval mode) with respect to
    all its trainable parameters, for uint8 or float ``images`` (CPU float32 result)."""
    from torch.func import functional_call, grad, vmap

    device = model_device(model)
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def loss(p, x, y):
        return F.cross_entropy(functional_call(model, (p, buffers), (x[None],)), y[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    chunk = max(1, min(EVAL_BATCH, PER_SAMPLE_VALUES // max(1, sum(p.numel() for p in params.values()))))
    out = []
    with eval_mode(model):
        for xb, yb in zip(images.split(chunk), labels.split(chunk)):
            grads = per_sample(params, to_float(xb).to(device), yb.to(device))
            out.append(torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values())).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)
