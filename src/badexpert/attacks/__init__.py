"""Backdoor attacks by name.

``get_attack("badnet", target=0, poison_rate=0.01)`` builds one; ``attack.poison(train, rng)``
returns a poisoned training set and ``attack.apply(x)`` triggers a test batch.
"""

from __future__ import annotations

from ..errors import BadExpertError
from ..registry import Registry
from .adaptive import AdaptiveBlend, AdaptivePatch
from .all_to_all import AllToAll
from .base import Attack
from .blend import Blend
from .patch import BadNet, PatchAttack, Trojan
from .sig import SIG
from .tact import TaCT

#: Attacks by name (one line per attack: its class, whose ``name`` is the registry name).
ATTACKS = Registry("attack", [(cls.name, cls) for cls in (BadNet, Blend, Trojan, SIG, AllToAll, TaCT, AdaptiveBlend,
                                                         AdaptivePatch)])


def get_attack(name: str, **params) -> Attack:
    """Build an attack by name; unknown names or parameters raise a one-line error."""
    key = ATTACKS.canonical(name)
    cls = ATTACKS[key]
    valid = set(cls.__dataclass_fields__)
    bad = set(params) - valid
    if bad:
        raise BadExpertError(f"attack '{key}' has no parameter(s) {sorted(bad)}; valid: {sorted(valid)}")
    return cls(**params)


def attack_from_dict(d: dict | None) -> Attack | None:
    """Re-create an attack from :meth:`Attack.to_dict` output (``None`` for no attack)."""
    if not d:
        return None
    d = dict(d)
    return get_attack(d.pop("name"), **d)


__all__ = [
    "ATTACKS", "AdaptiveBlend", "AdaptivePatch", "AllToAll", "Attack", "BadNet", "Blend", "PatchAttack", "SIG", "TaCT",
    "Trojan", "attack_from_dict", "get_attack",
]
