"""Do SAM and Monge-SAM stall at a saddle where gradient descent escapes? Trajectories on 2-D toys.

Runs SGD, SAM and Monge-SAM (``alpha`` = 1 and a large ``alpha``) from one start next to the saddle
at the origin of two losses of :mod:`flatminima.bench.tasks.toy`: Monge-SAM's ``(1 - t1 t2)^2``
(its paper's Fig. 1) and the bounded saddle ``t1^2 - t2^2 + t2^4 / 2``. Prints, per loss and
optimizer, whether and when the iterates leave a ball around the saddle and the final loss, and
with ``--plot DIR`` draws the trajectories over the loss contours (PNG, needs matplotlib).

    python benchmarks/toy_saddle.py [--steps 300] [--lr 0.05] [--rho 0.05] [--plot docs/results]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from flatminima.bench.tasks.toy import TOY_LOSSES, saddle_comparison

#: (label, registry name, extra options); alpha for Monge-SAM.
RUNS = (
    ("SGD", "sgd", {}),
    ("SAM", "sam_sgd", {}),
    ("Monge-SAM alpha=1", "msam_sgd", {"alpha": 1.0}),
    ("Monge-SAM alpha=1000", "msam_sgd", {"alpha": 1000.0}),
)
LOSSES = {"monge": ((0.05, 0.001), (-1.5, 2.5)), "saddle": ((0.05, 0.001), (-1.3, 1.3))}


def run(steps: int, lr: float, rho: float, radius: float) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for loss, (start, _) in LOSSES.items():
        out[loss] = {}
        for label, name, kw in RUNS:
            res = saddle_comparison(loss, (name,), start=start, steps=steps, lr=lr, rho=rho,
                                    alpha=kw.get("alpha", 1.0), radius=radius)[name]
            out[loss][label] = res
    return out


def plot(results: dict[str, dict[str, dict]], folder: Path) -> list[Path]:
    from flatminima.plotting import require_matplotlib

    Figure, Canvas = require_matplotlib()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for loss, by_label in results.items():
        lo, hi = LOSSES[loss][1]
        grid = torch.linspace(lo, hi, 201, dtype=torch.float64)
        t1, t2 = torch.meshgrid(grid, grid, indexing="xy")
        z = TOY_LOSSES[loss](torch.stack([t1, t2], dim=-1))
        fig = Figure(figsize=(10.0, 4.4))
        levels = torch.quantile(z.flatten(), torch.linspace(0.0, 0.95, 25, dtype=torch.float64))
        styles = [("-", 3.5), ("-", 2.0), ("--", 1.5), (":", 2.0)]
        for k, (a, b, title) in enumerate(((lo, hi, "whole view"), (-0.08, 0.08, "near the saddle"))):
            ax = fig.add_subplot(1, 2, k + 1)
            if k == 0:
                ax.contourf(grid.numpy(), grid.numpy(), z.numpy(), levels=levels.unique().numpy(),
                            cmap="Greys", alpha=0.6)
            for (label, res), (ls, lw) in zip(by_label.items(), styles):
                tr = res["trajectory"].numpy()
                ax.plot(tr[:, 0], tr[:, 1], linestyle=ls, linewidth=lw, marker="o", markersize=1.5,
                        label=f"{label}: {'escapes' if res['escaped'] else 'stays'}")
            ax.plot([0.0], [0.0], "r*", markersize=9)
            ax.set_xlim(a, b)
            ax.set_ylim(a, b)
            ax.set_xlabel("θ₁")
            ax.set_ylabel("θ₂")
            name = {"monge": "(1 − θ₁θ₂)²", "saddle": "θ₁² − θ₂² + θ₂⁴/2"}[loss]
            ax.set_title(f"{name}: {title}", fontsize=10)
            ax.grid(alpha=0.3)
            if k == 0:
                ax.legend(fontsize=7, loc="lower left")
        Canvas(fig)
        fig.tight_layout()
        path = folder / f"toy_{loss}.png"
        fig.savefig(path, format="png", dpi=110)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--radius", type=float, default=0.5, help="escaped = ends farther than this")
    p.add_argument("--plot", type=Path, default=None, metavar="DIR")
    p.add_argument("--json", type=Path, default=None, metavar="PATH")
    args = p.parse_args(argv)
    results = run(args.steps, args.lr, args.rho, args.radius)
    print(f"start (0.05, 0.001), {args.steps} steps, lr {args.lr}, rho {args.rho}, "
          f"escaped = ends farther than {args.radius} from the saddle")
    print("| loss | optimizer | escaped | first exit step | final point | final loss |")
    print("|---|---|---|---:|---|---:|")
    for loss, by_label in results.items():
        for label, r in by_label.items():
            fin = ", ".join(f"{v:.3f}" for v in r["final"])
            print(f"| {loss} | {label} | {'yes' if r['escaped'] else 'no'} | "
                  f"{r['escape_step'] if r['escape_step'] is not None else '-'} | ({fin}) | "
                  f"{r['final_loss']:.4f} |")
    if args.plot is not None:
        for path in plot(results, args.plot):
            print(f"wrote {path}", file=sys.stderr)
    if args.json is not None:
        payload = {loss: {label: {k: v for k, v in r.items() if k != "trajectory"}
                          for label, r in by_label.items()} for loss, by_label in results.items()}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
