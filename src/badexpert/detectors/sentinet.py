"""SentiNet (Chou et al., IEEE S&P Workshops 2020): detecting localized universal attacks.

A localized trigger (a patch) is the part of a triggered input the model looks at, and it carries
the attack with it: pasted onto other images it makes them all answer the target class, while the
model stays confident on them when that region holds an inert pattern instead. The salient region
of a clean input, pasted elsewhere, rarely overrides the other image's own content that much. For
an input x with the model's label ``y = argmax M(x)``:

1. **Region**: Grad-CAM of class ``y`` at the model's last spatial feature map (by default the
   output of its last stage, :func:`feature_layer`: for a ResNet the output of the last residual
   block, after the skip connection, as the reference's ``layer4``): the layer's activations ``A_k`` weighted by the spatial mean of
   ``d logit_y / d A_k``, summed over channels, ReLU, bilinearly upsampled to the input size. The
   region ``m`` is the ``top`` share (0.15) of the input's pixels with the highest heatmap values
   (``round(top * H * W)`` pixels, at least one; ties go to the earlier pixel in row-major order).
2. **Fooled**: draw ``n`` clean images ``c_j`` held by the detector, paste x's region on each,
   ``c_j * (1 - m) + x * m``, and take the fraction whose prediction is ``y``.
3. **AvgConf**: fill the same region of the same ``c_j`` with uniform noise instead,
   ``c_j * (1 - m) + u_j * m``, and take the mean of the model's max-softmax confidence.
4. **Score**: ``Fooled - f(AvgConf)`` where ``f`` is the decision boundary fitted on clean
   images (below): how far above the boundary of clean behaviour the input lies. Higher = more
   likely a backdoor input.

**Boundary** (fit): the clean fit set is split by a permutation seeded from the detector's seed:
a share ``holdout`` (0.2) of it is the boundary set, the rest is the pool of clean images drawn in
step 2. For every boundary image, (AvgConf, Fooled) as above; AvgConf is binned (width 0.02) and
the maximum Fooled per non-empty bin is taken; a quadratic ``f`` (``numpy.polyfit``, degree 2)
is fitted to those maxima placed at their bin centres.

Cost: ``1 + 2 * n`` forward passes (the Grad-CAM pass, ``n`` pasted images, ``n`` noise-filled
ones) and 1 backward pass per input.

Reference: Chou et al., "SentiNet: Detecting Localized Universal Attacks Against Deep Learning
Systems" (IEEE S&P Workshops 2020): its method (Grad-CAM region, the Fooled / AvgConf statistics,
the boundary fitted on clean images); the behaviour follows the SentiNet baseline of the BaDExpert
authors' public code (Grad-CAM at ResNet's ``layer4``, ``n = 100``, the top 15% of the heatmap,
bins of 0.02 and a quadratic boundary). Defaults: ``n=100``, ``top=0.15``, ``holdout=0.2``,
``layer=None`` (the last feature map).

Scope: SentiNet targets **localised** triggers (:attr:`SentiNet.trigger_scope`); on triggers
spread over the whole image (an attack's ``trigger_extent == "image"``: SIG, Blend, BPP, Refool,
WaNet, ISSBA) no region carries the attack, and comparison tables mark such cells out of scope.
"""

from __future__ import annotations

import warnings
from typing import Annotated, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BadExpertError
from ..training import forward, model_outputs
from ..utils import eval_mode
from ..validation import NonNegativeInt, PositiveInt, Range
from .base import Detector

#: purpose strings of the per-input generators (which clean images, which noise)
POOL_PURPOSE = "sentinet-pool"
NOISE_PURPOSE = "sentinet-noise"
#: AvgConf bin width of the decision boundary (the reference's)
BIN_WIDTH = 0.02


