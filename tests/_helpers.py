"""Shared model and data builders for the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def make_mlp(bn: bool = True, dropout: float = 0.3, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(6, 16)]
    if bn:
        layers.append(torch.nn.BatchNorm1d(16))
    layers += [torch.nn.ReLU()]
    if dropout:
        layers.append(torch.nn.Dropout(dropout))
    layers += [torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)]
    return torch.nn.Sequential(*layers).to(dtype)


def make_batch(n: int = 32, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def make_closure(model, x, y):
    """The standard closure: cross-entropy forward, backward, return the loss."""

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure
