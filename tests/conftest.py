from __future__ import annotations

import pytest
import torch

# The tests use tiny models: one thread is fastest and immune to oversubscribed CI machines.
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _private_embedding_cache(tmp_path_factory):
    """Sentence embeddings computed by the tests go to a cache of the session, never to the user's
    ~/.cache (spawned sweep workers inherit the variable)."""
    import os

    old = os.environ.get("FLATMINIMA_CACHE")
    os.environ["FLATMINIMA_CACHE"] = str(tmp_path_factory.mktemp("flatminima-cache"))
    yield
    if old is None:
        os.environ.pop("FLATMINIMA_CACHE", None)
    else:
        os.environ["FLATMINIMA_CACHE"] = old


@pytest.fixture(autouse=True)
def _no_leaked_global_hooks():
    """Every test must leave no global module hook behind (the BatchNorm guard is temporary)."""
    yield
    hooks = torch.nn.modules.module._global_forward_pre_hooks
    assert len(hooks) == 0, f"a global forward pre-hook leaked: {hooks}"
