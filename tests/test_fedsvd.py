import pytest
import torch

from fedortho.fedsvd import AggregationError, check_update, refactorize, refactorize_all, refactorize_full_svd
from fedortho.rules import aggregate

torch.set_default_dtype(torch.float32)


def rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def assert_orthonormal_rows(a, tol):
    eye = torch.eye(a.shape[-2], dtype=torch.float64)
    assert torch.allclose(a.to(torch.float64) @ a.to(torch.float64).T, eye, atol=tol)


def row_projector(m):
    q, _ = torch.linalg.qr(m.T)
    return q @ q.T


@pytest.mark.parametrize("out_dim,r,in_dim", [(96, 8, 40), (40, 8, 96), (64, 4, 64), (1024, 8, 1024)])
def test_refactorize_matches_full_svd_float64(out_dim, r, in_dim):
    b, a = rand(out_dim, r, seed=1), rand(r, in_dim, seed=2)
    b_new, a_new = refactorize(b, a)
    product = b @ a
    assert (b_new @ a_new - product).norm() / product.norm() < 1e-12
    assert_orthonormal_rows(a_new, 1e-12)
    # Independent reference: the full SVD of the (out, in) product.
    u, s, vh = torch.linalg.svd(product, full_matrices=False)
    assert torch.allclose(b_new.norm(dim=0), s[:r], rtol=1e-10)  # singular values, descending
    assert torch.allclose(row_projector(a_new), row_projector(vh[:r]), atol=1e-10)  # same row space
    ref_b, ref_a = refactorize_full_svd(b, a)
    assert torch.allclose(ref_b @ ref_a, b_new @ a_new, atol=1e-10 * product.abs().max())
    # Rows agree with the reference singular vectors up to sign.
    assert torch.allclose((a_new * ref_a).sum(dim=1).abs(), torch.ones(r, dtype=torch.float64), atol=1e-8)


def test_refactorize_float32_within_tolerance():
    b, a = rand(300, 8, seed=3, dtype=torch.float32), rand(8, 200, seed=4, dtype=torch.float32)
    b_new, a_new = refactorize(b, a)
    assert b_new.dtype == torch.float32 and a_new.dtype == torch.float32
    exact = b.double() @ a.double()
    assert (b_new.double() @ a_new.double() - exact).norm() / exact.norm() < 1e-6
    assert_orthonormal_rows(a_new, 1e-6)


def test_rank_deficient_b_keeps_product_and_row_space_of_a():
    a = rand(8, 50, seed=5)
    b = rand(70, 3, seed=6) @ rand(3, 8, seed=7)  # rank 3 of 8
    b_new, a_new = refactorize(b, a)
    assert torch.allclose(b_new @ a_new, b @ a, atol=1e-12 * (b @ a).abs().max())
    assert_orthonormal_rows(a_new, 1e-12)
    assert torch.allclose(a_new @ row_projector(a), a_new, atol=1e-12)  # rows stay in row(a)
    assert torch.all(b_new[:, 3:].abs() < 1e-10)  # only 3 nonzero singular directions


def test_zero_b_gives_zero_b_and_orthonormal_basis_of_a():
    a = rand(8, 50, seed=8)
    b_new, a_new = refactorize(torch.zeros(70, 8, dtype=torch.float64), a)
    assert torch.count_nonzero(b_new) == 0
    assert_orthonormal_rows(a_new, 1e-12)
    assert torch.allclose(row_projector(a_new), row_projector(a), atol=1e-12)


def test_out_smaller_than_rank_and_rank_above_input_dim():
    b, a = rand(4, 8, seed=9), rand(8, 30, seed=10)
    b_new, a_new = refactorize(b, a)
    assert torch.allclose(b_new @ a_new, b @ a, atol=1e-12)
    assert_orthonormal_rows(a_new, 1e-12)
    with pytest.raises(ValueError, match="exceeds the input dimension"):
        refactorize(rand(10, 8), rand(8, 5))


def test_batched_equals_single_and_is_a_fixed_point():
    bs, as_ = rand(5, 60, 8, seed=11), rand(5, 8, 40, seed=12)
    b_new, a_new = refactorize(bs, as_)
    for i in range(5):
        b1, a1 = refactorize(bs[i], as_[i])
        assert torch.allclose(b1, b_new[i], atol=1e-12) and torch.allclose(a1, a_new[i], atol=1e-12)
    b2, a2 = refactorize(b_new, a_new)  # deterministic signs: refactorizing again changes nothing
    assert torch.allclose(b2, b_new, atol=1e-10) and torch.allclose(a2, a_new, atol=1e-10)


