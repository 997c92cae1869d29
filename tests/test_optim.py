"""Orthogonalized optimizers against float64 references written from the formulas."""

import math

import pytest
import torch

from fedortho.optim import build_optimizer
from fedortho.optim.optimizers import ROOT, AuON, HybridAuON, Muon, NorMuon

A_, B_, C_ = 3.4445, -4.7750, 2.0315
SHAPES = [(12, 12), (40, 6), (6, 40)]


# -- independent float64 references, one matrix at a time ---------------------------------------
def ref_ns(u, steps=5, coeffs=(A_, B_, C_)):
    a_, b_, c_ = coeffs
    x = u.T if u.shape[0] > u.shape[1] else u
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        a = x @ x.T
        x = a_ * x + (b_ * a + c_ * a @ a) @ x
    return x.T if u.shape[0] > u.shape[1] else x


def ref_polar(u):
    """The exact polar factor from a full float64 SVD."""
    left, _, right = torch.linalg.svd(u.double(), full_matrices=False)
    return left @ right


def ref_quantile(values, q):
    """Linear-interpolation quantile by sorting (as the ROOT reference's kthvalue and lerp)."""
    flat = values.flatten().sort().values
    index = q * (flat.numel() - 1)
    low, high = math.floor(index), math.ceil(index)
    return flat[low] + (flat[high] - flat[low]) * (index - low)


# ROOT's coefficients for the shapes its table covers, copied here from the paper's reference
# code and the fit (fedortho.optim.root_fit); every other shape takes Muon's.
ROOT_TABLE = {(8, 384): (2.6740, -3.1567, 1.4800), (2048, 2048): (3.4916, -4.8224, 2.1095)}


def ref_root(u, exact=False):
    eps = ref_quantile(u.abs(), 0.9) + 1e-9
    outliers = torch.sign(u) * torch.relu(u.abs() - eps)
    base = u - outliers
    if exact:
        return ref_polar(base)
    return ref_ns(base, coeffs=ROOT_TABLE.get((min(u.shape), max(u.shape)), (A_, B_, C_)))


def ref_cosh_r(x):
    return math.sqrt(float((torch.cosh(x) ** 2).mean()))


def ref_direction(name, u, v=None, exact=False):
    if name == "root":
        return ref_root(u, exact)
    if name == "muon":
        return ref_polar(u) if exact else ref_ns(u)
    if name == "auon":
        x = u / (u.norm() + 1e-7)
        return x / ref_cosh_r(x)
    if name == "hybrid-auon":
        x = ref_ns(u, steps=1)
        return x / ref_cosh_r(x)
    o = ref_polar(u) if exact else ref_ns(u)  # normuon; v updated in place
    v.mul_(0.95).add_(0.05 * (o ** 2).mean(dim=1, keepdim=True))
    scaled = o / (v.sqrt() + 1e-8)
    return scaled * (o.norm() / (scaled.norm() + 1e-7))


def ref_steps(name, p0, grads, lr, beta=0.95, exact=False):
    p, m = p0.clone(), torch.zeros_like(p0)
    v = torch.zeros(p0.shape[0], 1, dtype=p0.dtype)
    for g in grads:
        if name == "root":  # the ROOT reference's momentum: M <- beta M + G, u = G + beta M
            m = beta * m + g
            u = g + beta * m
        else:
            m = beta * m + (1 - beta) * g
            u = (1 - beta) * g + beta * m
        p = p - lr * max(1.0, p.shape[0] / p.shape[1]) ** 0.5 * ref_direction(name, u, v, exact)
    return p


CLASSES = {"muon": Muon, "auon": AuON, "hybrid-auon": HybridAuON, "normuon": NorMuon, "root": ROOT}
# ROOT's reference momentum is the shared one times 1 / (1 - beta): the same direction after
# clamping and normalization, up to the normalization's 1e-7 and the quantile's +1e-9.
ATOL = {"root": 1e-8}


@pytest.mark.parametrize("name", list(CLASSES))
@pytest.mark.parametrize("shape", SHAPES)
def test_step_matches_float64_reference(name, shape):
    g = torch.Generator().manual_seed(1)
    p0 = torch.randn(*shape, generator=g, dtype=torch.float64)
    grads = [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(3)]
    p = torch.nn.Parameter(p0.clone())
    opt = CLASSES[name]([p], lr=0.03)
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
    assert torch.allclose(p.detach(), ref_steps(name, p0, grads, 0.03), atol=ATOL.get(name, 1e-10), rtol=0)


