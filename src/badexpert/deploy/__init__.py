"""Deployment: a fitted detector in front of its model (:mod:`badexpert.deploy.guard`: ``Guard``,
``save_bundle`` / ``load_bundle``) and a bundle as one ONNX graph (:mod:`badexpert.deploy.export`,
the PyTorch-side builder; the torch-free ``OnnxGuard`` that runs it lives in
:mod:`badexpert.runtime.onnx`).

This package imports nothing itself, so ``import badexpert.deploy.export`` stays torch-free.
"""
