"""PNG plots of loss landscapes (optional: needs matplotlib, ``pip install flatminima[plot]``).

This module lives outside :mod:`flatminima.sharpness` so that the measurement core never depends on
matplotlib; matplotlib is imported inside the functions. Figures are drawn on matplotlib's
non-interactive Agg canvas directly (``matplotlib.figure.Figure`` + ``FigureCanvasAgg``), without
``pyplot``: nothing opens a window, no global backend is switched and no figure is left registered
in pyplot's state.

* :func:`plot_line`: a :class:`~flatminima.sharpness.landscape.LossLine` (interpolation or 1-D
  slice) as a curve;
* :func:`plot_contour`: a :class:`~flatminima.sharpness.landscape.LossSurface` as filled contours
  with contour lines and a colour bar.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_contour", "plot_line", "require_matplotlib"]


def require_matplotlib() -> tuple[Any, Any]:
    """``(Figure, FigureCanvasAgg)``, or an :class:`ImportError` that says how to install
    matplotlib (call it first to fail before a long computation)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "flatminima.plotting needs matplotlib, which is not installed: "
            "pip install 'flatminima[plot]' (or pip install matplotlib)"
        ) from exc
    return Figure, FigureCanvasAgg


def _array(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def _save(fig: Any, canvas_cls: Any, path: str | os.PathLike[str], dpi: int) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path must end in .png, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas_cls(fig)  # attaches the Agg canvas to the figure
    fig.savefig(path, format="png", dpi=dpi)
    return path


def plot_line(
    result: Any,
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    logy: bool = False,
    dpi: int = 100,
) -> Path:
    """Plot a 1-D landscape (``result.coords`` against ``result.losses``) to the PNG file ``path``.

    For an interpolation (``result.kind == "interpolation"``) the x axis is ``α`` and the two models
    (``α = 0`` and ``1``) are marked; for a slice it is the step ``t`` along the direction and the
    model (``t = 0``) is marked. Non-finite losses are left out of the curve.

    Args:
        result: a :class:`~flatminima.sharpness.landscape.LossLine` (or anything with ``coords``,
            ``losses`` and optionally ``kind``, ``mode``).
        path: the output file (``.png``); parent folders are created.
        title: figure title (default: from ``kind`` and ``mode``).
        logy: logarithmic loss axis.
        dpi: resolution.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    figure_cls, canvas_cls = require_matplotlib()
    x, y = _array(result.coords), _array(result.losses)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"coords and losses must be 1-D of equal length, got {x.shape} and {y.shape}")
    kind = getattr(result, "kind", "slice")
    mode = getattr(result, "mode", None)
    fig = figure_cls(figsize=(5.0, 3.6))
    ax = fig.add_subplot()
    ok = np.isfinite(y)
    ax.plot(x[ok], y[ok], "-o", markersize=3, color="tab:blue")
    marks = (0.0, 1.0) if kind == "interpolation" else (0.0,)
    for m in marks:
        hit = ok & (x == m)
        if hit.any():
            ax.plot(x[hit], y[hit], "s", color="tab:red", markersize=6)
    ax.set_xlabel("α  (w = (1−α) w_a + α w_b)" if kind == "interpolation" else "t  (w + t·d)")
    ax.set_ylabel("loss")
    if logy and (y[ok] > 0).all():
        ax.set_yscale("log")
    default = "linear interpolation" if kind == "interpolation" else "1-D slice"
    ax.set_title(title if title is not None else f"{default}" + (f" ({mode} mode)" if mode else ""))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, canvas_cls, path, dpi)


def plot_contour(
    result: Any,
    path: str | os.PathLike[str],
    levels: int | Any = 20,
    *,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Plot a 2-D landscape as filled contours, contour lines and a colour bar, to ``path`` (PNG).

    Args:
        result: a :class:`~flatminima.sharpness.landscape.LossSurface` (``x`` of length ``nx``,
            ``y`` of length ``ny``, ``losses`` of shape ``(nx, ny)``).
        path: the output file (``.png``); parent folders are created.
        levels: number of contour levels, or their increasing values (as in
            ``matplotlib.axes.Axes.contour``).
        title: figure title.
        dpi: resolution.

    Returns:
        ``path`` as a :class:`~pathlib.Path`. The model (``a = b = 0``) is marked when in the grid.
    """
    figure_cls, canvas_cls = require_matplotlib()
    x, y, z = _array(result.x), _array(result.y), _array(result.losses)
    if z.shape != (x.size, y.size):
        raise ValueError(f"losses must have shape (len(x), len(y)) = {(x.size, y.size)}, got {z.shape}")
    if not np.isfinite(z).any():
        raise ValueError("every loss of the surface is NaN or infinite: nothing to plot")
    zt = np.ma.masked_invalid(z.T)  # contour wants Z[j, i] at (x[i], y[j])
    fig = figure_cls(figsize=(5.0, 4.2))
    ax = fig.add_subplot()
    filled = ax.contourf(x, y, zt, levels=levels, cmap="viridis")
    ax.contour(x, y, zt, levels=filled.levels, colors="k", linewidths=0.4, alpha=0.6)
    fig.colorbar(filled, ax=ax, label="loss")
    if x.min() <= 0 <= x.max() and y.min() <= 0 <= y.max():
        ax.plot([0.0], [0.0], "r*", markersize=9)
    ax.set_xlabel("a  (w + a·d₁ + b·d₂)")
    ax.set_ylabel("b")
    mode = getattr(result, "mode", None)
    ax.set_title(title if title is not None else "2-D slice" + (f" ({mode} mode)" if mode else ""))
    fig.tight_layout()
    return _save(fig, canvas_cls, path, dpi)
