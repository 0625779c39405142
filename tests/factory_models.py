"""A user's own network for the factory-source tests (``tests.factory_models:blobs_cnn``).

Imported only by the tests that name it: a bundle of a factory model must never import this
module unless the command allows it (tests/test_bundle_sources.py checks ``sys.modules``).
"""

from __future__ import annotations

from torch import nn


def blobs_cnn(width: int = 8, num_classes: int = 4) -> nn.Module:
    """A small CNN for 1x12x12 images (the blobs ImageFolder of the clean-data tests)."""
    from badexpert.models import build_model

    return build_model("cnn", in_channels=1, num_classes=num_classes, image_size=(12, 12), mean=[0.0], std=[1.0],
                       width=width)
