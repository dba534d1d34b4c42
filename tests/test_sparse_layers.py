import numpy as np
import pytest
import scipy.fft
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bornsparse.nn import DCTPlusSparseLinear, SparseLinear
from bornsparse.nn._support import sample_support
from bornsparse.ops.sparse_product import check_indices

LAYERS = [SparseLinear, DCTPlusSparseLinear]
SHAPES = [(1, 1), (5, 3), (3, 5), (8, 8), (7, 13), (13, 7)]


def scipy_dct_matrix(n_in, n_out):
    q = max(n_in, n_out)
    return torch.from_numpy(scipy.fft.dct(np.eye(q), norm="ortho")[:n_in, :n_out])


# ---- the DCTpS identity ----------------------------------------------------------------


@pytest.mark.parametrize("n_in,n_out", SHAPES + [(64, 10), (10, 64)])
def test_dct_part_is_x_at_reference_matrix(n_in, n_out):
    layer = DCTPlusSparseLinear(n_in, n_out, nnz=1, dtype=torch.float64, bias=False, seed=0)
    with torch.no_grad():
        layer.values.zero_()
    x = torch.randn(5, n_in, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ scipy_dct_matrix(n_in, n_out))


@pytest.mark.parametrize("n_in,n_out", SHAPES)
@pytest.mark.parametrize("backend", ["auto", "reference", "torch_sparse"])
def test_forward_is_dense_equivalent(n_in, n_out, backend):
    layer = DCTPlusSparseLinear(
        n_in, n_out, density=0.5, alpha=0.7, init="normal", dtype=torch.float64, seed=3
    )
    layer.backend = backend
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 3, n_in, dtype=torch.float64)
    want = 0.7 * x @ scipy_dct_matrix(n_in, n_out) + x @ layer.sparse_dense().T + layer.bias
    torch.testing.assert_close(layer(x), want)
    torch.testing.assert_close(layer(x), x @ layer.to_dense().T + layer.bias)


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("n_in,n_out", [(1, 1), (5, 3), (3, 6)])
def test_gradcheck_layer(cls, n_in, n_out):
    layer = cls(n_in, n_out, density=0.5, init="normal", dtype=torch.float64, seed=1)
    x = torch.randn(4, n_in, dtype=torch.float64, requires_grad=True)
    params = tuple(layer.parameters())

    def f(x, *ps):
        saved = [p.data for p in params]
        for p, q in zip(params, ps, strict=True):
            p.data = q
        try:
            return torch.func.functional_call(
                layer, {n: q for (n, _), q in zip(layer.named_parameters(), ps, strict=True)}, (x,)
            )
        finally:
            for p, s in zip(params, saved, strict=True):
                p.data = s

    inputs = (x, *(p.detach().clone().requires_grad_() for p in params))
    assert torch.autograd.gradcheck(f, inputs)


@settings(max_examples=15, deadline=None)
@given(
    n_in=st.integers(1, 30), n_out=st.integers(1, 30), batch=st.integers(1, 9),
    seed=st.integers(0, 1000), per_row=st.booleans(),
)
def test_numba_matches_reference_gradients(n_in, n_out, batch, seed, per_row):
    support = "per_row" if per_row else "random"
    a = DCTPlusSparseLinear(n_in, n_out, density=0.5, init="normal", support=support,
                            dtype=torch.float64, seed=seed)
    b = DCTPlusSparseLinear(n_in, n_out, density=0.5, init="normal", support=support,
                            dtype=torch.float64, seed=seed)
    b.backend = "reference"
    x = torch.randn(batch, n_in, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a(xa).square().sum().backward()
    b(xb).square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


# ---- storage -----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", LAYERS)
def test_state_dict_holds_only_sparse_storage(cls):
    layer = cls(300, 200, density=0.01, seed=0)
    sd = layer.state_dict()
    want = {"values", "indices", "bias"} | ({"alpha"} if cls is DCTPlusSparseLinear else set())
    assert set(sd) == want
    assert sd["values"].shape == (600,) and sd["indices"].shape == (2, 600)
    assert sd["indices"].dtype == torch.int32  # where it fits: 12 bytes a stored weight
    check_indices(sd["indices"], (200, 300), nnz=600)
    # float32 values + int32 (row, col) pairs + bias (+ α): nothing of size in·out
    alpha_bytes = 4 if cls is DCTPlusSparseLinear else 0
    assert sum(t.nbytes for t in sd.values()) == 4 * 600 + 8 * 600 + 4 * 200 + alpha_bytes


def test_huge_layer_is_built_without_dense_storage():
    # a dense mask or weight here would be 4-16 GB; the support is O(nnz)
    layer = DCTPlusSparseLinear(65536, 65536, density=1e-4, seed=0)
    assert layer.nnz == round(1e-4 * 65536**2)
    check_indices(layer.indices, (65536, 65536), nnz=layer.nnz)
    x = torch.randn(2, 65536)
    assert layer(x).shape == (2, 65536)


@pytest.mark.parametrize("cls", LAYERS)
def test_load_state_dict_reproduces_function_and_refreshes_plan(cls):
    a = cls(20, 30, density=0.2, init="normal", seed=0)
    b = cls(20, 30, density=0.2, init="normal", seed=1)
    x = torch.randn(4, 20)
    b(x)  # builds b's plan for its own support
    assert not torch.equal(a.indices, b.indices)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(x), a(x))


