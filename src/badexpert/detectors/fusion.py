"""Fusion: several detectors of different kinds as one, each judged by its own clean scores.

No single input detector covers every trigger: BaDExpert reads what the model has learned and is
weakest against an attacker who trains the backdoor to fade in a simulated backdoor expert
(``expert_aware``), while Frequency never looks at the model and reads the trigger's
high-frequency artifacts, which that attacker does nothing to hide. ``fusion`` runs its members
side by side and rejects an input that *any* of them finds unusually suspicious, with one
threshold that keeps the false-positive rate of the whole at the target.

Scores on different scales are made comparable by ranking each against the member's own scores on
clean inputs it was not fitted on (its *references*). For a member with sorted reference scores
``r_1 <= ... <= r_n`` and an input with score ``s``:

1. ``above(s)``: how many references lie strictly above ``s``, interpolated linearly between
   neighbouring references (so the score stays continuous): 0 from ``r_n`` on, ``n - 1`` at
   ``r_1`` and below it (flat there: the least suspicious inputs need no ranking);
2. the conformal p-value ``p(s) = (1 + above(s)) / (n + 1)``: the share of clean inputs at least as
   suspicious, by the member's own standard;
3. past the largest reference, an exponential tail: ``p(s) = exp(-(s - r_n) / tau) / (n + 1)``,
   where ``tau`` is the mean excess of the top tenth of the references over their 90% quantile
   (the scale of an exponential fitted to the upper tail), so inputs beyond every reference are
   still ranked by how far beyond they are, rather than tied;
4. the member's *surprise* ``-log p(s)``, and the fused score: the **largest surprise over the
   members** (higher = more suspicious). ``-log`` of the smallest p-value is the union rule's
   statistic (reject when any member's p-value is small); the threshold is then the usual
   conformal quantile of the fused scores (:meth:`Detector.calibrate`), so it accounts for the
   members' dependence exactly, where Bonferroni's ``fpr / k`` per member would be conservative.

Fitting: the reserved clean set is split once (seeded): ``1 - reference_share`` of it fits every
member (each on the same images, as if it ran alone), the rest gives the references. References on
the members' own fitting images would be biased (BaDExpert's expert was finetuned on those very
images, Frequency's CNN trained on them), so they are held out. By default
(``reference_population="correct"``, the population :meth:`Detector.calibrate` uses by default)
only the held-out images the suspect model classifies correctly are references: a clean image the
model gets wrong looks suspicious to a member that reads the model (BaDExpert scores it high), and
ranking against those would make that member's p-values far too large on the inputs the threshold
is calibrated for, so the other member would decide alone (measured: BPP on Fashion-MNIST let
about 55% of its inputs through with every held-out image as a reference, 7% with BaDExpert alone). ``"all"`` keeps every held-out image, for
a fusion calibrated with ``population="all"``. Calibration is then the contract's,
on the disjoint calibration split: the fused score is fixed before it, which is all the conformal
guarantee needs. A member that never uses the suspect model (Frequency) depends only on its
parameters and images, so within one process it is fitted once per split and reused (moved to the
next model) by later fusions: a grid's cells share it.

Parameters: ``members`` names registered detectors (at least two, each once; a fusion is not a
member); ``member_params`` gives each its parameters (``{"badexpert": {"preset": "auto"}}``); every
member gets the fusion's ``seed`` and ``device`` unless its parameters say otherwise. Cost: the sum
of the members' costs, the model's own pass counted once (it runs once per batch and its logits go
to every member that reads them, as in a guard). Saved, bundled and served like any detector (each member's
state is stored inside the fusion's file); not exported to ONNX (the rank transform is not part of
the exported scorers), so a guard for it runs as a bundle (``badexpert serve``).

This is a defensive variant of this package, not a published method; ``bench/RESULTS.md``
(adaptive attacks) says where it was measured and what it costs on the ordinary attacks.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal

import torch
from torch import nn

from ..data.core import Dataset
from ..errors import BadExpertError
from ..utils import eval_mode
from ..validation import NonNegativeInt, PositiveInt, Range
from .base import CALIBRATION_POPULATIONS, DEFAULT_POPULATION, Detector, correctly_classified

#: The share of the top references whose mean excess sets the exponential tail's scale.
TAIL_SHARE = 0.1
#: The fewest references a member is ranked against.
MIN_REFERENCES = 10


def surprise(scores: torch.Tensor, references: torch.Tensor, tail_scale: float) -> torch.Tensor:
    """``-log p`` of ``scores`` against the sorted clean ``references`` (see the module docstring):
    continuous and non-decreasing in the score; ``log(n + 1)`` at the largest reference, growing by
    one every ``tail_scale`` beyond it. NaN scores stay NaN."""
    ref = references.double()
    s = scores.double()
    n = ref.numel()
    j = torch.searchsorted(ref, s.contiguous(), right=True)  # references <= s
    lo = ref[(j - 1).clamp(0, n - 1)]
    hi = ref[j.clamp(0, n - 1)]
    gap = (hi - lo).clamp_min(torch.finfo(torch.float64).tiny)
    frac = ((s - lo) / gap).clamp(0, 1)
    above = torch.where(j >= n, torch.zeros_like(s), torch.where(j == 0, torch.full_like(s, float(n - 1)), (n - j) - frac))
    tail = (s - ref[-1]).clamp_min(0) / tail_scale
    out = math.log(n + 1) - torch.log1p(above) + tail
    return torch.where(torch.isnan(s), s, out)


def tail_scale(references: torch.Tensor) -> float:
    """The exponential tail's scale: the mean excess of the references above their ``1 -
    TAIL_SHARE`` quantile (falling back to their standard deviation, then 1, when they do not
    spread)."""
    ref = references.double().sort().values
    q = ref[min(len(ref) - 1, int(math.floor((1 - TAIL_SHARE) * len(ref))))]
    excess = ref[ref > q] - q
    for value in (excess.mean() if excess.numel() else torch.tensor(0.0), ref.std() if len(ref) > 1 else torch.tensor(0.0)):
        if math.isfinite(float(value)) and float(value) > 0:
            return float(value)
    return 1.0


#: Model-free members fitted in this process, by what their fit depends on (see :func:`_fit_model_free`).
_MODEL_FREE_FITS: dict[str, tuple[dict[str, torch.Tensor], dict]] = {}
_MODEL_FREE_KEEP = 4


def _fit_model_free(member: Detector, model: nn.Module, fit_set) -> Detector:
    """``member`` (a detector that never uses the suspect model: Frequency) fitted on ``fit_set``,
    or the same fit made earlier in this process, moved to ``model``. Its fit depends only on its
    parameters and the data (seeded, so refitting gives the same detector), so the fusions of one
    split (a grid's cells, one per suspect model) fit it once instead of once per model."""
    from ..attacks.components import tensor_digest
    from ..data.core import as_tensors
    from ..digests import json_digest
    from .base import detector_from_state

    images, labels = as_tensors(fit_set)
    key = json_digest({"detector": member.name,
                       "params": {k: v for k, v in member.get_params().items() if k != "device"},
                       "data": tensor_digest({"images": images, "labels": labels}),
                       "hflip": bool(fit_set.hflip) if isinstance(fit_set, Dataset) else False,
                       "classes": list(fit_set.classes) if isinstance(fit_set, Dataset) else None})
    if key in _MODEL_FREE_FITS:
        tensors, meta = _MODEL_FREE_FITS[key]
        return detector_from_state(tensors, meta, model, device=member.device, rebind=True)
    member.fit(model, fit_set)
    _MODEL_FREE_FITS[key] = member.to_state(extra={})
    while len(_MODEL_FREE_FITS) > _MODEL_FREE_KEEP:
        _MODEL_FREE_FITS.pop(next(iter(_MODEL_FREE_FITS)))
    return member


class Fusion(Detector):
    """Several registered detectors as one: an input is as suspicious as its most surprised member.

    members: the detectors to fuse, by registered name (at least two, each once; default BaDExpert
        and Frequency: one that reads the model, one that reads only the image).
    member_params: each member's constructor parameters, by member name (default: each member's
        defaults; ``seed`` and ``device`` default to the fusion's).
    reference_share: the share of the reserved clean set held out from the members' fitting to rank
        their scores (default 0.2; at least 10 reference images).
    reference_population: which held-out images are references: ``"correct"`` (default) those the
        suspect model classifies correctly, as :meth:`~Detector.calibrate`'s default population;
        ``"all"`` every one (for a fusion calibrated with ``population="all"``).
    """

    name: ClassVar[str] = "fusion"

    def __init__(
        self, *,
        members: tuple[str, ...] = ("badexpert", "frequency"),
        member_params: dict[str, dict] | None = None,
        reference_share: Annotated[float, Range(gt=0, lt=1)] = 0.2,
        reference_population: Literal[CALIBRATION_POPULATIONS] = DEFAULT_POPULATION,
        batch_size: PositiveInt = 256, seed: NonNegativeInt = 0, device: str | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, device=device)
        self.members = tuple(members) if isinstance(members, (list, tuple)) else members
        self.member_params = member_params
        self.reference_share = reference_share
        self.reference_population = reference_population

    # --- configuration -------------------------------------------------------------------
    def check_params(self) -> "Fusion":
        from . import DETECTORS

        super().check_params()
        names = [DETECTORS.canonical(m) for m in self.members]
        if len(names) < 2:
            raise BadExpertError(f"detector 'fusion': members needs at least two detectors, got {list(self.members)}")
        if len(set(names)) != len(names):
            raise BadExpertError(f"detector 'fusion': members names a detector twice ({list(self.members)}); "
                                 "fuse different detectors")
        if self.name in names:
            raise BadExpertError("detector 'fusion': a fusion cannot be a member of a fusion; list its members instead")
        self.members = tuple(names)
        params = dict(self.member_params or {})
        keys = {}
        for key in params:
            canonical = DETECTORS.canonical(key)
            if canonical not in names:
                raise BadExpertError(f"detector 'fusion': member_params names '{key}', which is not among the "
                                     f"members {list(names)}")
            if not isinstance(params[key], dict):
                raise BadExpertError(f"detector 'fusion': member_params['{key}'] must be an object of that "
                                     f"detector's parameters, got {type(params[key]).__name__}")
            keys[canonical] = params[key]
        self.member_params = keys or None
        self._build_members()  # each member's parameters checked now, with its own one-line errors
        return self

    def _member_kwargs(self, name: str) -> dict[str, Any]:
        return {"seed": self.seed, "device": self.device, **(self.member_params or {}).get(name, {})}

    def _build_members(self) -> list[Detector]:
        from . import get_detector

        return [get_detector(name, **self._member_kwargs(name)) for name in self.members]

    def _members(self) -> list[Detector]:
        return getattr(self, "members_", None) or self._build_members()

    @property
    def cost(self) -> dict[str, int]:
        """The members' costs added up, with the model's own pass counted once: members that read
        the model's logits (:attr:`Detector.shares_model_pass`) share one pass."""
        members = self._members()
        sharing = sum(bool(m.shares_model_pass) for m in members)
        return {"forward": sum(m.cost["forward"] for m in members) - sharing + (1 if sharing else 0),
                "backward": sum(m.cost["backward"] for m in members)}

    @property
    def shares_model_pass(self) -> bool:  # type: ignore[override]
        """Whether a member reads the model's logits (a guard's pass is then shared with it)."""
        return any(m.shares_model_pass for m in self._members())

    @property
    def score_kind(self) -> str:
        return "fusion of " + " and ".join(self.members)

    # --- fitting -------------------------------------------------------------------------
    def fit(self, model: nn.Module, clean) -> "Fusion":
        self._fit_data = clean  # the members fit on the Dataset itself (its flips and classes)
        try:
            return super().fit(model, clean)
        finally:
            del self._fit_data

    def _fit(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
        n = len(images)
        n_ref = int(round(self.reference_share * n))
        if n_ref < MIN_REFERENCES or n - n_ref < 2:
            raise BadExpertError(
                f"detector 'fusion': {n} reserved clean images leave {n_ref} to rank the members' scores and "
                f"{n - n_ref} to fit them; give at least {MIN_REFERENCES} of each share (more clean data, or "
                "another reference_share)")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        fit_idx, ref_idx = order[n_ref:].sort().values, order[:n_ref].sort().values
        clean = self._fit_data
        fit_set = clean.subset(fit_idx) if isinstance(clean, Dataset) else (images[fit_idx], labels[fit_idx])
        members = []
        for m in self._build_members():
            try:
                members.append(m.fit(model, fit_set) if m.uses_model else _fit_model_free(m, model, fit_set))
            except BadExpertError as exc:
                raise BadExpertError(f"fusion member '{m.name}', fitted on {n - n_ref} of the {n} reserved images "
                                     f"(the rest rank its scores): {exc}") from exc
        self.members_ = members
        if self.reference_population == "correct":
            right = correctly_classified(model, images[ref_idx], labels[ref_idx], batch_size=self.batch_size)
            ref_idx = ref_idx[right]
            if len(ref_idx) < MIN_REFERENCES:
                raise BadExpertError(
                    f"detector 'fusion': the model classifies {len(ref_idx)} of its {n_ref} held-out reference images "
                    f"correctly, fewer than {MIN_REFERENCES}; check that the labels belong to this model's classes, "
                    "give more clean data, or use reference_population='all'")
        refs = [m.score(images[ref_idx]).double() for m in members]
        for m, r in zip(members, refs):
            if not bool(torch.isfinite(r).all()):
                raise BadExpertError(f"detector 'fusion': member '{m.name}' gave non-finite scores to clean reference "
                                     "images; its models are broken")
        self.references_ = [r.sort().values for r in refs]
        self.tail_scales_ = [tail_scale(r) for r in refs]
        self.fit_report_ = {
            "references": len(ref_idx), "held_out": n_ref, "fitting_images": n - n_ref,
            "tail_scales": {m.name: t for m, t in zip(members, self.tail_scales_)},
            "members": {m.name: m.fit_report() for m in members if m.fit_report()},
        }

    def fit_summary(self) -> str:
        parts = [f"{m.name}: {m.fit_summary()}" for m in getattr(self, "members_", []) if m.fit_summary()]
        return "; ".join(parts)

    # --- scoring -------------------------------------------------------------------------
    def _surprises(self, member_scores: list[torch.Tensor]) -> torch.Tensor:
        """``[members, N]`` surprises of the members' raw scores."""
        return torch.stack([surprise(s, r, t) for s, r, t in zip(member_scores, self.references_, self.tail_scales_)])

    @staticmethod
    def _fuse(surprises: torch.Tensor) -> torch.Tensor:
        fused = surprises.amax(0)
        return torch.where(torch.isnan(surprises).any(0), torch.full_like(fused, float("nan")), fused)

    def _member_batch(self, xb: torch.Tensor, logits: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Each member's raw scores for a batch, the model run once for all the members that read
        its logits."""
        if logits is None and self.shares_model_pass:
            with eval_mode(self.model_):
                logits = self.model_(xb).float()
        return [(m.score_given_logits(xb, logits) if logits is not None and m.shares_model_pass else m._score_batch(xb))
                .double() for m in self.members_]

    def _score_batch(self, xb: torch.Tensor) -> torch.Tensor:
        return self._fuse(self._surprises(self._member_batch(xb))).float()

    def score_given_logits(self, xb: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return self._fuse(self._surprises(self._member_batch(xb, logits))).float()

    def score_details(self, x) -> dict:
        """The fused ``score`` and, per member, its raw score (``<member>_score``) and surprise
        (``<member>_surprise``): which member found an input suspicious, and how much."""
        self._check_fitted("score_details")
        images, bad = self._scorable(x)
        raw = [[] for _ in self.members_]
        with torch.no_grad():
            for xb in self._batches(images):
                for out, scores in zip(raw, self._member_batch(xb)):
                    out.append(scores.cpu())
        member_scores = [torch.cat(r) if r else torch.empty(0, dtype=torch.float64) for r in raw]
        for s in member_scores:
            s[bad] = float("nan")
        surprises = self._surprises(member_scores)
        out = {"score": self._fuse(surprises).float().numpy()}
        for i, m in enumerate(self.members_):
            out[f"{m.name}_score"] = member_scores[i].numpy()
            out[f"{m.name}_surprise"] = surprises[i].numpy()
        return out

    def diagnostics(self, clean: dict, triggered: dict) -> dict[str, Any]:
        """Which member is the most surprised, as a share of the clean and of the triggered test
        inputs: the member that carried the fusion on this attack."""
        import numpy as np

        names = [m.name for m in self.members_]

        def shares(details: dict) -> dict[str, float]:
            s = np.stack([np.asarray(details[f"{n}_surprise"], dtype=float) for n in names])
            ok = ~np.isnan(s).any(0)
            if not ok.any():
                return {}
            top = s[:, ok].argmax(0)
            return {n: float((top == i).mean()) for i, n in enumerate(names)}

        if not all(f"{n}_surprise" in clean for n in names):
            return {}
        return {"most_surprised_member": {"clean": shares(clean), "triggered": shares(triggered)}}

    # --- persistence ---------------------------------------------------------------------
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for i, m in enumerate(self.members_):
            member_tensors, _ = m.to_state(extra={})
            tensors.update({f"member{i}.{k}": v for k, v in member_tensors.items()})
            tensors[f"reference{i}"] = self.references_[i]
        return tensors

    def _state_meta(self) -> dict[str, Any]:
        return {"members": [m.to_state(extra={})[1] for m in self.members_], "tail_scales": list(self.tail_scales_),
                "fit_report": self.fit_report_}

    def _load_state(self, model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        from ..metadata import check_fields
        from .base import check_detector_meta, detector_from_state

        source = "detector 'fusion'"
        check_fields(meta, {"members": list[dict], "tail_scales": list[float], "fit_report": dict}, source,
                     "rebuild it with `badexpert defend`")
        if [m.get("detector") for m in meta["members"]] != list(self.members) or \
                len(meta["tail_scales"]) != len(self.members):
            raise BadExpertError(f"{source}: the saved members do not match its parameters {list(self.members)}; "
                                 "the file is damaged")
        members, refs = [], []
        for i, member_meta in enumerate(meta["members"]):
            prefix = f"member{i}."
            sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            check_detector_meta(member_meta, f"{source}, member {i}", "rebuild it with `badexpert defend`")
            members.append(detector_from_state(sub, member_meta, model, device=self.device,
                                               source=f"{source}, member '{member_meta['detector']}'"))
            ref = tensors.get(f"reference{i}")
            if ref is None or ref.ndim != 1 or ref.numel() < MIN_REFERENCES or not ref.is_floating_point() \
                    or not bool(torch.isfinite(ref).all()) or not bool((ref[1:] >= ref[:-1]).all()):
                raise BadExpertError(f"{source}: member {i}'s reference scores are missing or malformed; the file is damaged")
            refs.append(ref.double())
        scales = [float(t) for t in meta["tail_scales"]]
        if not all(math.isfinite(t) and t > 0 for t in scales):
            raise BadExpertError(f"{source}: its tail scales must be positive numbers; the file is damaged")
        self.members_, self.references_, self.tail_scales_ = members, refs, scales
        self.fit_report_ = meta["fit_report"]


__all__ = ["Fusion", "surprise", "tail_scale"]
