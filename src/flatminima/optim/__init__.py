"""Flat-minima optimizers: the SAM family on one two-pass engine, and a by-name registry."""

from .averaging import SWA, WeightAveraging, update_bn
from .engine import SharpnessAwareOptimizer, accepts_select
from .esam import ESAM, num_selected, select_top
from .lets import LETS
from .perturbations import asam_perturbation, global_norm, monge_perturbation, sam_perturbation
from .registry import OptimizerInfo, create, list_optimizers, optimizer_info, register_optimizer
from .sam import ASAM, MSAM, RULES, SAM, MongeSAM, PerturbationRule

__all__ = [
    "ASAM",
    "ESAM",
    "LETS",
    "MSAM",
    "SAM",
    "SWA",
    "MongeSAM",
    "OptimizerInfo",
    "PerturbationRule",
    "RULES",
    "SharpnessAwareOptimizer",
    "WeightAveraging",
    "accepts_select",
    "asam_perturbation",
    "create",
    "global_norm",
    "list_optimizers",
    "monge_perturbation",
    "num_selected",
    "optimizer_info",
    "register_optimizer",
    "sam_perturbation",
    "select_top",
    "update_bn",
]
