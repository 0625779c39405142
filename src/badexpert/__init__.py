"""badexpert: detect backdoor (trojan) inputs to an image classifier with BaDExpert.

The main entry points::

    from badexpert import load_dataset, split, build_model, train, Recipe
    from badexpert import get_attack, BaDExpert, load_detector, evaluate, load_model, save_model
    from badexpert import Guard, save_bundle, load_bundle

Names are imported on first use (PEP 562), so ``import badexpert.deploy.export`` or the CLI's ``--help``
do not load PyTorch until something needs it (an ONNX runtime service never does).
"""

from __future__ import annotations

import importlib

#: The package version, in this one place (pyproject.toml reads it; CHANGELOG.md lists the changes).
__version__ = "0.1.0"

#: public name -> the submodule that defines it
_EXPORTS = {
    "ATTACKS": "attacks", "Attack": "attacks", "get_attack": "attacks",
    "Dataset": "data", "Splits": "data", "load_dataset": "data", "split": "data",
    "DETECTORS": "detectors", "BaDExpert": "detectors", "Detector": "detectors", "get_detector": "detectors",
    "load_detector": "detectors",
    "BadExpertError": "errors", "NotFittedError": "errors",
    "Comparison": "evaluation.compare", "compare": "evaluation.compare",
    "Evaluation": "evaluation.core", "evaluate": "evaluation.core",
    "Guard": "deploy.guard", "GuardOutput": "deploy.guard", "RejectedInputError": "deploy.guard",
    "load_bundle": "deploy.guard", "save_bundle": "deploy.guard",
    "load_model": "io", "save_model": "io",
    "ARCHITECTURES": "models", "build_model": "models",
    "Recipe": "training", "accuracy": "training", "train": "training",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        try:  # a submodule (badexpert.deploy...), as eager imports used to make available
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError:
            raise AttributeError(f"module 'badexpert' has no attribute '{name}'") from None
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
