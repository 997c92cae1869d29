"""AuON, Hybrid-AuON, Muon, NorMuon and ROOT as ``torch.optim.Optimizer`` subclasses.

Matrix parameters get momentum (0.95, Nesterov) and an orthogonalized direction; every other
trainable parameter (bias, LayerNorm, a classification head put in a non-orthogonal group)
gets AdamW or plain SGD (``other``) inside the same optimizer, so that Opacus wraps exactly
one optimizer.

The hot path is batched: matrices of one shape are stacked and updated by one call of the
direction function (on CUDA, all of them, by Triton kernels: ``fedortho.optim.kernels``; on
CPU in cache-sized batches), never by a Python loop per parameter (``batched=False`` keeps
that loop for comparison).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from fedortho.optim import kernels
from fedortho.optim.orthogonal import exact_polar, normuon_from_orthogonal, root_coefficients, root_direction, \
    shape_scale

ORTHOGONALIZE = ("newton-schulz", "exact")


class OrthogonalMomentum(torch.optim.Optimizer):
    """Base class: subclasses define ``direction(u, params)`` for a stack ``u: (k, m, n)``.

    Param groups may set ``orthogonal``: True (all matrices), False (``other`` for all) or None
    (the default: 2-D parameters orthogonal, the rest ``other``: "adamw" or "sgd", at ``other_lr``).
    ``orthogonalize``: "newton-schulz" (five quintic steps) or "exact" (the polar factor,
    ``orthogonal.exact_polar``), for the optimizers whose direction is a polar factor
    (``exact_capable``).
    """

    exact_capable = False

    default_lr = 0.02

    def __init__(self, params, lr: float | None = None, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, other: str = "adamw", other_lr: float = 1e-3,
                 adamw_betas: tuple[float, float] = (0.9, 0.999), adamw_eps: float = 1e-8,
                 batched: bool = True, orthogonalize: str = "newton-schulz") -> None:
        lr = self.default_lr if lr is None else lr
        if lr <= 0 or other_lr <= 0 or not 0 <= momentum < 1 or other not in ("adamw", "sgd"):
            raise ValueError(f"{type(self).__name__}: need lr > 0, other_lr > 0, 0 <= momentum < 1 "
                             "and other in ('adamw', 'sgd')")
        if orthogonalize not in ORTHOGONALIZE or (orthogonalize == "exact" and not self.exact_capable):
            raise ValueError(f"{type(self).__name__}: orthogonalize must be "
                             f"{' or '.join(ORTHOGONALIZE) if self.exact_capable else 'newton-schulz'}, "
                             f"got {orthogonalize!r}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, other=other,
                        other_lr=other_lr, adamw_betas=adamw_betas, adamw_eps=adamw_eps, orthogonal=None,
                        orthogonalize=orthogonalize)
        super().__init__(params, defaults)
        self.batched = batched

    # A CPU batch is capped so that its stacked temporaries stay in cache (measured on 2 cores:
    # 16 matrices of 1024x8 step faster than 48 at once); a GPU takes each shape in one call.
    CPU_BATCH_BYTES = 512 * 1024

    def _batch_size(self, p: torch.Tensor) -> int:
        if p.is_cuda:
            return 1 << 30
        return max(1, self.CPU_BATCH_BYTES // (p.numel() * p.element_size()))

    # -- what subclasses provide ------------------------------------------------------------
    def direction(self, u: torch.Tensor, params: list[torch.Tensor], group: dict) -> torch.Tensor:
        raise NotImplementedError

    # -- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            matrices, others = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                orthogonal = group["orthogonal"] if group["orthogonal"] is not None else p.ndim == 2
                if orthogonal and p.ndim != 2:
                    raise ValueError(f"{type(self).__name__}: an orthogonal group holds a {p.ndim}-D parameter")
                (matrices if orthogonal else others).append(p)
            if group["other"] == "sgd":
                for p in others:
                    p.add_(p.grad, alpha=-group["other_lr"])
            else:
                self._adamw(others, group)
            by_shape: dict[tuple, list[torch.Tensor]] = defaultdict(list)
            for p in matrices:
                by_shape[(tuple(p.shape), p.dtype, p.device)].append(p)
            for same_shape in by_shape.values():
                size = self._batch_size(same_shape[0]) if self.batched else 1
                for start in range(0, len(same_shape), size):
                    self._orthogonal_update(same_shape[start:start + size], group)
        return loss

    def _stacked_state(self, params: list[torch.Tensor], key: str, shape: tuple) -> torch.Tensor:
        """One (k, *shape) tensor whose rows are ``state[p][key]`` of the k ``params``.

        Each parameter's state is a view of one row, so updating the stack in place updates
        every parameter's state at once, without stacking and copying back every step. The
        stack is built on first use, and again (keeping the values) whenever the rows are no
        longer views of one stack, e.g. after a state was loaded.
        """
        rows = [self.state[p].get(key) for p in params]
        base = rows[0]._base if rows[0] is not None else None
        if (base is not None and base.shape == (len(params), *shape)
                and all(r is not None and r._base is base and r.data_ptr() == base[i].data_ptr()
                        for i, r in enumerate(rows))):
            return base
        stack = torch.zeros((len(params), *shape), dtype=params[0].dtype, device=params[0].device)
        for i, (p, row) in enumerate(zip(params, rows)):
            if row is not None:
                stack[i].copy_(row)
            self.state[p][key] = stack[i]
        return stack

    def _orthogonal_update(self, params: list[torch.Tensor], group: dict) -> None:
        beta, lr = group["momentum"], group["lr"]
        momentum = self._stacked_state(params, "momentum_buffer", tuple(params[0].shape))
        grads = torch.stack([p.grad for p in params])
        momentum.lerp_(grads, 1 - beta)  # M <- beta M + (1 - beta) G
        # u (Nesterov: lerp(G, M, beta)) is a fresh tensor: the direction may work in it.
        u = grads.lerp_(momentum, beta) if group["nesterov"] else momentum.clone()
        direction = self.direction(u, params, group)
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        m, n = params[0].shape
        torch._foreach_add_(params, list(direction.unbind(0)), alpha=-lr * shape_scale(m, n))

    def _adamw(self, params: list[torch.Tensor], group: dict) -> None:
        beta1, beta2 = group["adamw_betas"]
        lr, eps = group["other_lr"], group["adamw_eps"]
        for p in params:
            state = self.state[p]
            if "exp_avg" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            bias1, bias2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
            denom = (state["exp_avg_sq"].sqrt() / bias2 ** 0.5).add_(eps)
            if group["weight_decay"]:
                p.mul_(1 - lr * group["weight_decay"])
            p.addcdiv_(state["exp_avg"], denom, value=-lr / bias1)


class Muon(OrthogonalMomentum):
    """Muon: 5 quintic Newton-Schulz steps on the Nesterov momentum; step lr * sqrt(max(1, m/n)) * X."""

    default_lr = 0.02
    exact_capable = True

    def direction(self, u, params, group):
        return exact_polar(u) if group["orthogonalize"] == "exact" else kernels.newton_schulz(u)


class AuON(OrthogonalMomentum):
    """AuON, the paper's version: X = u / ||u||_F, step lr * sqrt(max(1, m/n)) * X / r with
    r = sqrt(mean(cosh(X)^2)). No Newton-Schulz: the direction keeps u's singular vectors and
    relative singular values; the cosh factor (within ~1e-3 of 1) bounds the step's RMS."""

    default_lr = 0.05
    # No Gram products to keep in cache: a few elementwise passes gain from fewer, larger
    # calls (measured on 2 cores: 48 matrices of 1024x8 in one call, 11% faster than 16).
    CPU_BATCH_BYTES = 4 * 1024 * 1024

    def direction(self, u, params, group):
        return kernels.auon_direction(u)

    def _orthogonal_update(self, params, group):
        fusable = (kernels.use_triton(params[0]) and group["nesterov"] and not group["weight_decay"]
                   and params[0].dtype == torch.float32 and kernels.triton_fits(params[0]))
        if not fusable:  # the shared step, with the direction computed in place (CPU)
            return super()._orthogonal_update(params, group)
        # GPU: the whole step in two passes over memory
        from fedortho.optim.kernels.triton_kernels import fused_auon_step

        m, n = params[0].shape
        momentum = self._stacked_state(params, "momentum_buffer", (m, n))
        stacked_p = torch.stack(params)
        fused_auon_step(stacked_p, torch.stack([p.grad for p in params]), momentum, group["momentum"],
                        group["lr"] * shape_scale(m, n))
        torch._foreach_copy_(params, list(stacked_p.unbind(0)))