@pytest.mark.parametrize("name", list(CLASSES))
def test_batched_stack_equals_per_parameter_loop_and_reference(name):
    g = torch.Generator().manual_seed(2)
    starts = [torch.randn(30, 4, generator=g, dtype=torch.float64) for _ in range(5)]
    grads = [[torch.randn(30, 4, generator=g, dtype=torch.float64) for _ in range(5)] for _ in range(2)]
    results = []
    for batched in (True, False):
        params = [torch.nn.Parameter(s.clone()) for s in starts]
        opt = CLASSES[name](params, lr=0.05, batched=batched)
        for step_grads in grads:
            for p, gr in zip(params, step_grads):
                p.grad = gr.clone()
            opt.step()
        results.append([p.detach().clone() for p in params])
    for i, s in enumerate(starts):
        ref = ref_steps(name, s, [grads[0][i], grads[1][i]], 0.05)
        tol = ATOL.get(name, 1e-10)
        assert torch.allclose(results[0][i], ref, atol=tol) and torch.allclose(results[1][i], ref, atol=tol)


@pytest.mark.parametrize("shape", [(384, 8), (8, 384), (12, 12)])
def test_root_clamps_outliers_and_uses_its_shapes_coefficients(shape):
    from fedortho.optim.orthogonal import NS_COEFFS, root_clamp, root_coefficients

    g = torch.Generator().manual_seed(8)
    p0 = torch.randn(*shape, generator=g, dtype=torch.float64)
    grads = [torch.randn(*shape, generator=g, dtype=torch.float64) * (1 + 20 * (torch.rand(*shape, generator=g,
             dtype=torch.float64) > 0.97)) for _ in range(3)]  # a few outliers
    p = torch.nn.Parameter(p0.clone())
    opt = ROOT([p], lr=0.02)
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
    assert torch.allclose(p.detach(), ref_steps("root", p0, grads, 0.02), atol=1e-8, rtol=0)
    expected = ROOT_TABLE.get((min(shape), max(shape)), NS_COEFFS)
    assert root_coefficients(*shape) == expected
    clamped = root_clamp(grads[0])
    assert (clamped != grads[0]).double().mean() == pytest.approx(0.1, abs=0.01)  # the top tenth
    assert float(clamped.abs().max()) == pytest.approx(float(ref_quantile(grads[0].abs(), 0.9)) + 1e-9)


@pytest.mark.parametrize("name", ["muon", "normuon", "root"])
@pytest.mark.parametrize("shape", [(40, 6), (6, 40), (12, 12)])
def test_the_exact_option_steps_with_the_svd_polar_factor(name, shape):
    g = torch.Generator().manual_seed(9)
    starts = [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(3)]
    grads = [[torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(3)] for _ in range(3)]
    for batched in (True, False):
        params = [torch.nn.Parameter(s.clone()) for s in starts]
        opt = CLASSES[name](params, lr=0.03, orthogonalize="exact", batched=batched)
        for step in grads:
            for p, gr in zip(params, step):
                p.grad = gr.clone()
            opt.step()
        for i, (p, s) in enumerate(zip(params, starts)):
            ref = ref_steps(name, s, [step[i] for step in grads], 0.03, exact=True)
            assert torch.allclose(p.detach(), ref, atol=ATOL.get(name, 1e-10), rtol=0)


def test_exact_polar_is_orthogonal_on_the_range_in_float32_and_batched():
    from fedortho.optim.orthogonal import exact_polar, newton_schulz

    g = torch.Generator().manual_seed(10)
    u = torch.randn(5, 384, 8, generator=g) * torch.logspace(0, -4, 8)  # condition number 1e4
    polar = exact_polar(u)
    assert polar.dtype == torch.float32
    singular = torch.linalg.svdvals(polar.double())
    assert torch.allclose(singular, torch.ones_like(singular), atol=1e-5)
    assert torch.allclose(polar.double(), ref_polar(u), atol=1e-5)
    ns = torch.linalg.svdvals(newton_schulz(u).double())
    assert (ns - 1).abs().max() > 0.1  # what the exact option removes
    deficient = torch.randn(2, 8, 3, generator=g, dtype=torch.float64) @ torch.randn(2, 3, 40, generator=g,
                                                                                      dtype=torch.float64)
    values = torch.linalg.svdvals(exact_polar(deficient)).sort(dim=-1, descending=True).values
    assert torch.allclose(values[:, :3], torch.ones(2, 3, dtype=torch.float64), atol=1e-9)
    assert values[:, 3:].abs().max() < 1e-6  # no direction invented where the matrix has none


