"""flatminima: train PyTorch models toward flat minima, measure flatness, pick the optimizer.

Quick use::

    import flatminima
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt = flatminima.create("msam_adamw", model.parameters(), lr=1e-3, rho=0.05)
"""

from .optim import (
    ASAM,
    ESAM,
    LETS,
    MSAM,
    SAM,
    SWA,
    MongeSAM,
    OptimizerInfo,
    SharpnessAwareOptimizer,
    WeightAveraging,
    create,
    list_optimizers,
    optimizer_info,
    register_optimizer,
    update_bn,
)

__version__ = "0.1.0"

__all__ = [
    "ASAM",
    "ESAM",
    "LETS",
    "MSAM",
    "SAM",
    "SWA",
    "MongeSAM",
    "OptimizerInfo",
    "SharpnessAwareOptimizer",
    "WeightAveraging",
    "__version__",
    "create",
    "list_optimizers",
    "optimizer_info",
    "register_optimizer",
    "update_bn",
]
