r"""The Hessian spectrum of a loss: top-k eigenvalues, trace and eigenvalue density, from
Hessian-vector products only (the Hessian itself is never formed).

Every function measures ``H = \nabla^2 L(w_0)`` where ``L(w) = mean_b loss_fn(model[w], b)`` over the
given batches (any batch structure: ``loss_fn(model, batch)`` unpacks it) and ``w_0`` are the model's
current values of the parameters chosen by ``params`` (all by default; a name prefix such as
``"layer3."`` gives the diagonal block of that layer, see :func:`~._core.select_parameters`). It goes
through :class:`~._core.LossFunction`, so:

* the model is never written to: weights, buffers (BatchNorm statistics) and every module's
  ``training`` flag are as before the call, also when ``loss_fn`` raises, and so is the global RNG
  (each function runs inside :func:`~._core.preserved`);
* ``mode`` says explicitly which behaviour the layers have during the measurement: ``"eval"`` (the
  default: BatchNorm uses its running statistics, dropout is off; note that this default is a
  choice, made visible here, where PyHessian calls ``model.eval()`` silently) or ``"train"`` (batch
  statistics, and dropout if any: then the loss is random and a
  :class:`~._core.NonDeterministicLossWarning` is issued; the measurement is of a random function);
* random vectors come from a private ``torch.Generator`` seeded with ``seed``: results are
  reproducible, and the global RNG is not consumed.

Methods (HVP = one Hessian-vector product: per batch a forward, a backward with ``create_graph`` and
a second backward, or only the second backward when the gradient graph is kept, see
``reuse_graph``):

* :func:`hessian_eigenvalues`: Lanczos with full reorthogonalization (Lanczos 1950; Golub & Van
  Loan, *Matrix Computations*, 4th ed., §10.1), the Krylov basis kept and grown until the top-k
  Ritz pairs have converged; or power iteration with deflation (the method of PyHessian, with a
  residual-based stop and a shift so that it returns the largest *algebraic* eigenvalues).
* :func:`hessian_trace`: Hutch++ (Meyer, Musco, Musco & Woodruff, SOSA 2021) or Hutchinson's
  estimator (Hutchinson 1989), each with a standard error.
* :func:`spectral_density`: stochastic Lanczos quadrature (Ubaru, Chen & Saad, SIMAX 2017;
  Ghorbani, Krishnan & Xiao, ICML 2019).
* :func:`layerwise_top_eigenvalues`: the top eigenvalue of every module's own diagonal block.

Each function reports a :class:`HessianInfo` (``return_info=True``; the density carries it in its
``info`` field) with the number of HVPs it used, so methods can be compared by their work.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._core import LossFn, LossFunction, ParamSelector, check_choice, check_int, check_mode, preserved

__all__ = [
    "HessianInfo",
    "SpectralDensity",
    "hessian_eigenvalues",
    "hessian_trace",
    "layerwise_top_eigenvalues",
    "spectral_density",
]

_EIG_METHODS = ("lanczos", "power")
_TRACE_METHODS = ("hutch++", "hutchinson")


# ------------------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class HessianInfo:
    """How a measurement went, to compare methods by their work.

    Attributes:
        method: the method used (``"lanczos"``, ``"power"``, ``"hutch++"``, ``"hutchinson"``,
            ``"exact"`` (trace from unit vectors), ``"slq"``).
        matvecs: Hessian-vector products computed (each is one double backward per batch).
        iterations: Lanczos steps, power iterations (all eigenvalues and restarts together), probe
            vectors (trace: random vectors, or the ``n`` unit vectors of the exact trace), or Lanczos
            steps over all runs (density).
        converged: eigenvalues: every requested Ritz pair met the tolerance. Always ``True`` for the
            trace and the density (they use a fixed budget; see their standard error).
        loss_evaluations: calls of ``loss_fn`` (including the two of the determinism check).
        residuals: eigenvalues: the final residual norms ``||H y - theta y||``, in the order of the
            returned values.
        history: eigenvalues: after each iteration, the current estimates of the top-k values
            (Lanczos: the k largest Ritz values; power: the Rayleigh quotient of the eigenvalue being
            computed), for convergence plots.
    """

    method: str
    matvecs: int
    iterations: int
    converged: bool
    loss_evaluations: int
    residuals: tuple[float, ...] = ()
    history: tuple[tuple[float, ...], ...] = ()


@dataclass(frozen=True)
class SpectralDensity:
    r"""An estimate of the eigenvalue distribution of ``H`` by stochastic Lanczos quadrature.

    ``nodes`` and ``weights`` define a discrete measure ``mu = sum_i weights_i delta(nodes_i)`` that
    approximates the spectral measure ``(1/n) sum_j delta(lambda_j)``: per run, the Ritz values of
    the Lanczos tridiagonal matrix and the squared first components of its eigenvectors (Gauss
    quadrature for ``v^T f(H) v``), concatenated over the runs with the weights divided by the number
    of runs, so that they sum to 1.

    Attributes:
        nodes: quadrature nodes (Ritz values), 1-D float64.
        weights: quadrature weights, 1-D float64, sum 1.
        run: index of the run each node comes from.
        grid: points where :attr:`density` is given.
        density: ``sum_i weights_i N(grid; nodes_i, sigma^2)``, a smoothed density of eigenvalues
            (it integrates to 1 over the real line).
        sigma: width of the Gaussian kernel.
        num_runs, lanczos_steps: the SLQ settings (``lanczos_steps`` after capping at ``n``).
        n: dimension of ``H`` (number of parameters measured).
    """

    nodes: Tensor
    weights: Tensor
    run: Tensor
    grid: Tensor
    density: Tensor
    sigma: float
    num_runs: int
    lanczos_steps: int
    n: int
    info: HessianInfo | None = field(default=None, repr=False)

    def moments(self, p: int | float) -> float:
        r"""``sum_i weights_i nodes_i^p``, an unbiased estimate of ``tr(H^p) / n`` for integer
        ``0 <= p <= 2 lanczos_steps - 1`` (Gauss quadrature is exact for polynomials of degree
        ``2m - 1``, so each run gives exactly ``v^T H^p v`` with ``E[v v^T] = I / n``)."""
        return float((self.weights * self.nodes.pow(p)).sum())

    def density_on(self, grid: Tensor, sigma: float | None = None) -> Tensor:
        """The smoothed density on another ``grid`` (with another ``sigma`` if given)."""
        return _gaussian_density(self.nodes, self.weights, grid, self.sigma if sigma is None else sigma)

    def per_run(self) -> list[tuple[Tensor, Tensor]]:
        """``(nodes, weights)`` of each run, the weights of a run summing to 1."""
        return [
            (self.nodes[self.run == r], self.weights[self.run == r] * self.num_runs)
            for r in range(self.num_runs)
        ]


# ------------------------------------------------------------------------------------------ checks
def _check_tol(tol: Any) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0 or math.isinf(tol):
        raise ValueError(f"invalid tol: {tol!r} (must be a positive finite number)")
    return float(tol)


# ------------------------------------------------------------------------------------------ operator
class _Operator:
    """``v -> H v`` at ``w0``, counting the products.

    Without graph reuse each product is :meth:`LossFunction.hvp`: per batch a forward, a backward
    with ``create_graph=True`` and a second backward. With reuse the gradient ``g(w)`` and its graph
    are built once (on the first product) and kept; each product is then only the second backward
    ``d(g . v)/dw`` through the kept graph, about half the work on small models, at the price of
    keeping every batch's graph alive between products.
    """

    def __init__(self, lf: LossFunction, reuse_graph: bool | None = None) -> None:
        self.lf = lf
        self.n = lf.numel
        self.dtype = lf.dtype
        self.device = lf.device
        self.matvecs = 0
        self.reuse = len(lf.batches) == 1 if reuse_graph is None else bool(reuse_graph)
        self._graph: tuple[Tensor, Tensor | None] | None = None

    def _build(self) -> tuple[Tensor, Tensor | None]:
        wv = self.lf.w0.detach().clone().requires_grad_(True)
        total: Tensor | None = None
        with torch.enable_grad():
            for b in self.lf.batches:
                loss = self.lf.evaluate(wv, b)
                (g,) = torch.autograd.grad(loss, wv, create_graph=True, allow_unused=True)
                if g is not None:
                    total = g if total is None else total + g
        return wv, None if total is None else total / len(self.lf.batches)

    def __call__(self, v: Tensor) -> Tensor:
        self.matvecs += 1
        if not self.reuse:
            return self.lf.hvp(v)
        if self._graph is None:
            self._graph = self._build()
        wv, g = self._graph
        hv = None
        if g is not None and g.requires_grad:
            with torch.enable_grad():
                (hv,) = torch.autograd.grad(
                    g, wv, grad_outputs=v.to(self.dtype), retain_graph=True, allow_unused=True
                )
        return torch.zeros_like(wv.detach()) if hv is None else hv.detach()

    def randn(self, gen: torch.Generator) -> Tensor:
        return torch.randn(self.n, generator=gen, dtype=self.dtype, device=self.device)

    def rademacher(self, gen: torch.Generator, count: int | None = None) -> Tensor:
        shape = (self.n,) if count is None else (count, self.n)
        bits = torch.randint(0, 2, shape, generator=gen, device=self.device)
        return bits.to(self.dtype).mul_(2).sub_(1)


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _setup(
    model: nn.Module, loss_fn: LossFn, batches: Iterable[Any], *, mode: str, params: ParamSelector,
    dtype: torch.dtype | None, reuse_graph: bool | None,
) -> tuple[LossFunction, _Operator]:
    lf = LossFunction(model, loss_fn, batches, mode=mode, params=params, dtype=dtype)
    lf.check_deterministic()
    return lf, _Operator(lf, reuse_graph)


# ------------------------------------------------------------------------------------------ Lanczos
class _Lanczos:
    r"""Lanczos tridiagonalization with full reorthogonalization.

    Keeps the orthonormal Krylov basis ``Q`` (rows ``q_0 .. q_{m-1}``), the diagonal ``alpha`` and the
    off-diagonal ``beta`` of ``T = Q^T H Q``, and the last ``beta_m = ||r||`` of
    ``H Q = Q T + r e_m^T``. Each new vector is orthogonalized against the whole basis twice
    (classical Gram-Schmidt, "twice is enough"), so ``Q`` stays orthonormal to working precision
    and no spurious copies of converged Ritz values appear. When ``r`` vanishes (the Krylov space is
    invariant) the process can go on from a new random vector orthogonal to ``Q`` (a zero coupling in
    ``T``), which finds eigenvalues of multiplicity > 1 and all ``n`` eigenvalues when ``m = n``.
    """

    def __init__(self, op: _Operator, capacity: int) -> None:
        self.op = op
        self.Q = torch.empty(min(max(capacity, 1), 16), op.n, dtype=op.dtype, device=op.device)
        self.capacity = capacity
        self.size = 0
        self.alpha: list[float] = []
        self.beta: list[float] = []  # beta[j] couples q_j and q_{j+1}; beta[-1] is the residual norm
        self.anorm = 0.0  # running estimate of ||H|| (max row sum of T)
        self._next: Tensor | None = None  # the normalized next vector, or None after a breakdown

    def _orthogonalize(self, w: Tensor) -> Tensor:
        basis = self.Q[: self.size]
        for _ in range(2):
            w = w - basis.T @ (basis @ w)
        return w

    def _append(self, q: Tensor) -> None:
        if self.size == self.Q.shape[0]:
            grown = torch.empty(
                min(2 * self.Q.shape[0], self.capacity), self.op.n, dtype=self.Q.dtype, device=self.Q.device
            )
            grown[: self.size] = self.Q[: self.size]
            self.Q = grown
        self.Q[self.size] = q
        self.size += 1

    @property
    def exhausted(self) -> bool:
        """The basis spans the whole space: nothing can be added."""
        return self.size >= self.op.n

    @property
    def broke_down(self) -> bool:
        """The last residual vanished: the current Krylov space is invariant."""
        return self._next is None and self.size > 0

    def start(self, v: Tensor) -> bool:
        """Begin (or restart) from ``v``, orthogonalized against the basis; ``False`` if ``v`` lies in
        the span of the basis (to working precision)."""
        before = float(torch.linalg.vector_norm(v))
        if self.size:
            v = self._orthogonalize(v)
        norm = float(torch.linalg.vector_norm(v))
        if not norm > 100.0 * torch.finfo(self.op.dtype).eps * before:
            return False
        if self.size:
            self.beta[-1] = 0.0  # a decoupled block: T stays block diagonal
        self._next = v / norm
        return True

    def tiny(self) -> float:
        """A norm at the level of rounding errors for products with ``H``."""
        return 100.0 * torch.finfo(self.op.dtype).eps * self.anorm

    def step(self) -> None:
        """One Lanczos step: one Hessian-vector product."""
        assert self._next is not None
        q = self._next
        self._append(q)
        j = self.size - 1
        w = self.op(q)
        a = float(q @ w)
        w = w - a * q
        if j > 0 and self.beta[-1] != 0.0:
            w = w - self.beta[-1] * self.Q[j - 1]
        w = self._orthogonalize(w)
        b = float(torch.linalg.vector_norm(w))
        self.alpha.append(a)
        self.anorm = max(self.anorm, abs(a) + b + (self.beta[-1] if self.beta else 0.0))
        self.beta.append(b)
        self._next = w / b if b > self.tiny() and not self.exhausted else None

    def tridiagonal(self) -> Tensor:
        """``T`` (float64, on the CPU)."""
        m = self.size
        t = torch.diag(torch.tensor(self.alpha, dtype=torch.float64))
        if m > 1:
            off = torch.tensor(self.beta[: m - 1], dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        return t

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """Ritz values (ascending), eigenvectors of ``T`` (columns) and residual norms
        ``||H y_i - theta_i y_i|| = beta_m |s_{m,i}|`` (zero after a breakdown)."""
        theta, s = torch.linalg.eigh(self.tridiagonal())
        last = self.beta[-1] if self._next is not None else 0.0
        return theta, s, (last * s[-1]).abs()

    def vectors(self, s: Tensor) -> Tensor:
        """Ritz vectors ``Q^T s`` for the columns of ``s`` (returned as rows)."""
        return s.T.to(self.Q.dtype).to(self.Q.device) @ self.Q[: self.size]


def _top_k_lanczos(
    op: _Operator, gen: torch.Generator, k: int, max_iter: int, tol: float
) -> tuple[Tensor, Tensor, Tensor, bool, int, list[tuple[float, ...]]]:
    steps = min(max_iter, op.n)
    lz = _Lanczos(op, steps)
    lz.start(op.randn(gen))
    history: list[tuple[float, ...]] = []
    converged = False
    while True:
        lz.step()
        theta, s, res = lz.ritz()
        top = torch.arange(lz.size - 1, max(lz.size - 1 - k, -1), -1)
        history.append(tuple(float(t) for t in theta[top]))
        if lz.size >= k:
            bound = torch.clamp(tol * theta[top].abs(), min=lz.tiny())
            converged = bool((res[top] <= bound).all())
        if converged or lz.size >= steps:
            break
        if lz.broke_down:  # invariant subspace: go on from a fresh direction
            while not lz.start(op.randn(gen)):
                pass
    top = top[: min(k, lz.size)]
    return theta[top], lz.vectors(s[:, top]), res[top], converged, lz.size, history


# ------------------------------------------------------------------------------------------ power
def _top_k_power(
    op: _Operator, gen: torch.Generator, k: int, max_iter: int, tol: float
) -> tuple[Tensor, Tensor, Tensor, bool, int, list[tuple[float, ...]]]:
    """Power iteration on ``P (H - s I) P`` where ``P`` projects out the eigenvectors found so far;
    ``s = 0`` first, and if that converges to a negative value ``theta`` (an eigenvalue of largest
    magnitude that is negative) once more with ``s = theta``, whose dominant eigenvalue is then
    ``lambda_max - theta >= 0``: the result is the largest algebraic eigenvalue."""
    found: list[Tensor] = []
    values, residuals, history = [], [], []
    all_converged, iterations, anorm = True, 0, 0.0
    eps = torch.finfo(op.dtype).eps

    def project(x: Tensor) -> Tensor:
        for u in found:
            x = x - (u @ x) * u
        return x

    for _ in range(k):
        shift = 0.0
        for _attempt in range(2):
            v = project(op.randn(gen))
            v = v / torch.linalg.vector_norm(v)
            theta, res, converged = 0.0, math.inf, False
            for it in range(max_iter):
                iterations += 1
                hv = project(op(v) - shift * v)
                theta = float(v @ hv)
                res = float(torch.linalg.vector_norm(hv - theta * v))  # = ||H v - lambda v|| on P
                history.append((theta + shift,))
                norm = float(torch.linalg.vector_norm(hv))
                anorm = max(anorm, norm + abs(shift))
                if res <= max(tol * abs(theta + shift), 100.0 * eps * anorm) or norm == 0.0:
                    converged = True
                    break
                if it + 1 < max_iter:  # keep v paired with theta and res when stopping here
                    v = hv / norm
            if theta >= 0.0 or shift != 0.0:
                break
            shift = theta  # the dominant eigenvalue is negative: shift it to zero and go again
        all_converged &= converged
        values.append(theta + shift)
        residuals.append(res)
        found.append(v)
    return (
        torch.tensor(values, dtype=torch.float64), torch.stack(found), torch.tensor(residuals),
        all_converged, iterations, history,
    )


# ------------------------------------------------------------------------------------------ public
def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    k: int = 1,
    seed: int = 0,
    *,
    mode: str = "eval",
    params: ParamSelector = None,
    method: str = "lanczos",
    max_iter: int = 100,
    tol: float = 1e-6,
    dtype: torch.dtype | None = None,
    return_eigenvectors: bool = False,
    return_info: bool = False,
    reuse_graph: bool | None = None,
) -> Any:
    r"""The ``k`` largest (algebraic) eigenvalues of the Hessian of the loss, in descending order.

    ``H = \nabla^2_w mean_b loss_fn(model[w], b)`` at the model's weights, restricted to the
    parameters chosen by ``params`` (a name prefix like ``"layer3."`` gives the diagonal block of that
    layer; see also :func:`layerwise_top_eigenvalues`).

    Methods:

    * ``"lanczos"`` (default): Lanczos from a Gaussian start vector drawn with ``seed``, with full
      reorthogonalization and without restarts: the Krylov space ``K_m(H, v)`` grows by one
      Hessian-vector product per step and the top-k Ritz values of ``T_m = Q_m^T H Q_m`` are checked
      after every step. It stops when each of the k Ritz pairs ``(theta_i, y_i)`` has residual
      ``||H y_i - theta_i y_i|| = beta_m |s_{m,i}| <= tol |theta_i|`` (or is at the rounding level
      ``100 eps ||T||``, the most a given dtype allows); by the residual bound for symmetric
      matrices an eigenvalue of ``H`` then lies within ``tol |theta_i|`` of ``theta_i`` (in practice
      within about ``residual^2 / gap``), or after ``max_iter`` steps. Memory: ``max_iter + 1``
      vectors of size ``n``. Lanczos (1950); Golub & Van Loan, *Matrix Computations* (4th ed.),
      §10.1-10.3; Parlett, *The Symmetric Eigenvalue Problem*, ch. 4 and 13.
    * ``"power"``: power iteration with deflation (the method of PyHessian): ``v <- H v / ||H v||``
      until the residual test above holds for the Rayleigh quotient or ``max_iter`` iterations (per
      eigenvalue); the next eigenvalue is computed on the complement of the vectors found. Unlike
      plain power iteration, a negative dominant eigenvalue is shifted away, so the result is the
      largest algebraic eigenvalue too. Converges linearly with rate ``|lambda_2 / lambda_1|``:
      usually many more products than Lanczos for the same accuracy.

    Lanczos from a single vector sees each distinct eigenvalue once: a multiple eigenvalue is found
    again only after the Krylov space is exhausted (then the iteration restarts from a new random
    vector) or through rounding; Hessians of trained networks rarely have exact multiplicities.

    Args:
        model: the model (never modified).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        batches: the batches; ``L`` is the mean of ``loss_fn`` over them.
        k: how many eigenvalues (``1 <= k <= n``).
        seed: seeds the start vector(s) and the global RNG inside the call (restored afterwards).
        mode: ``"eval"`` or ``"train"``: the layers' behaviour during the measurement. The default is
            ``"eval"``; pass it explicitly to document what was measured.
        params: which parameters (``None``: all that require grad).
        method: ``"lanczos"`` or ``"power"``.
        max_iter: most Lanczos steps (at least ``k``), or power iterations per eigenvalue.
        tol: relative residual tolerance.
        dtype: dtype of the computation (e.g. ``torch.float64``; default the parameters' dtype).
        return_eigenvectors: also return the eigenvectors as a ``[k, n]`` tensor (flat, in the order
            of :attr:`LossFunction.names`; ``LossFunction.unflatten`` gives them per parameter).
        return_info: also return a :class:`HessianInfo`.
        reuse_graph: build the gradient and its autograd graph once and run each Hessian-vector
            product as one backward through it (as PyHessian does for a single batch), instead of a
            forward, a backward and a double backward per product. ``None`` (default): reuse exactly
            when there is one batch, where keeping the graph costs no more peak memory than one
            product; ``True`` with many batches keeps every batch's graph alive at once. With
            dropout in ``mode="train"`` reuse freezes one dropout mask per batch.

    Returns:
        ``values`` (1-D float64 tensor, descending); with ``return_eigenvectors``
        ``(values, vectors)``; with ``return_info`` the info is appended to the tuple. A
        ``RuntimeWarning`` is issued when the tolerance was not met in ``max_iter`` iterations.
    """
    check_mode(mode)
    check_int("k", k, 1)
    check_int("seed", seed, 0)
    check_choice("method", method, _EIG_METHODS)
    check_int("max_iter", max_iter, 1)
    tol = _check_tol(tol)
    with preserved(model, seed):
        lf, op = _setup(
            model, loss_fn, batches, mode=mode, params=params, dtype=dtype, reuse_graph=reuse_graph
        )
        if k > op.n:
            raise ValueError(f"invalid k: {k!r} (the Hessian has only n = {op.n} eigenvalues)")
        if method == "lanczos" and max_iter < k:
            raise ValueError(f"invalid max_iter: {max_iter!r} (Lanczos needs max_iter >= k = {k})")
        gen = _generator(seed, op.device)
        run = _top_k_lanczos if method == "lanczos" else _top_k_power
        values, vectors, residuals, converged, iterations, history = run(op, gen, k, max_iter, tol)
        values = values.to(torch.float64).cpu()
        order = torch.argsort(values, descending=True, stable=True)
        values, vectors, residuals = values[order], vectors[order], residuals[order]
        vectors = _canonical_sign(vectors / torch.linalg.vector_norm(vectors, dim=1, keepdim=True))
        info = HessianInfo(
            method=method, matvecs=op.matvecs, iterations=iterations, converged=converged,
            loss_evaluations=lf.evaluations, residuals=tuple(float(r) for r in residuals),
            history=tuple(history),
        )
    if not converged:
        rel = max(float(r) / max(abs(float(v)), 1e-300) for r, v in zip(residuals, values))
        warnings.warn(
            f"hessian_eigenvalues(method={method!r}) did not reach tol={tol:g} in max_iter={max_iter} "
            f"iterations (largest relative residual {rel:.2e}); raise max_iter or tol",
            RuntimeWarning,
            stacklevel=2,
        )
    out: tuple[Any, ...] = (values,)
    if return_eigenvectors:
        out += (vectors,)
    if return_info:
        out += (info,)
    return out[0] if len(out) == 1 else out


def _canonical_sign(vectors: Tensor) -> Tensor:
    """Flip each row so that its entry of largest magnitude is positive (eigenvectors are defined up
    to sign; this makes them reproducible)."""
    if vectors.numel() == 0:
        return vectors
    idx = vectors.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(vectors.gather(1, idx))
    return vectors * torch.where(signs == 0, torch.ones_like(signs), signs)


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    seed: int = 0,
    *,
    mode: str = "eval",
    params: ParamSelector = None,
    method: str = "hutch++",
    num_matvecs: int = 60,
    dtype: torch.dtype | None = None,
    return_info: bool = False,
    reuse_graph: bool | None = None,
) -> Any:
    r"""Estimate ``tr(H)`` with ``num_matvecs`` Hessian-vector products, and its standard error.

    * ``"hutch++"`` (default; Meyer, Musco, Musco & Woodruff, "Hutch++: Optimal Stochastic Trace
      Estimation", SOSA 2021): with ``m = num_matvecs``, draw a Rademacher sketch ``S`` of
      ``s = floor(m / 3)`` columns, take an orthonormal basis ``Q`` (``r <= s`` columns, by SVD, rank
      revealed) of ``H S``, compute ``tr(Q^T H Q)`` exactly (``r`` products) and estimate the rest
      with Hutchinson on the deflated matrix using the remaining ``m - s - r`` Rademacher vectors
      ``g``: ``tr(H) ~ tr(Q^T H Q) + mean_g (P g)^T H (P g)``, ``P = I - Q Q^T``. The variance is
      that of Hutchinson on ``P H P``, whose Frobenius norm is small when the spectrum decays (the
      top eigenvalues are captured exactly): error ``O(1/m)`` instead of ``O(1/sqrt(m))`` for PSD
      matrices. With ``num_matvecs >= n`` the trace is computed exactly from the ``n`` unit vectors
      (``tr(H) = sum_i e_i^T H e_i``), with standard error 0.
    * ``"hutchinson"`` (Hutchinson 1989; PyHessian's method): ``mean_g g^T H g`` over ``m``
      Rademacher vectors.

    The standard error is the sample standard deviation of the random terms ``g^T A g`` (``A = P H P``
    for Hutch++, ``H`` for Hutchinson) divided by ``sqrt(count)``; the deflated part of Hutch++ is
    exact and adds none. It is an estimate from the same samples, so an interval of +-2-3 standard
    errors covers the trace in most, not all, runs.

    Args:
        model, loss_fn, batches, seed, mode, params, dtype: as in :func:`hessian_eigenvalues`.
        method: ``"hutch++"`` or ``"hutchinson"``.
        num_matvecs: the budget of Hessian-vector products (at least 4 for Hutch++ below ``n``,
            at least 2 for Hutchinson).
        return_info: also return a :class:`HessianInfo`.
        reuse_graph: as in :func:`hessian_eigenvalues`.

    Returns:
        ``(estimate, standard_error)`` as floats; with ``return_info`` ``(estimate, standard_error,
        info)``.
    """
    check_mode(mode)
    check_int("seed", seed, 0)
    check_choice("method", method, _TRACE_METHODS)
    check_int("num_matvecs", num_matvecs, 2 if method == "hutchinson" else 1)
    with preserved(model, seed):
        lf, op = _setup(
            model, loss_fn, batches, mode=mode, params=params, dtype=dtype, reuse_graph=reuse_graph
        )
        gen = _generator(seed, op.device)
        if method == "hutchinson":
            samples = []
            for _ in range(num_matvecs):  # one probe at a time: memory O(n)
                g = op.rademacher(gen)
                samples.append(float(g @ op(g)))
            exact, used, probes = 0.0, method, num_matvecs
        elif num_matvecs >= op.n:
            eye = torch.zeros(op.n, dtype=op.dtype, device=op.device)
            exact = 0.0
            for i in range(op.n):
                eye.zero_()[i] = 1.0
                exact += float(op(eye)[i])
            samples, used, probes = [], "exact", op.n
        else:
            if num_matvecs < 4:
                raise ValueError(
                    f"invalid num_matvecs: {num_matvecs!r} (Hutch++ needs at least 4 below n = {op.n})"
                )
            exact, samples, probes = _hutchpp(op, gen, num_matvecs)
            used = method
        estimate = exact + (sum(samples) / len(samples) if samples else 0.0)
        if len(samples) >= 2:
            mean = sum(samples) / len(samples)
            var = sum((x - mean) ** 2 for x in samples) / (len(samples) - 1)
            stderr = math.sqrt(var / len(samples))
        else:
            stderr = 0.0
        info = HessianInfo(
            method=used, matvecs=op.matvecs, iterations=probes, converged=True,
            loss_evaluations=lf.evaluations,
        )
    return (estimate, stderr, info) if return_info else (estimate, stderr)


def _hutchpp(op: _Operator, gen: torch.Generator, m: int) -> tuple[float, list[float], int]:
    """Hutch++ with ``m`` products: ``(tr(Q^T H Q), Hutchinson samples of P H P, probe count)``."""
    s = m // 3
    sketch = op.rademacher(gen, s)  # rows are the sketch vectors
    hs = torch.stack([op(v) for v in sketch], dim=1)  # n x s
    u, sv, _ = torch.linalg.svd(hs, full_matrices=False)
    cutoff = sv.max() * max(hs.shape) * torch.finfo(hs.dtype).eps if sv.numel() else 0.0
    q = u[:, sv > cutoff]  # n x r, orthonormal basis of range(H S)
    exact = sum(float(q[:, i] @ op(q[:, i].contiguous())) for i in range(q.shape[1]))
    count = m - s - q.shape[1]
    samples = []
    for _ in range(count):
        g = op.rademacher(gen)
        pg = g - q @ (q.T @ g)  # P g
        samples.append(float(pg @ op(pg)))
    return exact, samples, s + count


def spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    seed: int = 0,
    *,
    mode: str = "eval",
    params: ParamSelector = None,
    num_runs: int = 8,
    lanczos_steps: int = 40,
    grid: Tensor | None = None,
    sigma: float | None = None,
    dtype: torch.dtype | None = None,
    reuse_graph: bool | None = None,
) -> SpectralDensity:
    r"""The eigenvalue density of ``H`` by stochastic Lanczos quadrature (SLQ).

    Ubaru, Chen & Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature", SIMAX 2017;
    Ghorbani, Krishnan & Xiao, "An investigation into neural net optimization via Hessian eigenvalue
    density", ICML 2019. For each of ``num_runs`` runs: a random unit vector ``v = g / sqrt(n)``
    (``g`` Rademacher, so ``E[v v^T] = I / n``), ``m = lanczos_steps`` Lanczos steps from ``v`` with
    full reorthogonalization giving ``T_m = S diag(theta) S^T``, and the Gauss quadrature
    ``v^T f(H) v ~ sum_i S_{1i}^2 f(theta_i)``, exact for polynomials ``f`` of degree ``<= 2m - 1``.
    The nodes ``theta_i`` and weights ``S_{1i}^2 / num_runs`` of all runs form a discrete measure
    whose moments estimate ``tr(H^p) / n`` (see :meth:`SpectralDensity.moments`); the smoothed
    density is ``phi(t) = sum_i w_i exp(-(t - theta_i)^2 / (2 sigma^2)) / (sigma sqrt(2 pi))``.
    A run stops early if its Krylov space becomes invariant (then its quadrature is exact).

    Args:
        model, loss_fn, batches, seed, mode, params, dtype: as in :func:`hessian_eigenvalues`.
        num_runs: number of random start vectors (the moments' variance falls as ``1/num_runs``).
        lanczos_steps: Lanczos steps (Hessian-vector products) per run, capped at ``n``.
        grid: where to evaluate the smoothed density (default: 1000 points spanning the nodes, with
            a margin of ``5 sigma``).
        sigma: the Gaussian width (default: 1 % of the span of the nodes, or 1e-3 if they coincide).
        reuse_graph: as in :func:`hessian_eigenvalues`.

    Returns:
        A :class:`SpectralDensity` (its ``info`` field holds a :class:`HessianInfo`).
    """
    check_mode(mode)
    check_int("seed", seed, 0)
    check_int("num_runs", num_runs, 1)
    check_int("lanczos_steps", lanczos_steps, 1)
    if sigma is not None and not (isinstance(sigma, (int, float)) and sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"invalid sigma: {sigma!r} (must be a positive finite number)")
    with preserved(model, seed):
        lf, op = _setup(
            model, loss_fn, batches, mode=mode, params=params, dtype=dtype, reuse_graph=reuse_graph
        )
        gen = _generator(seed, op.device)
        steps = min(lanczos_steps, op.n)
        nodes, weights, runs, iterations = [], [], [], 0
        for r in range(num_runs):
            lz = _Lanczos(op, steps)
            lz.start(op.rademacher(gen) / math.sqrt(op.n))
            while lz.size < steps and not lz.broke_down:
                lz.step()
            iterations += lz.size
            theta, s, _ = lz.ritz()
            nodes.append(theta)
            weights.append(s[0] ** 2 / num_runs)
            runs.append(torch.full_like(theta, r, dtype=torch.long))
        info = HessianInfo(
            method="slq", matvecs=op.matvecs, iterations=iterations, converged=True,
            loss_evaluations=lf.evaluations,
        )
    node_t, weight_t = torch.cat(nodes), torch.cat(weights)
    span = float(node_t.max() - node_t.min())
    sig = float(sigma) if sigma is not None else (0.01 * span if span > 0 else 1e-3)
    if grid is None:
        grid = torch.linspace(float(node_t.min()) - 5 * sig, float(node_t.max()) + 5 * sig, 1000,
                              dtype=torch.float64)
    grid = torch.as_tensor(grid, dtype=torch.float64).cpu()
    return SpectralDensity(
        nodes=node_t, weights=weight_t, run=torch.cat(runs), grid=grid,
        density=_gaussian_density(node_t, weight_t, grid, sig), sigma=sig, num_runs=num_runs,
        lanczos_steps=steps, n=op.n, info=info,
    )


def _gaussian_density(nodes: Tensor, weights: Tensor, grid: Tensor, sigma: float) -> Tensor:
    grid = torch.as_tensor(grid, dtype=torch.float64)
    z = (grid[:, None] - nodes[None, :].to(torch.float64)) / sigma
    return (torch.exp(-0.5 * z * z) * weights.to(torch.float64)).sum(1) / (sigma * math.sqrt(2 * math.pi))


def layerwise_top_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    seed: int = 0,
    *,
    mode: str = "eval",
    method: str = "lanczos",
    max_iter: int = 100,
    tol: float = 1e-6,
    dtype: torch.dtype | None = None,
    return_info: bool = False,
    reuse_graph: bool | None = None,
) -> Any:
    """The top eigenvalue of each module's own diagonal Hessian block.

    For every module that directly owns parameters requiring grad (``module.parameters(recurse=False)``;
    e.g. each ``Linear``, ``Conv2d``, ``BatchNorm``), the largest eigenvalue of the block of ``H`` for
    exactly those parameters, the rest of the model held fixed: the same as
    ``hessian_eigenvalues(..., params=[names of that module's parameters])``. The root module, if it
    owns parameters, has the name ``""``.

    Args: as in :func:`hessian_eigenvalues`.

    Returns:
        ``{module_name: top eigenvalue}`` in ``named_modules`` order; with ``return_info``,
        ``(values, {module_name: HessianInfo})``.
    """
    check_mode(mode)
    check_int("seed", seed, 0)
    check_choice("method", method, _EIG_METHODS)
    check_int("max_iter", max_iter, 1)
    tol = _check_tol(tol)
    blocks: dict[str, list[str]] = {}
    for pname, p in model.named_parameters():  # shared parameters appear once, under their first name
        if p.requires_grad:
            blocks.setdefault(pname.rpartition(".")[0], []).append(pname)
    values: dict[str, float] = {}
    infos: dict[str, HessianInfo] = {}
    with preserved(model, seed):
        batches = list(batches)
        LossFunction(model, loss_fn, batches, mode=mode, params=None, dtype=dtype).check_deterministic()
        for name, names in blocks.items():
            chosen = frozenset(names)
            lf = LossFunction(
                model, loss_fn, batches, mode=mode, params=lambda n, _p, c=chosen: n in c, dtype=dtype
            )
            op = _Operator(lf, reuse_graph)
            run = _top_k_lanczos if method == "lanczos" else _top_k_power
            gen = _generator(seed, op.device)
            vals, _, res, converged, iterations, history = run(op, gen, 1, max_iter, tol)
            values[name] = float(vals[0])
            infos[name] = HessianInfo(
                method=method, matvecs=op.matvecs, iterations=iterations, converged=converged,
                loss_evaluations=lf.evaluations, residuals=(float(res[0]),), history=tuple(history),
            )
    stale = [n for n, i in infos.items() if not i.converged]
    if stale:
        warnings.warn(
            f"layerwise_top_eigenvalues: no convergence to tol={tol:g} in max_iter={max_iter} for "
            f"{stale}; raise max_iter or tol",
            RuntimeWarning,
            stacklevel=2,
        )
    return (values, infos) if return_info else values
