"""Evaluation: one detector on a suspect model (:mod:`badexpert.evaluation.core`, :func:`evaluate`)
and several detectors side by side under one protocol (:mod:`badexpert.evaluation.compare`,
:func:`compare`).

Depends on the foundations and the methods (data, models, attacks, detectors, training), never on
reporting, the pipeline or deployment. Import from the submodules (or the top-level
``from badexpert import evaluate, compare``); this package imports nothing itself.
"""
