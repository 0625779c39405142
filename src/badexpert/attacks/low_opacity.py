"""Low-opacity Blend: a backdoor planted at the usual opacity and triggered at test time with a
weaker blend (the low-opacity adaptive attack of the BaDExpert evaluation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import BadExpertError
from .base import Rate
from .blend import Blend


@dataclass
class LowOpacity(Blend):
    """Blend trained at the usual opacity and triggered at test time with a weaker blend.

    Poisoned training samples get ``(1 - train_alpha) x + train_alpha t``, test inputs
    ``(1 - alpha) x + alpha t`` with the same key ``t``. A weaker test trigger moves backdoor
    inputs toward clean ones, so a detector must separate inputs on which the backdoor is
    only just active (the model generalises from the training opacity down to the test one).

    **Why an attack of its own.** :class:`Blend` already separates the two opacities (its
    ``train_alpha`` and ``alpha``), so the mechanism is Blend's; this class registers the adaptive
    attack under its own name with the reference defaults and the one rule that makes it
    low-opacity (the test opacity below the training one), so that benchmark grids and
    comparisons report it as its own row. A test-opacity parameter added to the patch attacks
    (BadNet, Trojan) would change every existing attack's record, and with it the key of every
    suspect model already trained and cached; a user who wants a weaker test patch can pass
    ``opacity`` to ``trojan`` / ``badnet`` for both phases, or use this attack's blend.

    Parameters:

    - ``train_alpha``: training opacity, **0.2**, the research code's Blend opacity (the
      BaDExpert paper's low-opacity attack is described second-hand, in this project's issue 20,
      as Blend trained at 0.2 and tested at a lower opacity; the paper's own text on it could not
      be obtained).
    - ``alpha``: test opacity, **0.15**, strictly below ``train_alpha``. The paper's exact test
      opacity could not be established (only its opening pages and its headline figure, about
      98.4% AUROC against this attack, were retrievable); 0.15 is this project's choice: a
      Fashion-MNIST CNN poisoned at 1% (opacity 0.2, four epochs) sends 99% of triggered test
      inputs to the target at 0.2, 94% at 0.15, 73% at 0.12 and 49% at 0.1, so 0.15 is about the
      weakest test trigger that still implants reliably there.
    - ``poison_rate``: **0.003** (Blend's reference rate, CIFAR-10).
    - key: :class:`Blend`'s seeded uniform noise (``trigger_seed``), or ``trigger_image``.

    Departures: the research code's Hello-Kitty key is not shipped (as for :class:`Blend`).
    """

    poison_rate: Rate = 0.003
    alpha: Rate = 0.15
    train_alpha: Rate = 0.2

    name: ClassVar[str] = "low_opacity"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.alpha < self.train_alpha:
            raise BadExpertError(
                f"attack '{self.name}' parameter 'alpha' (the test opacity, {self.alpha:g}) must be below "
                f"'train_alpha' (the training opacity, {self.train_alpha:g}); for equal opacities use attack 'blend'"
            )
