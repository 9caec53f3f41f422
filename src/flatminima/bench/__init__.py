"""Benchmarks: train small bundled tasks with several optimizers and compare them.

``run_quick`` / ``format_table`` are what ``flatminima bench`` runs: an MLP on scikit-learn's
digits (vendored in ``flatminima/bench/data``) with SGD, SAM, ASAM and Monge-SAM.
"""

from .quick import format_table, run_quick, summarize

__all__ = ["format_table", "run_quick", "summarize"]
