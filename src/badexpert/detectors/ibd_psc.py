"""IBD-PSC (Hou et al., ICML 2024): input-level backdoor detection by parameter-oriented scaling consistency.

Amplifying the batch-normalisation parameters of a backdoored model soon wrecks its predictions
on clean inputs, while a triggered input keeps being classified as the target, with high
confidence: the backdoor rides on a few strongly activated neurons that the amplification only
strengthens. IBD-PSC measures that consistency.

The BatchNorm layers with affine parameters (:func:`batchnorm_layers`: every ``nn.BatchNorm1d``,
``2d``, ``3d``, in module order) are counted from the last one backwards; "amplifying the last
``c`` layers" multiplies their affine weight and bias by ``omega``. With ``L`` such layers:

1. fit, on the clean set ``D_c``: ``k`` = the smallest ``c`` in ``1..L`` whose amplification
   makes the model's error rate on ``D_c`` (against the true labels) exceed ``xi``. If none
   does, ``k = L`` and a warning says so;
2. score, for an input x with the original model's label ``y = argmax M(x)``:

       PSC(x) = (1/n) * sum_{j=1..n} softmax(M_j(x))[y]

   where ``M_j`` amplifies the last ``min(k + j, L)`` layers. High PSC means backdoor (the paper
   flags PSC >= 0.9). The score is the increasing function

       score(x) = -ln(1 - PSC(x))     (in [0, inf]; PSC = 0.9 is score ln 10 = 2.303)

   computed in log space from the logits (``ln(1 - p) = logsumexp_{c != y} z_c - logsumexp_c z_c``),
   so it ranks, and after calibration rejects, exactly the inputs that PSC itself would, but keeps
   its resolution where PSC is within 1e-7 of 1: scores are float32, in which every PSC above
   ``1 - 6e-8`` would be the same number 1.0. (A confident model, and the amplified models sharpen
   its softmax, puts most inputs there; on the test suite's small backdoored CNN 94% of clean and
   all triggered inputs tie at PSC = 1.0 in float32.) PSC itself is :meth:`IBDPSC.psc`.

When ``k + n > L`` several ``M_j`` are the same model (the one amplifying all ``L`` layers): the
mean is still over the ``n`` terms, so that model weighs as often as it occurs, but it is run
once. In particular, when ``k = L`` every term is the all-layers model.

The suspect model is never changed: each ``M_j`` is evaluated with
:func:`torch.func.functional_call` on the model and a dictionary of scaled copies of the chosen
layers' weight and bias (:meth:`IBDPSC.amplified_parameters`). The model's own parameter tensors
are never written to; for the duration of each such call PyTorch substitutes the copies for them
on the module and puts the originals back afterwards (even on an error), so the same model object
must not be run from another thread while the detector scores.

Reference: the paper (its method section: the PSC statistic, and the adaptive choice of the first
amplified layer ``k`` by the clean error rate ``xi``; defaults omega 1.5, xi 0.6, n 5, T 0.9) and
the authors' code in BackdoorBox (``core/defenses/IBD_PSC.py``, read, not copied), whose
behaviour this follows: layers in ``named_modules`` order counted from the last, error against
the true labels, models amplifying the last ``k + 1 .. k + n`` layers, capped at ``L``.

Degeneration (measured, and reported). The method presumes that amplifying enough BatchNorm layers
wrecks clean predictions. On small or narrow networks it often does not: on the test suite's
12x12 blobs, a BadNet/Blend-backdoored ResNet-18 of width 4, 8 or 16 never exceeds xi = 0.6
(clean error 25-48% with all 20 layers amplified), nor does a VGG-16-BN of width 4 (47%), nor the
3-BN CNN (0%). Then ``k = L`` and all ``n`` models are the one all-layers model; PSC is that
model's confidence, and its AUROC fell *below* chance: 0.13 (ResNet-18 w4 Blend), 0.24 (w8
Blend), 0.30 (w4 BadNet), 0.65 (VGG w4 BadNet). A second failure: the amplified models may send
most clean inputs to one class (a MobileNetV2 of width 4 reached xi at ``k = 31`` of 52 layers,
but every amplified model put 83-89% of clean inputs in class 2 and triggered inputs out of the
target: AUROC 0.31). The reference has no answer for the first case (its search returns nothing)
and does not look for the second. Here the fit warns of both, and records them:
``fit_report_["degenerate"]`` and ``["degenerate_reasons"]`` (``"xi_not_reached"``,
``"models_coincide"``; also :attr:`IBDPSC.degenerate_reasons_`), ``["collapse"]`` (the class and
the smallest share, when every amplified model sends at least :data:`COLLAPSE_SHARE` of the clean
inputs to one class), ``["models"]`` (each amplified model's clean error and majority class);
:meth:`IBDPSC.fit_summary` (printed by ``badexpert defend``) says ``DEGENERATE`` and why, and
:meth:`IBDPSC.diagnostics` puts the same facts in an evaluation's ``defense.diagnostics``. The
CIFAR-10 ResNet-18 (width 8) Blend model of bench/RESULTS.md (AUROC 53.5%) was not kept, so its
``k`` could not be re-read here; its fit report (in the run's metrics) or a refit says which case.

Cost: 1 forward pass for the model's own label plus one per distinct amplified model (``n``
unless models coincide, see above); no backward pass. In front of a model
(:class:`badexpert.deploy.guard.Guard`) the first pass is the model's own.
"""

from __future__ import annotations

import math
import warnings
from typing import Annotated, ClassVar

import torch
from torch import nn

from ..data.core import batches
from ..errors import BadExpertError
from ..training import forward, model_outputs
from ..utils import eval_mode
from ..validation import NonNegativeInt, PositiveInt, Range
from .base import Detector


#: the share of the clean inputs that every amplified model must send to one same class for the fit
#: report to record a collapse (and warn): PSC then mostly tells whether an input's label is that class
COLLAPSE_SHARE = 0.8


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every BatchNorm layer of ``model`` that has an affine weight and bias,
    in module order (the last one is the layer closest to the output). Shared modules count once."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and m.bias is not None]


def _require_batchnorm(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = batchnorm_layers(model)
    if not layers:
        plain = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        found = f"found {plain} without affine weight and bias" if plain else "found none"
        raise BadExpertError(
            f"ibd_psc needs a model with BatchNorm layers ({found} in {type(model).__name__}); it amplifies their "
            "affine weights, so use a detector that works with any model (badexpert, strip, scale_up, teco)"
        )
    return layers


class IBDPSC(Detector):
    """IBD-PSC (Hou et al., ICML 2024): flag inputs whose prediction stays confident when BatchNorm parameters are amplified.

    See the module docstring for the method.

    Parameters
    ----------
    omega: the amplification factor of the BatchNorm weights and biases (reference: 1.5). Must
        be > 1: 1 would leave the model unchanged, and below 1 the layers are damped, not
        amplified, which is not the method.
    xi: the clean error rate, in (0, 1), that the first ``k`` amplified layers must exceed
        (reference: 0.6).
    n_models: the number ``n`` of amplified models whose probabilities are averaged (reference: 5).
        Changing it with :meth:`set_params` needs no refit; changing ``omega`` or ``xi`` does (they
        choose ``k``).
    batch_size: inputs per model forward pass.
    seed: recorded like every detector's; IBD-PSC draws nothing at random.
    device: where the model runs (``None``: CUDA when available).

    Fitted attributes: ``k_`` (the start index), ``bn_layers_`` (``L``), ``amplified_counts_``
    (the number of last layers each of the ``n`` models amplifies), ``fit_report_`` (the clean
    error rate of every amplification tried while choosing ``k``, each used model's error and
    majority class, and whether the fit degenerated), ``degenerate_`` / ``degenerate_reasons_``.

    Departures from the paper
    -------------------------
    - The score is ``-ln(1 - PSC)``, not PSC: the same order, without float32's ties near 1 (see
      the module docstring); PSC is :meth:`psc` and is in :meth:`score_details`.
    - The threshold comes from :meth:`Detector.calibrate` (the conformal quantile of clean
      scores) rather than the fixed PSC >= 0.9 (score >= ln 10).
    - Models with fewer than ``k + n`` BatchNorm layers: the missing models are the all-layers
      model again (capped, see the module docstring), run once and counted as often as they occur.
    - BatchNorm layers without affine parameters (``affine=False``) cannot be amplified and are not
      counted; a model without any affine BatchNorm layer is refused at fit time.
    - :attr:`cost` after fitting counts the distinct amplified models actually run (``1 + n``
      unless models coincide); before fitting it is ``1 + n``.
    - The error rate that chooses ``k`` is measured on the whole clean set given to :meth:`fit`;
      the search tries ``1..L`` layers (the reference ``1..L-1``) and, when none exceeds ``xi``,
      falls back to ``k = L`` with a warning and ``fit_report_["degenerate"]`` (the reference
      fails there).
    - Fitting also runs each amplified model once over the clean set, to record its error and
      majority class (the degeneration diagnostics above); the reference does not.
    """

    name: ClassVar[str] = "ibd_psc"
    shares_model_pass: ClassVar[bool] = True

    def __init__(
        self,
        *,
        omega: Annotated[float, Range(gt=1)] = 1.5,
        xi: Annotated[float, Range(gt=0, lt=1)] = 0.6,
        n_models: PositiveInt = 5,
        batch_size: PositiveInt = 256,
        seed: NonNegativeInt = 0,
        device: str | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, device=device)
        self.omega = omega
        self.xi = xi
        self.n_models = n_models
        self.check_params()

    @property
    def cost(self) -> dict[str, int]:
        """One pass for the model's own label plus one per distinct amplified model (``1 + n_models``
        before fitting, or when all ``n_models`` differ); no backward pass."""
        if hasattr(self, "k_"):
            return {"forward": 1 + len(set(self.amplified_counts_)), "backward": 0}
        return {"forward": 1 + int(self.n_models), "backward": 0}

    @property
    def amplified_counts_(self) -> list[int]:
        """How many of the last BatchNorm layers each of the ``n_models`` models amplifies."""
        return [min(self.k_ + j, self.bn_layers_) for j in range(1, int(self.n_models) + 1)]

    @property
    def degenerate_reasons_(self) -> list[str]:
        """Why the fitted detector is not the method its paper describes (empty: it is):
        ``"xi_not_reached"``: no number of amplified layers lifted the clean error above ``xi``, so
        ``k = L`` and every model amplifies all layers; ``"models_coincide"``: the ``n_models``
        amplified models are one model (``k + 1 >= L``), so PSC is a single model's confidence."""
        out = []
        if not (getattr(self, "fit_report_", None) or {}).get("reached_xi", True):
            out.append("xi_not_reached")
        if len(set(self.amplified_counts_)) == 1 < int(self.n_models):
            out.append("models_coincide")
        return out

    @property
    def degenerate_(self) -> bool:
        """Whether the fit degenerated (see :attr:`degenerate_reasons_`)."""
        return bool(self.degenerate_reasons_)

    def fit_summary(self) -> str:
        """``k``, the layers and models used, and a loud note when the fit degenerated."""
        self._check_fitted("fit_summary")
        distinct = len(set(self.amplified_counts_))
        out = (f"k={self.k_} of {self.bn_layers_} BatchNorm layers, {distinct} distinct amplified model"
               f"{'' if distinct == 1 else 's'} of {int(self.n_models)}")
        reasons = self.degenerate_reasons_
        if reasons:
            why = {"xi_not_reached": f"no amplification lifts the clean error above xi={self.xi}",
                   "models_coincide": "the amplified models are all the same model"}
            out += "; DEGENERATE: " + " and ".join(why[r] for r in reasons)
        collapse = (getattr(self, "fit_report_", None) or {}).get("collapse")
        if collapse:
            out += (f"; amplified models send {collapse['share']:.0%}+ of clean inputs to class "
                    f"{collapse['class']}")
        return out

    def diagnostics(self, clean: dict, triggered: dict) -> dict:
        """Recorded by evaluation: whether the fit degenerated and why, ``k``, the number of distinct
        amplified models, and the class the amplified models collapse clean inputs to (if any)."""
        report = getattr(self, "fit_report_", None) or {}
        return {"degenerate": self.degenerate_, "degenerate_reasons": self.degenerate_reasons_, "k": self.k_,
                "bn_layers": self.bn_layers_, "distinct_models": len(set(self.amplified_counts_)),
                "collapse": report.get("collapse")}

    # --- amplification -------------------------------------------------------------------
    def amplified_parameters(self, count: int, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """New tensors ``omega * weight`` and ``omega * bias`` of the last ``count`` BatchNorm layers
        of ``model`` (default: the fitted model), by parameter name: the override that
        :func:`torch.func.functional_call` runs the amplified model with."""
        if model is None:
            self._check_fitted("amplified_parameters")
            model = self.model_
        layers = batchnorm_layers(model)
        if not 0 <= count <= len(layers):
            raise BadExpertError(f"{self.name}: cannot amplify the last {count} of {len(layers)} BatchNorm layers")
        out = {}
        for name, m in layers[len(layers) - count:]:
            prefix = f"{name}." if name else ""
            out[prefix + "weight"] = m.weight.detach() * self.omega
            out[prefix + "bias"] = m.bias.detach() * self.omega
        return out

    def _amplified_logits(self, model: nn.Module, count: int, x: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call

        try:
            out = functional_call(model, self.amplified_parameters(count, model), (x,))
        except (RuntimeError, ValueError, IndexError) as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise BadExpertError(f"{self.name}: the model with amplified BatchNorm layers failed ({first})") from exc
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise BadExpertError(f"the model must return logits [N, classes], got {getattr(out, 'shape', type(out).__name__)}")
        return out

    # --- fitting -------------------------------------------------------------------------
    def _fit(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
        classes = model_outputs(model, images, labels)  # the model takes these images, labels within its classes
        if classes < 2:
            raise BadExpertError(f"ibd_psc needs a classifier with at least 2 classes, got {classes} output(s)")
        layers = _require_batchnorm(model)
        total = len(layers)
        data = list(batches(images, labels, batch_size=self.batch_size, device=self.device_))

        hist: dict[int | None, torch.Tensor] = {}

        @torch.no_grad()
        def error(count: int | None) -> float:
            wrong, seen = 0, torch.zeros(classes, dtype=torch.long)
            with eval_mode(model):
                for xb, yb in data:
                    logits = forward(model, xb) if count is None else self._amplified_logits(model, count, xb)
                    pred = logits.argmax(1)
                    wrong += int((pred != yb).sum())
                    seen += torch.bincount(pred.cpu(), minlength=classes)[:classes]
            hist[count] = seen
            return wrong / len(images)

        base = error(None)
        if base > self.xi:
            warnings.warn(
                f"IBD-PSC: the model already misclassifies {base:.1%} of the clean set, more than xi={self.xi}; "
                "check that the clean data and its labels match the model",
                stacklevel=3,
            )
        tried, k = [], None
        for count in range(1, total + 1):
            err = error(count)
            tried.append({"layers": count, "error": err})
            if err > self.xi:
                k = count
                break
        reached = k is not None
        if not reached:
            warnings.warn(
                f"IBD-PSC: amplifying up to all {total} BatchNorm layers by omega={self.omega} leaves the clean error "
                f"rate at {max(t['error'] for t in tried):.1%}, never above xi={self.xi}; every model amplifies all "
                "layers. A larger omega or a smaller xi amplifies further.",
                stacklevel=3,
            )
            k = total
        self.k_ = int(k)
        self.bn_layers_ = int(total)
        # how each amplified model actually used answers on the clean set: its error and the class it
        # sends most clean inputs to (one extra pass over the clean set per model not tried above)
        errors = {t["layers"]: t["error"] for t in tried}
        models = []
        for count in sorted(set(self.amplified_counts_)):
            err = errors[count] if count in errors else error(count)
            top = int(hist[count].argmax())
            models.append({"layers": count, "error": err, "majority_class": top,
                           "majority_share": float(hist[count][top]) / len(images)})
        shares = [m["majority_share"] for m in models]
        tops = {m["majority_class"] for m in models}
        collapse = ({"class": tops.pop(), "share": min(shares)}
                    if len(tops) == 1 and min(shares) >= COLLAPSE_SHARE else None)
        self.fit_report_ = {"clean_size": int(len(images)), "bn_layers": total, "clean_error": base,
                            "errors": tried, "k": self.k_, "reached_xi": reached,
                            "amplified_counts": self.amplified_counts_, "models": models,
                            "distinct_models": len(models), "collapse": collapse}
        reasons = self.degenerate_reasons_  # from the report just written
        self.fit_report_.update(degenerate=bool(reasons), degenerate_reasons=reasons)
        if reached and len(models) == 1 < int(self.n_models):
            warnings.warn(
                f"IBD-PSC: degenerate: the clean error first exceeds xi={self.xi} at k={self.k_} of {total} BatchNorm "
                f"layers, so all {int(self.n_models)} amplified models (the last k+1 .. k+n layers, capped at {total}) are "
                "the same model and PSC is one model's confidence, not a consistency over amplifications",
                stacklevel=3,
            )
        if collapse is not None:
            names = self.data_info_.get("classes") if hasattr(self, "data_info_") else None
            label = names[collapse["class"]] if names and collapse["class"] < len(names) else collapse["class"]
            warnings.warn(
                f"IBD-PSC: every amplified model sends at least {collapse['share']:.0%} of the clean inputs to class "
                f"{label}: PSC then mostly says whether the model's own label is that class; unless it is the "
                "attack's target, triggered inputs score low (AUROC below 0.5)",
                stacklevel=3,
            )

    # --- scoring -------------------------------------------------------------------------
    @torch.no_grad()
    def _log_terms(self, xb: torch.Tensor, logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``ln p_j`` and ``ln(1 - p_j)``, each ``[len(xb), n_models]`` float64 (CPU): ``p_j`` is the
        softmax probability that amplified model j gives the original model's label, for a
        checked, finite float batch on the detector's device. Both come from the logits in log
        space (exact where ``p_j`` rounds to 1)."""
        model = self.model_
        counts = self.amplified_counts_
        with eval_mode(model):
            if logits is None:
                logits = forward(model, xb)
            label = logits.argmax(1).to(xb.device)[:, None]
            by_count = {}
            for c in sorted(set(counts)):
                z = self._amplified_logits(model, c, xb).double()
                total = z.logsumexp(dim=1)
                own = z.gather(1, label)[:, 0]
                others = z.scatter(1, label, float("-inf")).logsumexp(dim=1)
                by_count[c] = ((own - total).cpu(), (others - total).cpu())
        logp = torch.stack([by_count[c][0] for c in counts], dim=1)
        log1mp = torch.stack([by_count[c][1] for c in counts], dim=1)
        return logp, log1mp

    @staticmethod
    def score_from_terms(log1mp: torch.Tensor) -> torch.Tensor:
        """``-ln(1 - PSC)`` from the ``[N, n]`` terms ``ln(1 - p_j)``: ``1 - PSC`` is the mean of the
        ``1 - p_j``, so ``ln(1 - PSC) = logsumexp_j ln(1 - p_j) - ln n``."""
        return -(log1mp.logsumexp(dim=1) - math.log(log1mp.shape[1]))

    def _per_input(self, x, fn, width: int) -> torch.Tensor:
        images, bad = self._scorable(x)
        parts = [fn(xb) for xb in self._batches(images)]
        out = torch.cat(parts) if parts else torch.empty(0, width, dtype=torch.float64)
        out[bad] = float("nan")
        return out

    @torch.no_grad()
    def model_probabilities(self, x) -> torch.Tensor:
        """``[N, n_models]`` float64: for each input, the probability each amplified model gives the
        original model's label (PSC = the row mean); NaN rows for inputs that cannot be scored."""
        self._check_fitted("model_probabilities")
        return self._per_input(x, lambda xb: self._log_terms(xb)[0].exp(), int(self.n_models))

    def psc(self, x) -> torch.Tensor:
        """PSC per input (float64, in ``[0, 1]``; NaN for inputs that cannot be scored): the paper's
        statistic, of which the score is ``-ln(1 - PSC)``."""
        return self.model_probabilities(x).mean(dim=1)

    def _score_batch(self, xb: torch.Tensor) -> torch.Tensor:
        return self.score_from_terms(self._log_terms(xb)[1])

    def score_given_logits(self, xb: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return self.score_from_terms(self._log_terms(xb, logits)[1])

    @torch.no_grad()
    def score_details(self, x) -> dict:
        """``score`` (``-ln(1 - PSC)``), ``psc`` and the ``model_probabilities`` ``[N, n_models]``
        whose mean PSC is (numpy)."""
        self._check_fitted("score_details")
        n = int(self.n_models)
        terms = self._per_input(x, lambda xb: torch.cat(self._log_terms(xb), dim=1), 2 * n)
        probs = terms[:, :n].exp()
        return {"score": self.score_from_terms(terms[:, n:]).float().numpy(), "psc": probs.mean(dim=1).numpy(),
                "model_probabilities": probs.numpy()}

    # --- persistence ---------------------------------------------------------------------
    def _state_meta(self) -> dict:
        return {"k": self.k_, "bn_layers": self.bn_layers_, "fit_report": self.fit_report_}

    def _load_state(self, model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        k, total = meta.get("k"), meta.get("bn_layers")
        if not (_int(k) and _int(total) and 1 <= k <= total):
            raise BadExpertError("the IBD-PSC detector file lacks a valid start index k and BatchNorm layer count; it is damaged")
        have = len(batchnorm_layers(model))
        if have != total:
            raise BadExpertError(
                f"the IBD-PSC detector was fitted on a model with {total} BatchNorm layers but this model has {have}; "
                "load it with the model it was fitted on"
            )
        self.k_ = int(k)
        self.bn_layers_ = int(total)
        self.fit_report_ = meta.get("fit_report") or {}


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) or (isinstance(v, float) and math.isfinite(v) and v.is_integer())


__all__ = ["COLLAPSE_SHARE", "IBDPSC", "batchnorm_layers"]