def test_train_alpha_false_is_a_buffer():
    layer = DCTPlusSparseLinear(6, 4, nnz=3, alpha=2.0, train_alpha=False)
    assert "alpha" not in dict(layer.named_parameters())
    assert float(layer.state_dict()["alpha"]) == 2.0
    layer2 = DCTPlusSparseLinear(6, 4, nnz=3)
    assert isinstance(layer2.alpha, torch.nn.Parameter)


def test_double_and_dtype():
    layer = DCTPlusSparseLinear(6, 4, nnz=5).double()
    assert layer.values.dtype == layer.alpha.dtype == torch.float64
    assert layer.indices.dtype == torch.int32
    assert layer(torch.randn(3, 6, dtype=torch.float64)).dtype == torch.float64


# ---- supports, seeds, init ---------------------------------------------------------------


@pytest.mark.parametrize("cls", LAYERS)
def test_exact_nnz_and_seeds(cls):
    a = cls(50, 40, density=0.013, seed=5)
    assert a.nnz == round(0.013 * 2000) == 26
    b = cls(50, 40, density=0.013, seed=5)
    c = cls(50, 40, density=0.013, seed=6)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)
    assert not torch.equal(a.indices, c.indices)
    assert cls(50, 40, nnz=2000).nnz == 2000  # full density is allowed


def test_per_row_support_counts():
    layer = SparseLinear(10, 7, nnz=23, support="per_row", seed=0)
    counts = torch.bincount(layer.indices[0], minlength=7)
    assert counts.tolist() == [4, 4, 3, 3, 3, 3, 3]


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 50), cols=st.integers(1, 50), frac=st.floats(0.001, 1.0),
       per_row=st.booleans(), seed=st.integers(0, 10**6))