def test_fitted_root_coefficients_bring_lora_singular_values_closer_to_one():
    """The property the LoRA coefficients were fitted for, on fresh samples, against Muon's;
    and the fit itself reproduces the table."""
    import numpy as np

    from fedortho.optim import root_fit
    from fedortho.optim.orthogonal import NS_COEFFS, ROOT_COEFFS

    grid = np.linspace(0.0, 1.0, 20001)
    for shape in root_fit.FITTED_SHAPES:
        coeffs = ROOT_COEFFS[shape]
        fresh = root_fit.singular_values(shape, count=64, seed=11)
        assert root_fit.criterion(coeffs, fresh) < root_fit.criterion(NS_COEFFS, fresh) / 20
        mapped = root_fit.after_steps(coeffs, grid)
        assert mapped.max() < 1.25 and mapped[grid > 0.05].min() > 0.9
        low, high = root_fit.spread_after(coeffs, fresh)  # what `python -m ...root_fit` prints
        muon_low, muon_high = root_fit.spread_after(NS_COEFFS, fresh)
        assert 0.95 < low and high < 1.05 and muon_low < 0.75 and muon_high > 1.1
    assert root_fit.fit((8, 384)) == pytest.approx(ROOT_COEFFS[(8, 384)], abs=2e-4)
    with pytest.raises(ValueError, match="orthogonalize"):
        AuON([torch.nn.Parameter(torch.zeros(4, 4))], orthogonalize="exact")


def test_newton_schulz_maps_singular_values_by_the_quintic_into_the_band():
    from fedortho.optim.orthogonal import newton_schulz

    g = torch.Generator().manual_seed(3)
    for shape in [(64, 8), (8, 64), (32, 32)]:
        u = torch.randn(4, *shape, generator=g, dtype=torch.float64)
        x = torch.linalg.svdvals(u) / (torch.linalg.matrix_norm(u)[:, None] + 1e-7)
        y = x.clone()
        for _ in range(5):  # the scalar quintic acts on each singular value alone
            y = A_ * y + B_ * y ** 3 + C_ * y ** 5
        out = torch.linalg.svdvals(newton_schulz(u))
        assert torch.allclose(out.sort(dim=-1).values, y.sort(dim=-1).values, atol=1e-9)
        assert out.max() < 1.2
        resolved = y[x > 0.02]  # all but vanishing directions end in the band
        assert resolved.numel() > 0.9 * y.numel() and resolved.min() > 0.65 and resolved.max() < 1.2


def test_auon_cosh_factor_is_close_to_one():
    from fedortho.optim.orthogonal import cosh_rms, frobenius_normalize

    g = torch.Generator().manual_seed(4)
    for shape in [(384, 8), (8, 384), (16, 16), (1024, 8)]:
        r = cosh_rms(frobenius_normalize(torch.randn(shape, generator=g, dtype=torch.float64)))
        assert 1.0 < float(r) < 1.0 + 1e-2


