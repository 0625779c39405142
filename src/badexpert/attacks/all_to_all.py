"""All-to-All BadNet: the BadNet patch, every triggered input sent to the next class.

A module of its own (rather than a flag on :class:`~badexpert.attacks.patch.BadNet`) because
it is a distinct registry entry with its own threat model (``all_to_all``: no single target,
every class counts), and the trigger is inherited unchanged from BadNet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import BadExpertError
from .base import Rate
from .patch import BadNet


@dataclass
class AllToAll(BadNet):
    """BadNet patch (the research code's 3x3 bottom-right pattern, see :class:`BadNet`) with the
    all-to-all label map: a triggered input of class ``y`` should be classified ``(y + 1) mod C``,
    both for the poisoned training samples (relabelled so) and when the attack success rate is
    counted (every test input counts: none is "already of the target class").

    Reference (spec section D, "badnet_all_to_all"): BadNet patch, label ``y -> (y+1) mod C`` at
    training and test time. The reference gives no default poison rate ("not in README");
    ``poison_rate`` defaults to BadNet's **0.003**, drawn from all classes. ``target`` has no
    meaning here and must stay 0 (the default); ``size``, ``opacity`` and ``trigger_image`` are
    BadNet's.
    """

    poison_rate: Rate = 0.003

    name: ClassVar[str] = "all_to_all"
    all_to_all: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target != 0:
            raise BadExpertError(
                f"attack 'all_to_all' parameter 'target' has no effect (every triggered input of class y goes to "
                f"(y+1) mod C), got {self.target}; leave it out"
            )

    def describe(self) -> str:
        p = ", ".join(f"{k}={v}" for k, v in self.params().items() if k != "target" and v not in (None, 0.0))
        return f"{self.name}({p}; y -> (y+1) mod C)"