class SentiNet(Detector):
    """SentiNet (Chou et al., 2020): flag inputs whose Grad-CAM region hijacks the predictions of clean images.

    See the module docstring for the method.

    Parameters
    ----------
    n: clean images per input, each pasted once with the input's region and once with noise
        (reference: 100).
    top: share of the input's pixels making up the salient region, in (0, 1) (reference: 0.15).
    layer: name (as in ``model.named_modules()``) of the module whose output Grad-CAM uses; it
        must output ``[N, C, h, w]`` feature maps. ``None`` (default): the model's last spatial
        feature map, found by one forward pass with hooks on every module
        (:func:`feature_layer`: the last module whose output is a 4-D map with more than one
        position and not a pooling layer's output; for this package's models ResNet's
        ``net.layers``, the last conv-BN-ReLU of the CNN, VGG and MobileNetV2, the ViT's patch
        embedding). Checked against the model at :meth:`fit` and when a saved detector is loaded.
    holdout: share of the clean fit set used to fit the decision boundary, in (0, 1); the rest is
        the pool of clean images pasted onto (both keep at least one image).
    batch_size: inputs per Grad-CAM pass, and pasted images per model forward pass.
    seed: drives the split of the fit set and every per-input draw; which clean images and which
        noise an input gets depend only on the seed and the input's content
        (:meth:`Detector.input_generators`), not on its batch or position.
    device: where the model runs (``None``: CUDA when available).

    Departures from the paper and the reference
    -------------------------------------------
    - The score is the vertical distance ``Fooled - f(AvgConf)`` above the boundary curve, not the
      Euclidean distance to it; ``f`` is evaluated at AvgConf clamped to the range of bin centres
      it was fitted on (a quadratic is not extrapolated). With fewer than three non-empty bins the
      polynomial degree drops to the number of bins minus one.
    - The reference's own threshold rule is replaced: :meth:`Detector.calibrate` sets the
      threshold by the conformal quantile of clean calibration scores, like every detector here.
    - The Grad-CAM layer is found from the model's forward pass rather than named per
      architecture (the reference names ResNet's ``layer4``); on a ResNet it is the same map.
      (This package's first version read the last ``nn.Conv2d``, inside the last residual
      branch before its BatchNorm and skip connection: on a CIFAR-10 Trojan model its region held
      0.6% of the trigger's pixels. Files saved with that default are refused on load.)
    - The region always comes from Grad-CAM; the reference's use of the known trigger location for
      some attacks is not reproduced (the detector never knows the trigger).
    - The clean images of an input are drawn without replacement from the pool (with replacement
      when the pool holds fewer than ``n``), per input; each gets its own uniform noise pattern.
      Fooled counts every pasted image predicted ``y``, including clean images that already were.
    - Grad-CAM hooks the chosen layer only for the duration of a call (the hook passes on a copy of
      the layer's output so an in-place operation after it cannot alter the captured activations);
      gradients are taken with ``torch.autograd.grad`` with respect to those activations only, so
      no parameter's ``.grad`` is touched.
    """

    name: ClassVar[str] = "sentinet"
    #: SentiNet is designed for localised triggers (the paper's "localized universal attacks"):
    #: an attack whose ``trigger_extent`` is ``"image"`` (SIG, Blend, BPP, Refool, WaNet, ISSBA) is
    #: outside its scope, and comparison tables mark that cell (:func:`badexpert.evaluation.compare.out_of_scope`)
    trigger_scope: ClassVar[str] = "local"
    scatter_axes: ClassVar[dict] = {
        "x": "avg_conf", "y": "fooled", "limits": (0.0, 1.0),
        "x_label": "AvgConf: mean confidence with the region filled with noise",
        "y_label": "Fooled: share of clean images the pasted region sends to the input's label",
        "title": "Backdoor inputs lie above the boundary fitted on clean inputs",
        "caption": "SentiNet's decision space: AvgConf vs Fooled",
    }

    def __init__(
        self,
        *,
        n: PositiveInt = 100,
        top: Annotated[float, Range(gt=0, lt=1)] = 0.15,
        layer: str | None = None,
        holdout: Annotated[float, Range(gt=0, lt=1)] = 0.2,
        batch_size: PositiveInt = 256,
        seed: NonNegativeInt = 0,
        device: str | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, device=device)
        self.n = n
        self.top = top
        self.layer = layer
        self.holdout = holdout

    @property
    def cost(self) -> dict[str, int]:
        """``1 + 2 * n`` forward passes and one backward pass per scored input."""
        return {"forward": 1 + 2 * int(self.n), "backward": 1}

    # --- the Grad-CAM layer ----------------------------------------------------------------
    def target_layer(self, model: nn.Module, example: torch.Tensor | None = None) -> tuple[str, nn.Module]:
        """``(name, module)`` of the layer Grad-CAM reads: ``layer`` if given, else the model's
        last spatial feature map (:func:`feature_layer`, found by one forward pass of ``example``,
        a float batch; without it, of zeros of the fitted input shape)."""
        modules = dict(model.named_modules())
        if self.layer is not None:
            if self.layer not in modules:
                convs = [k for k, m in modules.items() if isinstance(m, nn.Conv2d)]
                hint = f"; its convolutions: {', '.join(convs[-3:])}" if convs else ""
                raise BadExpertError(f"SentiNet: the model has no module named '{self.layer}'{hint}")
            return self.layer, modules[self.layer]
        if example is None:
            example = torch.zeros((2, *self.input_shape_), device=self.device_)
        name = feature_layer(model, example)
        return name, modules[name]

    # --- fitting -------------------------------------------------------------------------
    def _fit(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
        model_outputs(model, images, labels)  # the model takes these images (one-line error otherwise)
        self.layer_name_ = self.target_layer(model, _as_float(images[:2]).to(self.device_))[0]
        count = len(images)
        n_hold = min(count - 1, max(1, int(round(self.holdout * count))))
        perm = torch.randperm(count, generator=torch.Generator().manual_seed(self.seed))
        hold, pool = perm[:n_hold].sort().values, perm[n_hold:].sort().values
        if len(pool) < self.n:
            warnings.warn(
                f"SentiNet: the pool has {len(pool)} clean images, fewer than n={self.n}; each input's images are drawn "
                "with replacement. A larger clean set (or a smaller n) gives distinct images.",
                stacklevel=3,
            )
        self.pool_ = images[pool].detach().clone().to(self.device_)
        from ..data.core import batches

        fooled, conf = [], []
        self.model_ = model  # statistics() needs it; the base sets it again after _fit
        try:
            for xb, _ in batches(images[hold], None, batch_size=self.batch_size, device=self.device_):
                f, c = self.statistics(xb)
                fooled.append(f)
                conf.append(c)
        except BaseException:
            del self.model_  # a failed fit leaves the detector unfitted
            raise
        fooled, conf = torch.cat(fooled).numpy(), torch.cat(conf).numpy()
        self.holdout_index_ = hold
        self.fit_points_ = {"avg_conf": conf, "fooled": fooled}
        self.curve_, self.conf_range_ = fit_boundary(conf, fooled)

    # --- scoring -------------------------------------------------------------------------
    def pool_indices(self, x: torch.Tensor) -> torch.Tensor:
        """``[len(x), n]`` indices into :attr:`pool_`: the clean images each input of ``x`` is
        pasted onto, drawn from that input's own generator."""
        return self.draw_indices(x, len(self.pool_), self.n, POOL_PURPOSE)

    def gradcam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(heatmap [N, H, W], label [N])``: Grad-CAM of the model's predicted class for a float
        batch ``x``, upsampled to the input size (float, on ``x``'s device). Runs with gradients
        enabled whatever the caller's mode; the hook lives only for this call."""
        module = dict(self.model_.named_modules())[self.layer_name_]
        captured: list[torch.Tensor] = []

        def hook(_mod, _inp, out):
            if not captured:
                if not isinstance(out, torch.Tensor) or out.dim() != 4:
                    raise BadExpertError(
                        f"SentiNet: layer '{self.layer_name_}' outputs {getattr(out, 'shape', type(out).__name__)}, "
                        "not [N, C, h, w] feature maps; name a convolutional layer with layer="
                    )
                captured.append(out)
                return out.clone()  # later in-place ops (ReLU(inplace=True)) act on the copy
            return None

        handle = module.register_forward_hook(hook)
        try:
            with torch.enable_grad(), eval_mode(self.model_):
                xr = x.detach().clone().requires_grad_(True)  # activations need grad even if params are frozen
                logits = forward(self.model_, xr)
                if not captured:
                    raise BadExpertError(f"SentiNet: layer '{self.layer_name_}' is not used by the model's forward pass")
                label = logits.argmax(1)
                act = captured[0]
                (grad,) = torch.autograd.grad(logits.gather(1, label[:, None]).sum(), act)
        finally:
            handle.remove()
        act, grad = act.detach(), grad.detach()
        cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * act).sum(dim=1, keepdim=True))
        cam = F.interpolate(cam.float(), size=tuple(x.shape[2:]), mode="bilinear", align_corners=False)
        return cam[:, 0], label.detach()

    def region(self, heatmap: torch.Tensor) -> torch.Tensor:
        """``[N, 1, H, W]`` float mask of the ``top`` share of pixels with the highest heatmap
        values (``round(top * H * W)``, at least 1; ties to the earlier pixel)."""
        count, h, w = heatmap.shape
        k = max(1, int(round(self.top * h * w)))
        order = torch.sort(heatmap.reshape(count, -1), dim=1, descending=True, stable=True).indices[:, :k]
        mask = torch.zeros(count, h * w, device=heatmap.device)
        mask.scatter_(1, order, 1.0)
        return mask.view(count, 1, h, w)

    def statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fooled, avg_conf)``, float64 on the CPU, for a float batch ``x`` on the detector's
        device (see the module docstring)."""
        heat, label = self.gradcam(x)
        mask = self.region(heat)
        idx = self.pool_indices(x)
        count, n = idx.shape
        gens = self.input_generators(x, NOISE_PURPOSE)
        noise: dict[int, torch.Tensor] = {}  # input -> its n noise patterns, drawn when first needed

        def noise_rows(start: int, stop: int) -> torch.Tensor:
            rows = []
            for i in range(start // n, (stop - 1) // n + 1):
                if i not in noise:
                    noise.clear()  # inputs come in order: earlier ones are done
                    noise[i] = torch.rand((n, *x.shape[1:]), generator=gens[i])
                rows.append(noise[i][max(start, i * n) - i * n : min(stop, (i + 1) * n) - i * n])
            return torch.cat(rows)

        total = count * n
        hits = torch.empty(total, dtype=torch.float64)
        conf = torch.empty(total, dtype=torch.float64)
        which = torch.arange(count).repeat_interleave(n)  # pasted image k belongs to input k // n
        over = idx.flatten()
        step = max(1, int(self.batch_size))
        device = x.device
        with torch.no_grad(), eval_mode(self.model_):
            for start in range(0, total, step):
                stop = min(start + step, total)
                own = which[start:stop].to(device)
                clean = _as_float(self.pool_[over[start:stop].to(self.pool_.device)].to(device))
                m = mask[own]
                pasted = clean * (1 - m) + x[own] * m
                hits[start:stop] = (forward(self.model_, pasted).argmax(1) == label[own]).double().cpu()
                filled = clean * (1 - m) + noise_rows(start, stop).to(device) * m
                conf[start:stop] = torch.softmax(forward(self.model_, filled).double(), dim=1).amax(1).cpu()
        return hits.view(count, n).mean(1), conf.view(count, n).mean(1)

    def boundary(self, avg_conf: torch.Tensor) -> torch.Tensor:
        """The fitted boundary ``f`` at ``avg_conf`` (clamped to the fitted range), float64."""
        lo, hi = self.conf_range_
        a = avg_conf.double().clamp(lo, hi)
        c2, c1, c0 = (float(v) for v in self.curve_)
        return (c2 * a + c1) * a + c0

    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        fooled, conf = self.statistics(x)
        return fooled - self.boundary(conf)

    def score_details(self, x) -> dict:
        """Scores with each input's Fooled and AvgConf (numpy arrays; NaN for unscorable inputs)."""
        self._check_fitted("score")
        images, bad = self._scorable(x)
        fooled, conf = [], []
        with torch.no_grad():
            for xb in self._batches(images):
                f, c = self.statistics(xb)
                fooled.append(f)
                conf.append(c)
        fooled = torch.cat(fooled) if fooled else torch.empty(0, dtype=torch.float64)
        conf = torch.cat(conf) if conf else torch.empty(0, dtype=torch.float64)
        score = (fooled - self.boundary(conf)).float()
        for t in (fooled, conf, score):
            t[bad] = float("nan")
        return {"score": score.numpy(), "fooled": fooled.numpy(), "avg_conf": conf.numpy()}

    # --- persistence ---------------------------------------------------------------------
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {"pool": self.pool_, "curve": torch.as_tensor(np.asarray(self.curve_), dtype=torch.float64)}

    def _state_meta(self) -> dict:
        return {"pool_size": int(len(self.pool_)), "layer": self.layer_name_,
                "conf_range": [float(v) for v in self.conf_range_]}

    def _load_state(self, model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        pool, curve = tensors.get("pool"), tensors.get("curve")
        ok = (
            pool is not None and pool.dim() == 4 and len(pool) > 0
            and tuple(pool.shape[1:]) == tuple(self.input_shape_)
            and (pool.dtype == torch.uint8
                 or (pool.is_floating_point() and bool(((pool >= 0) & (pool <= 1)).all())))
            and curve is not None and curve.shape == (3,) and bool(torch.isfinite(curve).all())
        )
        rng = meta.get("conf_range")
        ok = ok and isinstance(rng, list) and len(rng) == 2 and all(isinstance(v, (int, float)) for v in rng) \
            and np.isfinite(rng).all() and rng[0] <= rng[1]
        if not ok:
            raise BadExpertError(
                "the SentiNet detector file lacks its clean pool or boundary curve, or they have the wrong shape or "
                "values; it is damaged"
            )
        name, _ = self.target_layer(model)  # the named layer exists in this model (or the default is found again)
        if meta.get("layer") not in (None, name):
            why = ("" if self.layer is not None else
                   " (files saved before the default became the last feature map read the last nn.Conv2d)")
            raise BadExpertError(
                f"the SentiNet detector file reads layer '{meta.get('layer')}' but this model's is '{name}'{why}; "
                "fit and calibrate it again"
            )
        self.layer_name_ = name
        self.pool_ = pool.to(self.device_)
        self.curve_ = curve.double().numpy()
        self.conf_range_ = (float(rng[0]), float(rng[1]))


def fit_boundary(avg_conf: np.ndarray, fooled: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """SentiNet's decision boundary: bin ``avg_conf`` (width :data:`BIN_WIDTH`), take the
    maximum ``fooled`` per non-empty bin and fit a quadratic (``numpy.polyfit``) to those maxima
    at their bin centres. Returns the three coefficients (highest power first; leading zeros
    when fewer than three bins allow only a lower degree) and the range of bin centres."""
    avg_conf, fooled = np.asarray(avg_conf, dtype=np.float64), np.asarray(fooled, dtype=np.float64)
    nbins = int(round(1 / BIN_WIDTH))
    bins = np.clip(np.floor(avg_conf / BIN_WIDTH).astype(np.int64), 0, nbins - 1)
    used = np.unique(bins)
    centres = (used + 0.5) * BIN_WIDTH
    maxima = np.array([fooled[bins == b].max() for b in used])
    deg = min(2, len(used) - 1)
    coef = np.polyfit(centres, maxima, deg) if deg > 0 else maxima[:1].copy()
    coef = np.concatenate([np.zeros(3 - len(coef)), coef])
    return coef, (float(centres.min()), float(centres.max()))


def feature_layer(model: nn.Module, example: torch.Tensor) -> str:
    """Name of the module whose output is the model's **last spatial feature map**: the last
    module, in the order their forward calls finish during one eval-mode pass of ``example``,
    whose output is a 4-D tensor ``[N, C, h, w]`` with more than one spatial position and is not
    the output of a pooling layer (``torch.nn`` pooling, or a module that returns a pooling
    layer's output unchanged). The model's root module is never chosen.

    On the package's models: the ResNet's stage stack (``net.layers``, the output of the last
    residual block, after its skip connection and ReLU, as the reference's ``layer4``); the last
    conv-BN-ReLU of the small CNN, VGG and MobileNetV2 (before their final pooling); the patch
    embedding of the ViT (its only spatial map). Models that compute in-place (``ReLU(inplace=True)``)
    get the module whose call returned the final values. Raises a one-line error when no module
    outputs a spatial map (name one with ``layer=``)."""
    pooled: set[int] = set()
    records: list[tuple[str, torch.Tensor]] = []  # outputs kept alive so their ids stay unique

    def hook_for(name: str, module: nn.Module):
        is_pool = type(module).__module__ == "torch.nn.modules.pooling"

        def hook(_mod, _inp, out):
            if isinstance(out, torch.Tensor):
                records.append((name, out))
                if is_pool:
                    pooled.add(id(out))
        return hook

    handles = [m.register_forward_hook(hook_for(k, m)) for k, m in model.named_modules() if k]
    try:
        with torch.no_grad(), eval_mode(model):
            forward(model, example)
    finally:
        for h in handles:
            h.remove()
    maps = [k for k, out in records
            if out.dim() == 4 and out.shape[2] * out.shape[3] > 1 and id(out) not in pooled]
    if not maps:
        raise BadExpertError(
            "SentiNet: no module of the model outputs a spatial feature map [N, C, h, w] for Grad-CAM; name one with layer="
        )
    return maps[-1]


def _as_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to float ``[0, 1]``; float images as they are (checked at fit time)."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


__all__ = ["SentiNet", "feature_layer", "fit_boundary"]
