"""Flat-minima optimizers: the SAM family on one two-pass engine, and a by-name registry."""

from .engine import SharpnessAwareOptimizer
from .perturbations import asam_perturbation, global_norm, monge_perturbation, sam_perturbation
from .registry import OptimizerInfo, create, list_optimizers, optimizer_info, register_optimizer
from .sam import ASAM, MSAM, SAM, MongeSAM

__all__ = [
    "ASAM",
    "MSAM",
    "SAM",
    "MongeSAM",
    "OptimizerInfo",
    "SharpnessAwareOptimizer",
    "asam_perturbation",
    "create",
    "global_norm",
    "list_optimizers",
    "monge_perturbation",
    "optimizer_info",
    "register_optimizer",
    "sam_perturbation",
]