def test_sample_support_is_valid(rows, cols, frac, per_row, seed):
    nnz = max(1, int(frac * rows * cols))
    if per_row and -(-nnz // rows) > cols:
        return
    idx = sample_support(rows, cols, nnz, torch.Generator().manual_seed(seed), per_row=per_row)
    check_indices(idx, (rows, cols), nnz=nnz)
    if per_row:
        counts = torch.bincount(idx[0], minlength=rows)
        assert counts.max() - counts.min() <= 1
        assert torch.all(counts[:-1] >= counts[1:])


def test_sample_support_bad_input():
    with pytest.raises(ValueError, match="nnz must be at most rows·cols = 4"):
        sample_support(2, 2, 5, per_row=True)
    with pytest.raises(ValueError, match="nnz must be at most rows·cols = 4"):
        sample_support(2, 2, 5)
    with pytest.raises(ValueError, match="cols must be a positive int"):
        sample_support(2, 0, 1)


def test_sample_support_is_uniform():
    # 5 of 20 positions, 3000 draws: each position's frequency is 0.25 ± ~0.008 (1 sd)
    g = torch.Generator().manual_seed(0)
    hits = torch.zeros(20)
    for _ in range(3000):
        idx = sample_support(4, 5, 5, g)
        hits[idx[0] * 5 + idx[1]] += 1
    freq = hits / 3000
    assert (freq - 0.25).abs().max() < 0.04
    # the low-density path (rejection) too: 3 of 400 positions, row marginals
    rows = torch.zeros(4)
    for _ in range(2000):
        rows += torch.bincount(sample_support(4, 100, 3, g)[0], minlength=4)
    assert ((rows / rows.sum()) - 0.25).abs().max() < 0.03


def test_init_scales():
    assert torch.count_nonzero(DCTPlusSparseLinear(100, 100, nnz=500, seed=0).values) == 0
    v = SparseLinear(1000, 1000, nnz=100_000, seed=0).values  # fan = 100
    assert abs(v.std().item() - (2 / 100) ** 0.5) < 0.01
    v = DCTPlusSparseLinear(1000, 1000, nnz=100_000, init="normal", seed=0).values
    assert abs(v.std().item() - (1 / 100) ** 0.5) < 0.01
    assert SparseLinear(4, 4, nnz=3, init="zeros").values.abs().sum() == 0


# ---- support replacement and optimizers --------------------------------------------------


@pytest.mark.parametrize("cls", LAYERS)
def test_from_indices_sorts_and_keeps_value_pairing(cls):
    idx = torch.tensor([[2, 0, 1], [1, 3, 0]])
    vals = torch.tensor([1.0, 2.0, 3.0])
    layer = cls.from_indices(4, 3, idx, vals, bias=False)
    assert layer.indices.tolist() == [[0, 1, 2], [3, 0, 1]]
    dense = torch.zeros(3, 4)
    dense[idx[0], idx[1]] = vals
    if cls is SparseLinear:
        torch.testing.assert_close(layer.to_dense(), dense)
    else:
        torch.testing.assert_close(layer.sparse_dense(), dense)
    with pytest.raises(ValueError, match=r"values must have shape \(3,\)"):
        cls.from_indices(4, 3, idx, vals[:2])


@pytest.mark.parametrize("cls", LAYERS)
def test_update_support_keeps_parameter_and_refreshes_plan(cls):
    layer = cls(6, 5, nnz=4, init="normal", seed=0)
    vid = id(layer.values)
    x = torch.randn(3, 6)
    layer(x)
    new_idx = torch.tensor([[4, 0, 3, 1], [5, 0, 2, 2]])
    new_vals = torch.tensor([1.0, -1.0, 0.5, 2.0])
    layer.update_support_(new_idx, new_vals)
    assert id(layer.values) == vid
    w = torch.zeros(5, 6)
    w[new_idx[0], new_idx[1]] = new_vals
    torch.testing.assert_close(layer.sparse_dense(), w)
    torch.testing.assert_close(layer(x), x @ layer.to_dense().T + layer.bias)
    with pytest.raises(ValueError, match=r"indices must have shape \(2, 4\)"):
        layer.update_support_(new_idx[:, :3], new_vals[:3])
    with pytest.raises(ValueError, match=r"values must have shape \(4,\)"):
        layer.update_support_(new_idx, new_vals[:3])
    with pytest.raises(ValueError, match=r"indices\[1\] \(columns\) must lie in \[0, 6\)"):
        layer.update_support_(torch.tensor([[0, 1, 2, 3], [0, 0, 0, 6]]), new_vals)
    with pytest.raises(ValueError, match="duplicate"):
        layer.update_support_(torch.tensor([[0, 0, 2, 3], [1, 1, 0, 0]]), new_vals)


def test_optimizer_updates_in_place_and_training_reduces_loss():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        DCTPlusSparseLinear(16, 32, density=0.1, seed=0), torch.nn.ReLU(),
        DCTPlusSparseLinear(32, 1, density=0.2, seed=1),
    )
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    x = torch.randn(64, 16)
    y = x[:, :1] * x[:, 1:2]
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    layer = model[0]
    torch.testing.assert_close(layer(x), x @ layer.to_dense().T + layer.bias)


