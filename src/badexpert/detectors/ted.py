"""TED (Mo et al., IEEE S&P 2024): backdoor inputs by the topological evolution dynamics of their ranks.

"Robust Backdoor Detection for Deep Learning via Topological Evolution Dynamics" views the network
as a dynamical system that carries an input, layer by layer, towards the samples of the class it
is given. A clean input stays near samples of its predicted class all along; a triggered input
starts among samples of its true (source) class and only late jumps to the neighbourhood of the
attacker's target class. What is measured is a *rank*, not a distance, so it does not depend on
any one metric space being separable:

1. references: a small labelled clean set (here ``references_per_class`` images of each class,
   drawn with the detector's seed among the fitting images the suspect model classifies
   correctly, so that each reference's label is also the model's answer);
2. for an input x with the model's label ``y = argmax M(x)`` and each chosen layer ``l``
   (:meth:`TED.layer_names`), with ``h_l`` the layer's output flattened:
   ``K_l(x)`` = the number of references strictly closer to x (Euclidean, in ``h_l``) than the
   nearest reference of class ``y``; 0 when the nearest reference has the input's label, and
   the number of references when none has it. ``[K_1 .. K_L]`` is x's rank trajectory;
3. the rank trajectories of clean inputs are fitted with a PCA-based outlier detector; the score
   is the input trajectory's outlyingness: **higher = more likely a backdoor input**. Here the
   ranks are standardised with the clean trajectories' mean and deviation (a deviation below one
   rank counts as one) and the score is the squared Mahalanobis distance in the principal
   components of the clean trajectories, ``sum_j (v_j . (z - mu))^2 / lambda_j`` (eigenvalues
   below 1e-3 count as 1e-3): Shyu et al.'s PCA-based anomaly score with every component.

Fit: the references are drawn; every other fitting image (the model's label used) gives one
clean trajectory; the standardisation and the PCA are fitted on those. Clean inputs in the fit
and at test time are therefore ranked against the same references.

Layers (``layers=()``, the default): the output of every block (a module with children that
sits directly in an ``nn.Sequential`` or ``nn.ModuleList``: a ResNet's residual blocks, a ViT's
encoder blocks, a MobileNet's inverted residuals), of every activation module (ReLU, ReLU6,
LeakyReLU, ELU, GELU, SiLU) not inside such a block, and the model's logits. For this package's
models: the small CNN, 3 ReLUs + logits (4); ResNet-18, the stem's ReLU, 8 blocks, the logits
(10). ``layers`` names modules instead (as in ``model.named_modules()``); the logits are always
appended.

Cost: one forward pass of the suspect model per input (hooks read every chosen layer in that
pass), plus the rank computation: a distance from the input to every reference at every chosen
layer (references x the layers' total width multiply-adds).

Reference and departures
------------------------
TED is the paper above (its method: the rank-based topological feature, the trajectory across
layers, the PCA-based outlier detection; the authors' code is public and was not read for this
module, so no public code's behaviour is followed beyond what the paper states). Departures:

- **TED++ is not implemented.** TED++ (Le et al., ICDM 2025, arXiv 2510.14299) replaces the rank
  by a "locally adaptive rank" that penalises an activation lying outside a tubular
  neighbourhood of the predicted class's clean activations, with a tube radius estimated per
  layer from a few clean samples. What could be found of it here (the abstract and secondary
  summaries) names those steps but not the LAR formulas, the radius estimate or their defaults,
  so it could not be implemented from its paper; TED, its basis, is.
- The reference set is drawn from the clean set given to :meth:`fit`, ``references_per_class``
  per class (default 20: the clean validation samples per class by default in the TED++
  authors' public code, which runs TED as well), among the images the model classifies correctly; the PCA detector is fitted on
  the trajectories of the *other* fitting images rather than on the references' own
  (leave-one-out) trajectories, so that fitted and scored trajectories come from the same
  procedure. A class the model gets wholly wrong has no reference; inputs given that label get
  the largest rank at every layer.
- The outlier detector is written here (Mahalanobis in the PCA basis, every component, with a
  floor on the eigenvalues and on the deviations, documented above) rather than taken from an
  outlier-detection library; the ranks stay integer counts.
- The layer choice above is this package's, written for any ``nn.Module``; the paper hooks the
  outputs of each layer / block of its ResNet and VGG models.
- The threshold comes from :meth:`Detector.calibrate` (the conformal quantile of clean scores),
  not from a fixed contamination rate.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import BadExpertError
from ..training import forward, model_outputs
from ..utils import derive_generator, eval_mode
from ..validation import NonNegativeInt, PositiveInt, Range
from .base import Detector

#: activation modules whose outputs are layers of the trajectory (when not inside a block)
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU)
#: the smallest eigenvalue (of the standardised clean trajectories' covariance) the score divides by
MIN_EIGENVALUE = 1e-3
#: the name under which the model's logits appear in the trajectory
LOGITS = "<logits>"


def default_layers(model: nn.Module) -> list[str]:
    """The module names whose outputs form the trajectory by default (see the module docstring),
    in ``named_modules()`` order; the logits are not included."""
    blocks: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Sequential, nn.ModuleList)):
            for child_name, child in m.named_children():
                if any(True for _ in child.children()) and not isinstance(child, (nn.Sequential, nn.ModuleList)):
                    blocks.append(f"{name}.{child_name}" if name else child_name)
    block_set = set(blocks)

    def inside_block(name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:i]) in block_set for i in range(1, len(parts)))

    chosen = []
    for name, m in model.named_modules():
        if name in block_set and not inside_block(name):
            chosen.append(name)
        elif isinstance(m, ACTIVATIONS) and not inside_block(name):
            chosen.append(name)
    return chosen


class TED(Detector):
    """TED (Mo et al., IEEE S&P 2024): flag inputs whose nearest-neighbour rank trajectory across layers is an outlier.

    See the module docstring for the method, its reference and the departures (TED++ is not
    implemented; this is TED).

    Parameters
    ----------
    references_per_class: clean reference images per class, drawn with the seed among the fitting
        images the model classifies correctly (fewer where a class has fewer); the rest of the
        fitting images fit the outlier detector.
    layers: module names (``model.named_modules()``) whose outputs form the trajectory, in forward
        order; ``()`` (default): blocks and activations chosen automatically (module docstring).
        The logits are always the last layer.
    batch_size: inputs per forward pass.
    seed: draws the references.
    device: where the model runs (``None``: CUDA when available).

    Fitted attributes: ``layers_`` (names, the logits last), ``references_`` (one
    ``[R, width]`` float tensor per layer), ``reference_labels_``, ``rank_mean_``,
    ``rank_scale_``, ``pca_mean_``, ``pca_components_``, ``pca_variance_``, ``fit_report_``.
    """

    name: ClassVar[str] = "ted"
    forward_passes_per_input: ClassVar[int] = 1
    scatter_axes: ClassVar[dict | None] = None

    def __init__(
        self,
        *,
        references_per_class: Annotated[int, Range(ge=1)] = 20,
        layers: tuple[str, ...] = (),
        batch_size: PositiveInt = 256,
        seed: NonNegativeInt = 0,
        device: str | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, device=device)
        self.references_per_class = references_per_class
        self.layers = layers
        self.check_params()

    def check_params(self) -> "TED":
        super().check_params()
        if len(set(self.layers)) != len(self.layers) or any(not isinstance(n, str) or not n for n in self.layers):
            raise BadExpertError(f"detector '{self.name}' parameter 'layers' must name distinct modules; got {list(self.layers)}")
        return self

    # --- layers and activations ----------------------------------------------------------
    def layer_names(self, model: nn.Module) -> list[str]:
        """The hooked modules' names (without the logits): ``layers`` if given, else :func:`default_layers`."""
        modules = dict(model.named_modules())
        if self.layers:
            missing = [n for n in self.layers if n not in modules]
            if missing:
                raise BadExpertError(f"TED: the model has no module named {missing[0]!r}; name modules as in model.named_modules()")
            return list(self.layers)
        return default_layers(model)

    def _activations(self, model: nn.Module, x: torch.Tensor, names: list[str]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Flattened float outputs of the named modules (then the logits) for a batch, and the logits."""
        modules = dict(model.named_modules())
        captured: dict[str, torch.Tensor] = {}

        def hook_for(name):
            def hook(_mod, _inp, out):
                if isinstance(out, (tuple, list)):
                    out = out[0]
                if not isinstance(out, torch.Tensor):
                    raise BadExpertError(f"TED: layer {name!r} does not output a tensor")
                captured.setdefault(name, out.detach().flatten(1).float().clone())
            return hook

        handles = [modules[n].register_forward_hook(hook_for(n)) for n in names]
        try:
            with eval_mode(model):
                logits = forward(model, x)
        finally:
            for h in handles:
                h.remove()
        unused = [n for n in names if n not in captured]
        if unused:
            raise BadExpertError(f"TED: layer {unused[0]!r} is not used by the model's forward pass")
        return [captured[n] for n in names] + [logits.detach().float()], logits

    def _ranks(self, acts: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` ranks (float64): per layer, how many references are strictly closer than the
        nearest reference of the input's label (the number of references when none has it)."""
        ref_labels = self.reference_labels_.to(labels.device)
        same = ref_labels[None, :] == labels[:, None]  # [B, R]
        out = []
        for a, ref in zip(acts, self.references_):
            d = torch.cdist(a.double(), ref.to(a.device).double())  # [B, R]
            nearest_same = torch.where(same, d, torch.full_like(d, float("inf"))).min(dim=1).values
            rank = (d < nearest_same[:, None]).sum(dim=1).double()
            out.append(torch.where(torch.isinf(nearest_same), torch.full_like(rank, float(len(ref_labels))), rank))
        return torch.stack(out, dim=1).cpu()

    @torch.no_grad()
    def _trajectories(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank trajectories ``[N, L]`` and the model's labels for images, a batch at a time."""
        from ..data.core import batches

        names = self.layers_[:-1]
        ranks, preds = [], []
        for xb, _ in batches(images, None, batch_size=self.batch_size, device=self.device_):
            acts, logits = self._activations(model, xb, names)
            y = logits.argmax(1)
            ranks.append(self._ranks(acts, y))
            preds.append(y.cpu())
        return (torch.cat(ranks) if ranks else torch.empty(0, len(self.layers_), dtype=torch.float64),
                torch.cat(preds) if preds else torch.empty(0, dtype=torch.long))

    # --- fitting -------------------------------------------------------------------------
    def _fit(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
        from sklearn.decomposition import PCA

        from ..data.core import batches

        classes = model_outputs(model, images, labels)
        names = self.layer_names(model)
        self.layers_ = names + [LOGITS]
        with torch.no_grad(), eval_mode(model):
            preds = torch.cat([forward(model, xb).argmax(1).cpu()
                               for xb, _ in batches(images, None, batch_size=self.batch_size, device=self.device_)])
        correct = preds == labels
        g = derive_generator(self.seed, "ted-references")
        chosen = []
        for c in range(classes):
            idx = (correct & (labels == c)).nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=g)[: int(self.references_per_class)]]
            chosen.append(idx)
        ref_idx = torch.cat(chosen).sort().values
        if len(ref_idx) == 0:
            raise BadExpertError("TED: the model classifies none of the clean fitting images correctly; no references")
        rest = torch.ones(len(images), dtype=torch.bool)
        rest[ref_idx] = False
        n_rest = int(rest.sum())
        if n_rest < len(self.layers_) + 2:
            raise BadExpertError(
                f"TED: {len(images)} clean fitting images leave {n_rest} beside the {len(ref_idx)} references; the outlier "
                f"detector over {len(self.layers_)} layers needs at least {len(self.layers_) + 2}: give more clean data "
                "or fewer references_per_class"
            )
        # the references' activations at every layer
        ref_images = images[ref_idx]
        parts: list[list[torch.Tensor]] = [[] for _ in self.layers_]
        with torch.no_grad():
            for xb, _ in batches(ref_images, None, batch_size=self.batch_size, device=self.device_):
                acts, _ = self._activations(model, xb, names)
                for i, a in enumerate(acts):
                    parts[i].append(a.cpu())
        self.references_ = [torch.cat(p) for p in parts]
        self.reference_labels_ = labels[ref_idx].clone()
        # the other fitting images' trajectories fit the outlier detector
        ranks, _ = self._trajectories(model, images[rest])
        mean = ranks.mean(0)
        scale = ranks.std(0, unbiased=False).clamp_min(1.0)
        z = ((ranks - mean) / scale).numpy()
        with np.errstate(invalid="ignore", divide="ignore"):  # constant trajectories: a zero total variance
            pca = PCA(svd_solver="full").fit(z)
        self.rank_mean_, self.rank_scale_ = mean, scale
        self.pca_mean_ = torch.from_numpy(pca.mean_).double()
        self.pca_components_ = torch.from_numpy(pca.components_).double()
        self.pca_variance_ = torch.from_numpy(pca.explained_variance_).double().clamp_min(MIN_EIGENVALUE)
        clean_scores = self._outlyingness(ranks)
        self.fit_report_ = {
            "clean_size": int(len(images)), "references": int(len(ref_idx)),
            "references_per_class": torch.bincount(self.reference_labels_, minlength=classes).tolist(),
            "trajectory_samples": n_rest, "layers": list(self.layers_),
            "widths": [int(r.shape[1]) for r in self.references_],
            "clean_mean_rank": [round(float(v), 3) for v in mean],
            "clean_score_median": float(clean_scores.median()),
        }

    # --- scoring -------------------------------------------------------------------------
    def _outlyingness(self, ranks: torch.Tensor) -> torch.Tensor:
        z = (ranks - self.rank_mean_) / self.rank_scale_
        proj = (z - self.pca_mean_) @ self.pca_components_.T
        return (proj**2 / self.pca_variance_).sum(dim=1)

    def rank_trajectories(self, x) -> torch.Tensor:
        """``[N, L]`` rank trajectories (float64; NaN rows for inputs that cannot be scored)."""
        self._check_fitted("rank_trajectories")
        images, bad = self._scorable(x)
        ranks, _ = self._trajectories(self.model_, images)
        ranks[bad] = float("nan")
        return ranks

    def _score_batch(self, xb: torch.Tensor) -> torch.Tensor:
        acts, logits = self._activations(self.model_, xb, self.layers_[:-1])
        return self._outlyingness(self._ranks(acts, logits.argmax(1))).float()

    def score_details(self, x) -> dict:
        """``score`` and the ``ranks`` ``[N, L]`` it comes from (numpy)."""
        ranks = self.rank_trajectories(x)
        return {"score": self._outlyingness(ranks).float().numpy(), "ranks": ranks.numpy()}

    def fit_summary(self) -> str:
        self._check_fitted("fit_summary")
        return f"{len(self.layers_)} layers, {len(self.reference_labels_)} references"

    # --- persistence ---------------------------------------------------------------------
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"reference.{i}": r for i, r in enumerate(self.references_)}
        out.update({"reference_labels": self.reference_labels_, "rank_mean": self.rank_mean_,
                    "rank_scale": self.rank_scale_, "pca_mean": self.pca_mean_,
                    "pca_components": self.pca_components_, "pca_variance": self.pca_variance_})
        return out

    def _state_meta(self) -> dict:
        return {"layers": list(self.layers_), "fit_report": self.fit_report_}

    def _load_state(self, model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        layers = meta.get("layers")
        damaged = BadExpertError("the TED detector file's references or outlier model are missing or inconsistent; it is damaged")
        if not (isinstance(layers, list) and layers and layers[-1] == LOGITS and all(isinstance(n, str) for n in layers)):
            raise damaged
        modules = dict(model.named_modules())
        missing = [n for n in layers[:-1] if n not in modules]
        if missing:
            raise BadExpertError(f"the TED detector was fitted on a model with a layer {missing[0]!r} that this model lacks")
        need = [f"reference.{i}" for i in range(len(layers))] + [
            "reference_labels", "rank_mean", "rank_scale", "pca_mean", "pca_components", "pca_variance"]
        if any(k not in tensors for k in need):
            raise damaged
        refs = [tensors[f"reference.{i}"].float() for i in range(len(layers))]
        labels = tensors["reference_labels"].long()
        n, width = len(labels), len(layers)
        shapes_ok = (
            all(r.dim() == 2 and r.shape[0] == n for r in refs)
            and all(tensors[k].shape == (width,) for k in ("rank_mean", "rank_scale", "pca_mean", "pca_variance"))
            and tensors["pca_components"].dim() == 2 and tensors["pca_components"].shape[1] == width
            and tensors["pca_components"].shape[0] == width
        )
        finite = all(bool(torch.isfinite(tensors[k]).all()) for k in need if k != "reference_labels")
        if not (n >= 1 and shapes_ok and finite and bool((tensors["rank_scale"] > 0).all())
                and bool((tensors["pca_variance"] > 0).all())):
            raise damaged
        self.layers_ = list(layers)
        self.references_ = refs
        self.reference_labels_ = labels
        self.rank_mean_, self.rank_scale_ = tensors["rank_mean"].double(), tensors["rank_scale"].double()
        self.pca_mean_ = tensors["pca_mean"].double()
        self.pca_components_ = tensors["pca_components"].double()
        self.pca_variance_ = tensors["pca_variance"].double()
        self.fit_report_ = meta.get("fit_report") or {}


__all__ = ["ACTIVATIONS", "LOGITS", "TED", "default_layers"]