def test_non_matrix_parameters_use_adamw_or_sgd_in_the_same_optimizer():
    w = torch.nn.Parameter(torch.randn(20, 4, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    head = torch.nn.Parameter(torch.randn(2, 20, dtype=torch.float64))
    opt = AuON([{"params": [w], "orthogonal": True}, {"params": [bias, head], "orthogonal": False}],
               lr=0.1, other="adamw", other_lr=3e-3)
    ref = torch.optim.AdamW([bias.detach().clone().requires_grad_(), head.detach().clone().requires_grad_()],
                            lr=3e-3, weight_decay=0.0)
    for _ in range(3):
        grads = [torch.randn_like(t) for t in (w, bias, head)]
        for t, gr in zip((w, bias, head), grads):
            t.grad = gr
        for t, gr in zip(ref.param_groups[0]["params"], grads[1:]):
            t.grad = gr.clone()
        opt.step()
        ref.step()
    assert torch.allclose(bias, ref.param_groups[0]["params"][0], atol=1e-12)
    assert torch.allclose(head, ref.param_groups[0]["params"][1], atol=1e-12)
    assert "momentum_buffer" in opt.state[w] and "exp_avg" in opt.state[head]
    # The builder's default: the head by plain SGD at SGD's default rate.
    opt = build_optimizer("muon", [("x.lora_B.weight", w), ("classifier.weight", head)])
    before, grad = head.detach().clone(), torch.randn_like(head)
    w.grad, head.grad = torch.randn_like(w), grad
    opt.step()
    assert torch.allclose(head, before - 0.5 * grad, atol=1e-12)


@pytest.mark.parametrize("name", list(CLASSES))
def test_state_dict_round_trip(name):
    """Three same-shape matrices share one stacked state; a saved and loaded state (separate
    tensors again) continues exactly as the optimizer that never stopped."""
    g = torch.Generator().manual_seed(5)
    starts = [torch.randn(16, 4, generator=g) for _ in range(3)]
    grads = [[torch.randn(16, 4, generator=g) for _ in range(3)] for _ in range(4)]
    a = [torch.nn.Parameter(s.clone()) for s in starts]
    b = [torch.nn.Parameter(s.clone()) for s in starts]
    opt_a = CLASSES[name](a, lr=0.05)
    for step in grads[:2]:
        for p, gr in zip(a, step):
            p.grad = gr.clone()
        opt_a.step()
    with torch.no_grad():
        for pb, pa in zip(b, a):
            pb.copy_(pa)
    opt_b = CLASSES[name](b, lr=0.05)
    import io

    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)  # a real save and load, not shared tensors
    buffer.seek(0)
    opt_b.load_state_dict(torch.load(buffer))
    for step in grads[2:]:
        for pa, pb, gr in zip(a, b, step):
            pa.grad, pb.grad = gr.clone(), gr.clone()
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
        assert torch.equal(opt_a.state[pa]["momentum_buffer"], opt_b.state[pb]["momentum_buffer"])


@pytest.mark.parametrize("name,tol", [("muon", 1e-10), ("normuon", 1e-10), ("auon", 1e-3)])
def test_a_rotated_problem_follows_the_rotated_trajectory(name, tol):
    """B with momentum M on loss f(B A) vs B W, M W on f(B' A') with A' = W^T A: B'_k = B_k W.

    Exact for Muon and NorMuon (their directions commute with right rotations); AuON's
    elementwise cosh factor is not rotation invariant, but stays within ~1e-3 of 1.
    """
    g = torch.Generator().manual_seed(6)
    a = torch.linalg.qr(torch.randn(10, 4, generator=g, dtype=torch.float64))[0].T  # orthonormal rows, as FedSVD's
    target = torch.randn(12, 10, generator=g, dtype=torch.float64)
    w, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(12, 4, generator=g, dtype=torch.float64))
    b_rot = torch.nn.Parameter(b.detach() @ w)
    a_rot = w.T @ a
    opt, opt_rot = CLASSES[name]([b], lr=0.02), CLASSES[name]([b_rot], lr=0.02)

    def step(param, a_matrix, optimizer):
        optimizer.zero_grad()
        ((param @ a_matrix - target) ** 2).sum().backward()
        optimizer.step()

    for _ in range(3):
        step(b, a, opt)
        step(b_rot, a_rot, opt_rot)
    # Rotate the kept momentum as a client does after a FedSVD refactorization, then go on.
    from fedortho.optim.rotation import rotate_momentum

    rotate_momentum(opt, {b: a @ a_rot.T})  # T = A_old A_new^T = W
    with torch.no_grad():
        b.copy_(b @ w)
    for _ in range(3):
        step(b, a_rot, opt)
        step(b_rot, a_rot, opt_rot)
    assert torch.allclose(b, b_rot, atol=tol * float(b_rot.abs().max()))


# -- Triton kernels (interpreted on CPU) against the torch path ---------------------------------
@pytest.mark.parametrize("shape", [(3, 100, 8), (2, 8, 100), (2, 64, 64), (1, 1000, 16)])
def test_triton_kernels_equal_the_torch_path(shape):
    from fedortho.optim import orthogonal
    from fedortho.optim.kernels import triton_kernels as tk

    g = torch.Generator().manual_seed(7)
    u = torch.randn(*shape, generator=g)
    tall = u if shape[1] >= shape[2] else u.transpose(-1, -2)
    y = tall.contiguous()
    assert torch.allclose(tk.gram(y).double(), y.double().transpose(-1, -2) @ y.double(), atol=1e-4)
    p = torch.randn(shape[0], y.shape[2], y.shape[2], generator=g)
    assert torch.allclose(tk.ns_apply(y, p, 1.5).double(), 1.5 * y.double() + y.double() @ p.double(), atol=1e-4)
    assert torch.allclose(tk.newton_schulz(u), orthogonal.newton_schulz(u), atol=2e-5)
    assert torch.allclose(tk.auon_direction(u), orthogonal.auon_direction(u), atol=1e-6)
    assert torch.allclose(tk.hybrid_auon_direction(u), orthogonal.hybrid_auon_direction(u), atol=2e-5)


