from __future__ import annotations

import pytest
import torch

# The tests use tiny models: one thread is fastest and immune to oversubscribed CI machines.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_leaked_global_hooks():
    """Every test must leave no global module hook behind (the BatchNorm guard is temporary)."""
    yield
    hooks = torch.nn.modules.module._global_forward_pre_hooks
    assert len(hooks) == 0, f"a global forward pre-hook leaked: {hooks}"
