"""Sharpness measurement that never touches the model: Hessian spectrum, sharpness measures and
loss landscapes over a user loss function ``loss_fn(model, batch)``.

Every function takes a ``seed``, an explicit ``mode`` (``"eval"`` or ``"train"``) and a ``params``
selector, and leaves the model's parameters, buffers and ``training`` flags and the global RNG as it
found them, also after an exception (:func:`preserved`)."""

from ._core import (
    LossFunction,
    NonDeterministicLossWarning,
    ParamSelector,
    preserved,
    select_parameters,
)
from .hessian import (
    HessianInfo,
    SpectralDensity,
    hessian_eigenvalues,
    hessian_trace,
    layerwise_top_eigenvalues,
    spectral_density,
)
from .landscape import LossLine, LossSurface, interpolate, random_direction, slice_1d, slice_2d
from .measures import SharpnessResult, average_sharpness, m_sharpness, worst_case_sharpness

__all__ = [
    "HessianInfo",
    "LossFunction",
    "LossLine",
    "LossSurface",
    "NonDeterministicLossWarning",
    "ParamSelector",
    "SharpnessResult",
    "SpectralDensity",
    "average_sharpness",
    "hessian_eigenvalues",
    "hessian_trace",
    "interpolate",
    "layerwise_top_eigenvalues",
    "m_sharpness",
    "preserved",
    "random_direction",
    "select_parameters",
    "slice_1d",
    "slice_2d",
    "spectral_density",
    "worst_case_sharpness",
]