def _state(seed):
    return {
        "layer.0.q.lora_A.weight": rand(4, 20, seed=seed, dtype=torch.float32),
        "layer.0.q.lora_B.weight": rand(30, 4, seed=seed + 1, dtype=torch.float32),
        "layer.1.q.lora_A.weight": rand(4, 20, seed=seed + 2, dtype=torch.float32),
        "layer.1.q.lora_B.weight": rand(30, 4, seed=seed + 3, dtype=torch.float32),
        "classifier.weight": rand(2, 20, seed=seed + 4, dtype=torch.float32),
    }


def test_aggregate_rules_against_hand_computed_means():
    g = _state(0)
    updates = [_state(10), _state(20)]
    weights = [1.0, 3.0]
    b_keys = [k for k in g if "lora_B" in k] + ["classifier.weight"]
    only_b = [{k: u[k] for k in b_keys} for u in updates]

    ffa = aggregate("ffa", g, only_b, weights, server_round=1)
    for k in b_keys:
        assert torch.allclose(ffa[k], 0.25 * updates[0][k] + 0.75 * updates[1][k], atol=1e-6)
    for k in g:
        if "lora_A" in k:
            assert torch.equal(ffa[k], g[k])

    avg = aggregate("fedavg", g, updates, weights, server_round=1)
    for k in g:
        assert torch.allclose(avg[k], 0.25 * updates[0][k] + 0.75 * updates[1][k], atol=1e-6)

    svd = aggregate("fedsvd", g, only_b, weights, server_round=1)
    for layer in ("layer.0.q", "layer.1.q"):
        b, a = svd[f"{layer}.lora_B.weight"], svd[f"{layer}.lora_A.weight"]
        expected = ffa[f"{layer}.lora_B.weight"].double() @ g[f"{layer}.lora_A.weight"].double()
        assert torch.allclose(b.double() @ a.double(), expected, atol=1e-5)
        assert_orthonormal_rows(a, 1e-5)

    skipped = aggregate("fedsvd", g, only_b, weights, server_round=1, svd_period=2)
    assert torch.equal(skipped["layer.0.q.lora_A.weight"], g["layer.0.q.lora_A.weight"])
    assert torch.equal(skipped["layer.0.q.lora_B.weight"], ffa["layer.0.q.lora_B.weight"])


def test_bad_updates_are_rejected_with_a_clear_message():
    g = _state(0)
    good = {"layer.0.q.lora_B.weight": g["layer.0.q.lora_B.weight"]}
    nan = {"layer.0.q.lora_B.weight": torch.full((30, 4), float("nan"))}
    with pytest.raises(AggregationError, match="NaN"):
        check_update(nan, good, "client 1")
    with pytest.raises(AggregationError, match=r"shape \(3, 4\)"):
        check_update({"layer.0.q.lora_B.weight": torch.zeros(3, 4)}, good, "client 1")
    with pytest.raises(AggregationError, match="keys differ"):
        check_update({}, good, "client 1")
    with pytest.raises(AggregationError, match="must not send held tensors"):
        aggregate("fedsvd", g, [g], [1.0], 1)


def test_refactorize_all_batches_each_shape_like_single_calls():
    g = _state(0)
    g["layer.2.v.lora_A.weight"] = rand(4, 12, seed=40, dtype=torch.float32)  # a second shape
    g["layer.2.v.lora_B.weight"] = rand(50, 4, seed=41, dtype=torch.float32)
    new = refactorize_all(g)
    for layer in ("layer.0.q", "layer.1.q", "layer.2.v"):
        b, a = g[f"{layer}.lora_B.weight"], g[f"{layer}.lora_A.weight"]
        b1, a1 = refactorize(b, a)
        assert torch.allclose(new[f"{layer}.lora_B.weight"], b1, atol=1e-5)
        assert torch.allclose(new[f"{layer}.lora_A.weight"], a1, atol=1e-5)
        assert_orthonormal_rows(new[f"{layer}.lora_A.weight"], 1e-5)
        after = new[f"{layer}.lora_B.weight"].double() @ new[f"{layer}.lora_A.weight"].double()
        assert torch.allclose(b.double() @ a.double(), after, atol=1e-4)
    assert torch.equal(new["classifier.weight"], g["classifier.weight"])
