"""badexpert: detect backdoor (trojan) inputs to an image classifier with BaDExpert.

The main entry points::

    from badexpert import load_dataset, split, build_model, train, Recipe
    from badexpert import get_attack, BaDExpert, load_detector, evaluate, load_model, save_model
"""

__version__ = "0.1.0"

from .attacks import ATTACKS, Attack, get_attack  # noqa: E402
from .data import Dataset, Splits, load_dataset, split  # noqa: E402
from .detectors import DETECTORS, BaDExpert, Detector, get_detector, load_detector  # noqa: E402
from .errors import BadExpertError, NotFittedError  # noqa: E402
from .evaluation import Evaluation, evaluate  # noqa: E402
from .guard import Guard, GuardOutput, RejectedInputError, load_bundle, save_bundle  # noqa: E402
from .io import load_model, save_model  # noqa: E402
from .models import ARCHITECTURES, build_model  # noqa: E402
from .training import Recipe, accuracy, train  # noqa: E402

__all__ = [
    "ARCHITECTURES", "ATTACKS", "DETECTORS", "Attack", "BaDExpert", "BadExpertError", "Dataset", "Detector",
    "Evaluation", "Guard", "GuardOutput", "NotFittedError", "RejectedInputError", "Recipe", "Splits", "accuracy", "build_model", "evaluate", "get_attack",
    "get_detector", "load_bundle", "load_dataset", "load_detector", "load_model", "save_bundle", "save_model", "split", "train",
]
