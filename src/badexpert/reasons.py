"""Why a guard accepted or rejected an input (strings shared by detectors, the guard, the
service and the ONNX runtime; torch-free)."""

ACCEPTED = "accepted"
REJECT_SCORE = "score above threshold"
REJECT_NONFINITE_INPUT = "non-finite input (NaN or inf pixel)"
REJECT_NONFINITE_SCORE = "score is not a number (the models produced NaN)"
