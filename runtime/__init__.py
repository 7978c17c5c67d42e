"""runtime."""

from tmkt.runtime.classifier import EventClassifier, Prediction  # noqa: F401