def test_fused_auon_kernel_equals_the_optimizer_step(monkeypatch):
    g = torch.Generator().manual_seed(8)
    starts = [torch.randn(48, 8, generator=g) for _ in range(3)]
    grads = [[torch.randn(48, 8, generator=g) for _ in range(3)] for _ in range(2)]

    def run():
        params = [torch.nn.Parameter(s.clone()) for s in starts]
        opt = AuON(params, lr=0.05)
        for step_grads in grads:
            for p, gr in zip(params, step_grads):
                p.grad = gr.clone()
            opt.step()
        return [p.detach() for p in params], [opt.state[p]["momentum_buffer"] for p in params]

    torch_params, torch_moms = run()
    monkeypatch.setenv("FEDORTHO_TRITON", "1")  # CPU tensors through the (interpreted) kernels
    from fedortho.optim import kernels

    assert kernels.use_triton(starts[0])
    fused_params, fused_moms = run()
    for a, b in zip(torch_params + torch_moms, fused_params + fused_moms):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("name", ["auon", "root"])
def test_dp_wrapped_step_equals_hand_made_clip_noise_and_step(tiny_cfg, name):
    """Opacus wraps the one optimizer: its step = the optimizer on (sum of clipped grads + noise) / batch."""
    from dp_reference import clipped_gradient_sum, replayed_noise, training_setup
    from torch.utils.data import DataLoader

    from fedortho import privacy
    from fedortho.train import _forward_loss

    model, dataset, names, params, batch = training_setup(tiny_cfg)
    clip, sigma = 0.05, 0.7

    clipped, factors = clipped_gradient_sum(model, params, batch, clip)
    assert min(factors) < 1.0
    reference = [p.detach().clone().requires_grad_() for p in params]
    ref_opt = build_optimizer(name, list(zip(names, reference)), 0.05)

    optimizer = build_optimizer(name, list(zip(names, params)), 0.05)
    engine, wrapped, dp_opt, _ = privacy.make_private(model, optimizer, DataLoader(dataset, batch_size=16), sigma,
                                                      clip, [], torch.Generator().manual_seed(5))
    dp_opt.zero_grad()
    _forward_loss(wrapped, batch).backward()
    dp_opt.step()
    wrapped._close()
    for ref, summed, noise in zip(reference, clipped, replayed_noise(reference, sigma * clip, seed=5)):
        ref.grad = ((summed + noise) / dp_opt.expected_batch_size).to(ref.dtype)
    ref_opt.step()
    for p, ref in zip(params, reference):
        assert torch.allclose(p, ref, atol=1e-5)


@pytest.mark.parametrize("name", ["auon", "hybrid-auon", "muon", "normuon", "root"])
def test_a_tiny_federation_learns_with_each_optimizer(tiny_cfg, name):
    from fedortho import data
    from fedortho.rules import aggregate
    from fedortho.lora import adapter_state, load_adapter_state
    from fedortho.train import evaluate
    from fedortho.worker import ClientWork, build_model, run_client_round

    cfg = tiny_cfg.replace(optimizer=name, epsilon=math.inf, local_steps=4, batch_size=32, head_lr=0.05)
    model = build_model(cfg)
    state = adapter_state(model)
    train = data.train_tensors(cfg)
    _, loss_before = evaluate(model, train)
    for rnd in range(1, 4):
        results = [run_client_round(ClientWork(cfg, pid, cfg.clients, rnd, state)) for pid in range(cfg.clients)]
        state = aggregate("fedsvd", state, [r.update for r in results], [r.num_examples for r in results], rnd)
    load_adapter_state(model, state)
    _, loss_after = evaluate(model, train)
    assert loss_after < loss_before - 0.005


@pytest.mark.parametrize("shape", [(3, 384, 8), (2, 5, 7), (1, 1, 1), (4, 2, 3)])
def test_the_quantile_by_selection_is_torchs_linear_quantile(shape):
    from fedortho.optim.orthogonal import quantile_of_magnitudes

    u = torch.randn(*shape, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    for q in (0.0, 0.37, 0.9, 1.0):
        expected = torch.quantile(u.abs().flatten(-2), q, dim=-1)
        assert torch.allclose(quantile_of_magnitudes(u, q).flatten(), expected, atol=1e-15, rtol=0)
