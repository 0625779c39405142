"""Backdoor attacks by name.

``get_attack("badnet", target=0, poison_rate=0.01)`` builds one; ``attack.poison(train, rng)``
returns a poisoned training set and ``attack.apply(x)`` triggers a test batch.
"""

from __future__ import annotations

import dataclasses

from ..errors import BadExpertError
from ..registry import Registry
from .adaptive import AdaptiveBlend, AdaptivePatch
from .all_to_all import AllToAll
from .base import Attack, restoring
from .components import Components
from .blend import Blend
from .bpp import BPP
from .clean_label import CleanLabel
from .dynamic import Dynamic
from .expert_aware import ExpertAware
from .finetune import FineTune
from .issba import ISSBA
from .low_opacity import LowOpacity
from .patch import BadNet, PatchAttack, Trojan
from .refool import Refool
from .sig import SIG
from .sleeper_agent import SleeperAgent
from .sra import SRA
from .ssdt import SSDT
from .tact import TaCT
from .trojannn import TrojanNN
from .wanet import WaNet

#: Attacks by name (one line per attack: its class, whose ``name`` is the registry name).
ATTACKS = Registry("attack", [(cls.name, cls) for cls in (
    BadNet,
    Blend,
    Trojan,
    SIG,
    AllToAll,
    TaCT,
    AdaptiveBlend,
    AdaptivePatch,
    WaNet,
    BPP,
    CleanLabel,
    Refool,
    Dynamic,
    ISSBA,
    FineTune,
    TrojanNN,
    SleeperAgent,
    SRA,
    LowOpacity,
    ExpertAware,
    SSDT,
)])


def get_attack(name: str, /, **params) -> Attack:
    """Build an attack by name; unknown names or parameters raise a one-line error."""
    key = ATTACKS.canonical(name)
    cls = ATTACKS[key]
    valid = {f.name for f in dataclasses.fields(cls) if f.init}
    bad = set(params) - valid
    if bad:
        raise BadExpertError(f"attack '{key}' has no parameter(s) {sorted(bad)}; valid: {sorted(valid)}")
    return cls(**params)


def attack_from_dict(d: dict | None, *, check_files: bool = True) -> Attack | None:
    """Re-create an attack from :meth:`Attack.to_dict` output (``None`` for no attack).

    ``check_files=False`` skips checking the files it names (to describe it, or when its trigger
    state comes from a saved model: see :func:`attack_from_meta`)."""
    if not d:
        return None
    if not isinstance(d, dict) or not isinstance(d.get("name"), str):
        raise BadExpertError(f"an attack record must be a JSON object with a 'name', got {type(d).__name__}")
    d = dict(d)
    name = d.pop("name")
    if check_files:
        return get_attack(name, **d)
    with restoring():
        return get_attack(name, **d)


def attack_from_meta(meta: dict, *, source: str = "the model file") -> Attack | None:
    """The attack a saved model was trained with (``None`` for a clean model), with the trigger
    state saved in the model file restored, so it applies exactly the trigger the model was
    trained with (files it was built from, such as reflection images, are not needed)."""
    state = meta.get("attack_state")
    attack = attack_from_dict(meta.get("attack"), check_files=not state)
    if attack is not None and state:
        shape = (int(meta["in_channels"]), *(int(v) for v in meta["image_size"]))
        attack.restore_state(shape, state, source=source)
    return attack


__all__ = [
    "ATTACKS", "AdaptiveBlend", "AdaptivePatch", "AllToAll", "Attack", "BPP", "BadNet", "Blend", "CleanLabel", "Components", "Dynamic", "ExpertAware", "FineTune", "ISSBA",
    "LowOpacity", "PatchAttack",
    "Refool", "SIG", "SleeperAgent", "SRA", "SSDT", "TaCT", "Trojan", "TrojanNN", "WaNet", "attack_from_dict", "attack_from_meta", "get_attack", "restoring",
]
