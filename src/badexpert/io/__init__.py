"""Loading and saving models.

:mod:`.checkpoints` holds badexpert's own checkpoint format (safetensors weights with JSON
metadata); :mod:`.sources` turns every other kind of model a user brings (a Hugging Face
``save_pretrained`` directory, an ONNX file, a ``module:factory`` with weights) into the same
``nn.Module`` contract. :func:`load_model` takes any of them.
"""

from __future__ import annotations

from .checkpoints import (
    ATTACK_PREFIX,
    FORMAT,
    MODEL_META_TYPES,
    build_checked,
    build_for_weights,
    check_architecture,
    check_model_meta,
    load_state_dict_file,
    load_weights,
    model_fingerprint,
    read_meta,
    read_model_meta,
    save_model,
    short_fingerprint,
)
from .checkpoints import load_model as load_checkpoint
from .sources import SOURCES, ImageClassifier, ModelSource, detect_source, load_model, rebuild_model

__all__ = [
    "ATTACK_PREFIX", "FORMAT", "MODEL_META_TYPES", "SOURCES", "ImageClassifier", "ModelSource", "build_checked",
    "build_for_weights", "check_architecture", "check_model_meta", "detect_source", "load_checkpoint", "load_model",
    "load_state_dict_file", "load_weights", "model_fingerprint", "read_meta", "read_model_meta", "rebuild_model",
    "save_model", "short_fingerprint",
]
