"""SSDT, the source-specific dynamic trigger: the input-aware attack's per-input learned triggers,
made to flip only the source classes to the target (cover samples of the other classes carry
their own generated triggers and keep their labels)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import BadExpertError
from .base import ClassIndex, Rate
from .dynamic import Dynamic


@dataclass
class SSDT(Dynamic):
    """Source-specific dynamic trigger: learned per-input triggers that flip only the source classes.

    :class:`Dynamic`'s generators and two-stage training, with the backdoor restricted to the
    ``source_classes``. The classifier learns "*its own*
    generated trigger AND a source class -> target": the same trigger on an image of another
    class changes nothing, so the backdoor stays silent on most triggered inputs, and detectors
    that look for "any input with this perturbation flips" see cover inputs that do not flip.

    **Training** (:meth:`~Dynamic.implant`, shared with Dynamic): stage 1 pretrains and freezes
    the mask generator, stage 2 trains the classifier and the pattern generator jointly. In every
    batch (after augmentation), from one random order drawn from the training loop's seeded
    generator:

    - ``round(poison_rate * B)`` **backdoor** samples among the source-class samples of the batch
      get their own trigger ``x + (G(x) - x) m(x)`` and the label ``target``;
    - ``round(cover_rate * B)`` **cover** samples among the samples of every other class except
      the target (:meth:`cover_candidates`) get *their own* generated trigger and keep their
      labels;
    - ``round(cross_rate * B)`` **cross-trigger** samples among the rest get the trigger of another
      random image of the batch and keep their labels (Dynamic's, which keeps the trigger
      input-specific).

    The loss is the classifier's cross-entropy plus ``lambda_div`` times the diversity loss, as in
    Dynamic. The attack success rate counts source-class test inputs only (:meth:`counts`).

    **State**: the trained generators, saved with the model (as Dynamic's).

    Parameters (Dynamic's, plus):

    - ``source_classes``: **(1,)** (as TaCT's reference); at least one class, not the target.
    - ``poison_rate``: **0.02** per batch. The samples come from the source classes only: with ten
      balanced classes a batch holds about 10% of them, so 0.02 triggers about a fifth of the
      source-class samples a batch holds (Dynamic's 0.1 would trigger nearly all of them and wipe
      out the source class's clean accuracy).
    - ``cover_rate``: **0.05** per batch; ``cross_rate``: **0.05** per batch. The three rates
      add up to at most 1.
    - the generators' parameters: Dynamic's CPU-friendly defaults.

    Departures: SSDT is named by the TED++ evaluation (2025) as one of two source-specific attacks
    that break most input detectors; its construction here follows that description
    (input-aware generators, source-specific poisoning, covers carrying their own triggers),
    not a reference implementation, and its rates are this project's choices. Static
    :meth:`poison` after implanting (not used by :meth:`implant`) draws cover samples from the
    same classes, each with its own trigger.
    """

    poison_rate: Rate = 0.02
    cover_rate: Rate = 0.05
    cross_rate: Rate = 0.05
    source_classes: tuple[ClassIndex, ...] = (1,)

    name: ClassVar[str] = "ssdt"
    second_batch_rate: ClassVar[str] = "cover_rate"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_source_classes()
        if self.poison_rate + self.cover_rate + self.cross_rate > 1 + 1e-9:
            raise BadExpertError(
                f"attack '{self.name}' parameters 'poison_rate' ({self.poison_rate:g}), 'cover_rate' "
                f"({self.cover_rate:g}) and 'cross_rate' ({self.cross_rate:g}) add up to more than 1 per batch; "
                "lower one of them"
            )

    def cover_candidates(self, labels: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
        """Samples of every class that is neither a source class nor the target."""
        sources = torch.tensor(self.source_classes, dtype=labels.dtype)
        return (~torch.isin(labels, sources) & (labels != self.target)).nonzero().flatten()

    def trigger_cover(self, x, parts, generator):
        """A cover sample carries its own generated trigger (label kept)."""
        return self.trigger(x, parts)

    def batch_plan(self, batch_size: int) -> list[tuple[str, str, int]]:
        n_bd, n_cover = self.per_batch(batch_size)
        return [("poisoned_per_batch", "backdoor", n_bd), ("cover_per_batch", "cover", n_cover),
                ("cross_per_batch", "cross-trigger", int(round(self.cross_rate * batch_size)))]

    def batch_samples(self, y, generator):
        """Backdoor samples (source classes, own trigger, relabelled), cover samples (other
        classes, own trigger, labels kept), then cross-trigger samples among the rest (a random
        partner's trigger, labels kept); see the class docstring."""
        n = len(y)
        backdoor, cover = self.batch_roles(y, generator)
        taken = torch.zeros(n, dtype=torch.bool)
        taken[backdoor] = True
        taken[cover] = True
        order = torch.randperm(n, generator=generator)
        n_cross = int(round(self.cross_rate * n)) if n >= 2 else 0
        cross = order[~taken[order]][:n_cross]
        partners = self.partners(cross, n, generator)
        return torch.cat([backdoor, cover, cross]), torch.cat([backdoor, cover, partners]), backdoor