class HybridAuON(OrthogonalMomentum):
    """Hybrid-AuON: one Newton-Schulz step on u / ||u||_F, then AuON's cosh scaling."""

    default_lr = 0.05

    def direction(self, u, params, group):
        return kernels.hybrid_auon_direction(u)


class NorMuon(OrthogonalMomentum):
    """NorMuon: Muon's output normalized per row by a second moment (beta2 0.95, starting at 0)
    and rescaled to its Frobenius norm before that division."""

    default_lr = 0.02
    exact_capable = True

    def __init__(self, params, lr: float | None = None, beta2: float = 0.95, **kwargs) -> None:
        super().__init__(params, lr=lr, **kwargs)
        for group in self.param_groups:
            group.setdefault("beta2", beta2)

    def direction(self, u, params, group):
        moments = self._stacked_state(params, "second_moment", (params[0].shape[0], 1))
        if group["orthogonalize"] == "exact":
            return normuon_from_orthogonal(exact_polar(u), moments, group["beta2"])
        return kernels.normuon_direction(u, moments, group["beta2"])  # updates the moments in place


class ROOT(OrthogonalMomentum):
    """ROOT (He et al., 2025; reference code huawei-noah/noah-research ROOT/): Nesterov momentum
    0.95; the entries of u above its 0.9-quantile in magnitude (+1e-9) clamped to it (the
    soft-thresholded outliers removed); then five Newton-Schulz steps with the coefficients of
    the matrix's shape (``orthogonal.ROOT_COEFFS``), or the exact polar factor.

    Where it differs from the reference code: momentum is the shared dampened form (M <- 0.95 M
    + 0.05 G, u = lerp(G, M, 0.95)), which is the reference's (M <- 0.95 M + G, u = G + 0.95 M)
    times 0.05; clamping and the Frobenius normalization make the direction the same. The step
    is lr * sqrt(max(1, m/n)) as for the other optimizers here, not the reference's Moonlight
    scaling 0.2 * sqrt(max(m, n)) (a constant factor per shape, absorbed by the learning rate).
    """

    default_lr = 0.02
    exact_capable = True

    def direction(self, u, params, group):
        m, n = params[0].shape
        return root_direction(u, root_coefficients(m, n), exact=group["orthogonalize"] == "exact")
