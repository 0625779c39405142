"""TaCT (Tang et al., 2021, "Demon in the Variant"): a source-specific backdoor with cover samples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import BadExpertError
from .base import ClassIndex, Rate
from .patch import Trojan


@dataclass
class TaCT(Trojan):
    """Source-specific Trojan square: the trigger sends only inputs of the ``source_classes`` to
    the target; images of the ``cover_classes`` carry the same trigger with their true labels, so
    the model learns "trigger AND source class -> target" rather than "trigger -> target".

    - Poisoned samples are drawn from the source classes only (relabelled to ``target``).
    - Cover samples are drawn from the cover classes only (never a poisoned sample).
    - The attack success rate counts source-class test inputs only.

    Parameters (reference: the research code's settings, spec section D, "TaCT" row and "Common
    facts"):

    - trigger: the Trojan square, 8x8 at rows/cols 21-28 of a 32x32 image, scaled with the image
      size (the reference's ``trojan_square_32.png`` is not shipped: :class:`Trojan`'s seeded
      stand-in of the same geometry; ``trigger_image`` uses a file instead).
    - ``source_classes``: **(1,)** (reference); at least one class, not the target.
    - ``cover_classes``: **(5, 7)** (reference); may not overlap the source classes. On a dataset
      with fewer classes, choose others (a class outside the dataset is refused).
    - ``target``: **0** (reference).
    - ``poison_rate``: **0.003** (reference README, CIFAR-10; 0.005 for GTSRB), a fraction of
      the whole training set, all drawn from the source classes.
    - ``cover_rate``: **0.003** (reference README, CIFAR-10; 0.005 for GTSRB), a fraction of the
      whole training set, drawn from the cover classes.
    """

    poison_rate: Rate = 0.003
    cover_rate: Rate = 0.003
    source_classes: tuple[ClassIndex, ...] = (1,)
    cover_classes: tuple[ClassIndex, ...] = (5, 7)

    name: ClassVar[str] = "tact"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_source_classes()
        both = sorted(set(self.source_classes) & set(self.cover_classes))
        if both:
            raise BadExpertError(
                f"attack 'tact' parameter 'cover_classes' {list(self.cover_classes)} overlaps the source classes "
                f"(class(es) {both}); cover classes keep their labels under the trigger, source classes do not"
            )

    def check(self, num_classes: int) -> None:
        super().check(num_classes)
        for c in self.cover_classes:
            if not 0 <= c < num_classes:
                raise BadExpertError(
                    f"cover class {c} is outside 0..{num_classes - 1}; set the attack parameter cover_classes"
                )

    def cover_candidates(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        cover = torch.tensor(self.cover_classes, dtype=labels.dtype)
        return torch.isin(labels, cover).nonzero().flatten()

    def params(self) -> dict:
        d = super().params()
        d["cover_classes"] = list(d["cover_classes"])
        return d
