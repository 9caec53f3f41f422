"""Sharpness measurement that never touches the model: Hessian spectrum, sharpness measures and
loss landscapes over a user loss function ``loss_fn(model, batch)``."""

from ._core import LossFunction, NonDeterministicLossWarning, preserved, select_parameters

__all__ = ["LossFunction", "NonDeterministicLossWarning", "preserved", "select_parameters"]
