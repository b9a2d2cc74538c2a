"""The sharpness of every run of a group: the top eigenvalue of its training loss's Hessian.

Gradient descent on a quadratic is stable iff lr < 2 / lambda_max; on a net, 2 / lambda_max at initialisation is
where the catapult phase begins (Lewkowycz et al. 2020) and the sharpness GD climbs to through training (Cohen et
al. 2021). The runs of a group are independent, so the Hessian of their summed loss is block-diagonal: one
Hessian-vector product of the sum (a double backward pass) is every run's product at once, and Lanczos runs on
all of them together, each run normalised and stopped on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

SHARPNESS_TOL = 1e-5
"""Lanczos stops for a run once its Ritz residual ||H y - theta y|| is at most this times |theta|: theta is then
within this, relative, of an eigenvalue of H."""
SHARPNESS_MAX_ITER = 100
"""Hessian-vector products per run at most."""


@dataclass
class Sharpness:
    """Per run of a group, (R,) each."""

    value: torch.Tensor
    """The Hessian's largest (algebraic) eigenvalue; NaN where the loss or a product is not finite, or where the
    loss has no second derivative."""
    iters: torch.Tensor
    """Hessian-vector products it took."""
    converged: torch.Tensor
    """Whether the relative residual fell to ``tol`` within ``max_iter`` products (else ``value`` is the last
    estimate)."""
    error: str | None = None
    """Why no run has a value: the first line of PyTorch's error where the loss has no second derivative."""


def _flat(parts: Sequence[torch.Tensor], R: int) -> torch.Tensor:
    return torch.cat([p.reshape(R, -1) for p in parts], dim=1)


def _split(v: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out, at = [], 0
    for p in params:
        n = p[0].numel()
        out.append(v[:, at:at + n].reshape(p.shape))
        at += n
    return out


def sharpness(losses: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], *, tol: float = SHARPNESS_TOL,
              max_iter: int = SHARPNESS_MAX_ITER, seed: int = 0) -> Sharpness:
    """The top Hessian eigenvalue of each run's loss with respect to its parameters.

    ``losses()`` returns the (R,) per-run losses; ``params`` are the (R, ...) leaves they depend on, run r's in row
    r. The start vectors are drawn from ``seed`` alone, so a run's value does not depend on its group.
    """
    R = params[0].shape[0]
    dtype, device = params[0].dtype, params[0].device
    try:
        with torch.enable_grad():
            loss = losses()
            grads = torch.autograd.grad(loss.sum(), params, create_graph=True, allow_unused=True)
        # A gradient with no graph is constant in every parameter: its rows and columns of H are zero, so the
        # products run over the other blocks alone, exactly.
        live = [(p, g) for p, g in zip(params, grads) if g is not None and g.grad_fn is not None]
        if not live:
            raise RuntimeError("the loss's gradient does not depend on the parameters")
        return _top(loss.detach(), [p for p, _ in live], [g for _, g in live], tol, max_iter, seed)
    except RuntimeError as err:  # an op without a second derivative in PyTorch ("... is not implemented")
        nan = torch.full((R,), float("nan"), dtype=dtype, device=device)
        return Sharpness(nan, torch.zeros(R, dtype=torch.long), torch.zeros(R, dtype=torch.bool),
                         str(err).strip().splitlines()[0])


def _top(loss: torch.Tensor, live: list[torch.Tensor], live_grads: list[torch.Tensor], tol: float, max_iter: int,
         seed: int) -> Sharpness:
    R, dtype, device = loss.shape[0], live[0].dtype, live[0].device

    def hvp(v: torch.Tensor) -> torch.Tensor:
        hv = torch.autograd.grad(live_grads, live, grad_outputs=_split(v, live), retain_graph=True, allow_unused=True)
        return _flat([torch.zeros_like(p) if h is None else h for p, h in zip(live, hv)], R)

    P = sum(p[0].numel() for p in live)
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(P, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device).expand(R, P)
    value, iters, converged = _lanczos(hvp, start, torch.isfinite(loss), tol, min(max_iter, P))
    return Sharpness(value.detach(), iters.cpu(), converged.cpu())


def _lanczos(hvp: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, active: torch.Tensor, tol: float,
             max_iter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lanczos on every ``active`` run at once: (top Ritz value, products used, converged).

    After k products the top eigenvalue theta of the k x k tridiagonal T is a Rayleigh quotient of H, and
    ||H y - theta y|| = beta_k |s_k| for its Ritz vector y (s: T's eigenvector), so a run stops once that residual is
    at most ``tol * |theta|``: theta is then within ``tol`` (relative) of an eigenvalue of H. Unlike power
    iteration it converges fast where the top two eigenvalues are close, and finds the largest algebraic one when
    a negative one is larger in magnitude. No reorthogonalisation: memory stays three vectors per run, and the
    loss of orthogonality that follows a converged Ritz value only repeats it.
    """
    R = start.shape[0]
    v = start / torch.linalg.vector_norm(start, dim=1, keepdim=True)
    v_prev = torch.zeros_like(v)
    alpha = torch.zeros(R, max_iter, dtype=start.dtype, device=start.device)
    beta = torch.zeros(R, max_iter, dtype=start.dtype, device=start.device)
    value = torch.full((R,), float("nan"), dtype=start.dtype, device=start.device)
    iters = torch.zeros(R, dtype=torch.long, device=start.device)
    converged = torch.zeros(R, dtype=torch.bool, device=start.device)
    active = active.clone()
    for k in range(max_iter):
        if not bool(active.any()):
            break
        w = hvp(v) - beta[:, k - 1:k] * v_prev if k else hvp(v)
        a = (v * w).sum(dim=1)
        w = w - a.unsqueeze(1) * v
        b = torch.linalg.vector_norm(w, dim=1)
        alpha[:, k], beta[:, k] = torch.where(active, a, 0), torch.where(active, b, 0)
        T = torch.diag_embed(alpha[:, :k + 1]) + torch.diag_embed(beta[:, :k], 1) + torch.diag_embed(beta[:, :k], -1)
        ok = active & torch.isfinite(T).flatten(1).all(dim=1)
        theta, s = torch.linalg.eigh(torch.where(ok.view(R, 1, 1), T, torch.zeros_like(T)))
        top, residual = theta[:, -1], b * s[:, -1, -1].abs()
        value = torch.where(ok, top, torch.where(active, float("nan"), value))
        iters = iters + active.long()
        done = ok & ((residual <= tol * top.abs()) | (b == 0))  # b == 0: an invariant subspace, theta exact
        converged = converged | done
        active = ok & ~done
        v_prev, v = v, torch.where(active.unsqueeze(1), w / torch.where(b > 0, b, 1).unsqueeze(1), v)
    return value, iters, converged
