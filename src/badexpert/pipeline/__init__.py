"""The research pipeline: one experiment from a config (:mod:`badexpert.pipeline.experiment`:
data, attack, training with its content-hash cache, detector, evaluation, report) and the
benchmark grid (:mod:`badexpert.pipeline.grid`: config, plan, local and Ray runners, results).

Import from the submodules; this package imports nothing itself.
"""