# ---- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("cls", LAYERS)
def test_bad_arguments(cls):
    with pytest.raises(ValueError, match=r"density must lie in \(0, 1\], got 0"):
        cls(4, 4, density=0)
    with pytest.raises(ValueError, match=r"density must lie in \(0, 1\], got 1.5"):
        cls(4, 4, density=1.5)
    with pytest.raises(ValueError, match=r"nnz must lie in \[1, 16\].*got 17"):
        cls(4, 4, nnz=17)
    with pytest.raises(ValueError, match=r"nnz must lie in \[1, 16\].*got 0"):
        cls(4, 4, nnz=0)
    with pytest.raises(TypeError, match="nnz must be an int"):
        cls(4, 4, nnz=2.0)
    with pytest.raises(ValueError, match="exactly one of nnz and density"):
        cls(4, 4, nnz=2, density=0.5)
    with pytest.raises(ValueError, match="exactly one of nnz and density"):
        cls(4, 4)
    with pytest.raises(ValueError, match="gives 0.016 < 1 entries"):
        cls(4, 4, density=0.001)
    with pytest.raises(ValueError, match="in_features must be a positive integer"):
        cls(0, 4, nnz=1)
    with pytest.raises(ValueError, match="support must be one of"):
        cls(4, 4, nnz=1, support="rows")
    with pytest.raises(ValueError, match="init must be one of"):
        cls(4, 4, nnz=1, init="xavier")
    with pytest.raises(TypeError, match="seed must be an int"):
        cls(4, 4, nnz=1, seed="a")
    with pytest.raises(TypeError, match="dtype must be a real floating"):
        cls(4, 4, nnz=1, dtype=torch.int32)
    layer = cls(4, 3, nnz=2)
    with pytest.raises(ValueError, match=r"input must have shape \(\.\.\., 4\), got \(2, 3\)"):
        layer(torch.randn(2, 3))
    with pytest.raises(TypeError, match="input must have the layer's dtype torch.float32"):
        layer(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="input must have a real floating dtype"):
        layer(torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="backend must be one of"):
        layer.backend = "gpu"
    with pytest.raises(ValueError, match="either indices or nnz/density"):
        cls(4, 3, nnz=2, indices=torch.tensor([[0], [0]]))


def test_bad_alpha():
    with pytest.raises(TypeError, match="alpha must be a real number"):
        DCTPlusSparseLinear(4, 4, nnz=1, alpha="1")
    with pytest.raises(TypeError, match="train_alpha must be a bool"):
        DCTPlusSparseLinear(4, 4, nnz=1, train_alpha=1)


@pytest.mark.parametrize("n_in,n_out", SHAPES)
def test_fused_and_plain_dct_paths_agree_in_the_layer(monkeypatch, n_in, n_out):
    import bornsparse.ops.discrete_cosine.transform as D

    layer = DCTPlusSparseLinear(n_in, n_out, density=0.5, alpha=0.8, init="normal",
                                dtype=torch.float64, seed=2)
    x = torch.randn(2, 3, n_in, dtype=torch.float64)
    results = []
    for threshold in (0, 1 << 62):
        monkeypatch.setattr(D, "_NUMBA_MIN_SIZE", threshold)
        layer.zero_grad()
        xx = x.clone().requires_grad_()
        y = layer(xx)
        y.square().sum().backward()
        results.append([y, xx.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cls", LAYERS)
def test_empty_batch_and_inference_mode(cls):
    layer = cls(30, 20, density=0.1, seed=0)
    assert layer(torch.zeros(0, 30)).shape == (0, 20)
    x = torch.randn(5, 30)
    want = layer(x).detach()
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), want)


@pytest.mark.parametrize("n_in,n_out,batch", [(7, 12, 1), (12, 7, 37), (30, 30, 20)])
def test_fused_layer_path_matches_reference(monkeypatch, n_in, n_out, batch):
    # small sizes normally skip the fused CPU path (ops/discrete_cosine/transform.py);
    # force it, in several blocks
    import bornsparse.ops.discrete_cosine.plus_sparse as A
    import bornsparse.ops.discrete_cosine.transform as D

    monkeypatch.setattr(D, "_NUMBA_MIN_SIZE", 0)
    monkeypatch.setattr(A, "_BLOCK_BYTES", 0)
    a, b = (DCTPlusSparseLinear(n_in, n_out, density=0.3, init="normal", alpha=0.6,
                                dtype=torch.float64, seed=5) for _ in range(2))
    b.backend = "reference"
    with torch.no_grad():
        for m in (a, b):
            m.bias.copy_(torch.linspace(-1, 1, n_out, dtype=torch.float64))
    x = torch.randn(batch, 2, n_in, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    torch.testing.assert_close(ya, yb)
    gy = torch.randn_like(ya)
    ya.backward(gy)
    yb.backward(gy)
    torch.testing.assert_close(xa.grad, xb.grad)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=n)
