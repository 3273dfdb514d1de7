"""resify.report.figures: norms, mean |grad|, the activations' similarity, the Sink and ``combine``."""

import math

import pytest
import torch

from resify.report.figures import (
    Sink,
    activation_figures,
    combine,
    figures_of,
    l2_norm,
    stacked_figures,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)


def test_l2_norm_by_hand():
    assert l2_norm(torch.tensor([3.0, -4.0])) == 5.0
    assert l2_norm(torch.zeros(3)) == 0.0 and l2_norm(torch.zeros(3), nonzero=False) == 0.0
    assert isinstance(l2_norm(torch.ones(4)), float)


@pytest.mark.parametrize("value", [1e20, 1e-30])
def test_l2_norm_neither_overflows_nor_underflows_in_float32(value):
    t = torch.full((100,), value, dtype=torch.float32)
    v = float(torch.tensor(value, dtype=torch.float32))  # the float32 value itself
    assert l2_norm(t) == pytest.approx(10 * v, rel=1e-6)  # √100 · v


@pytest.mark.parametrize("value", [1e20, 1e-30, 0.0])
def test_l2_norm_of_a_large_tensor_by_its_dot_product_neither_overflows_nor_underflows(value):
    t = torch.full((64, 128), value, dtype=torch.float32)  # past BATCH_NUMEL: a BLAS dot product
    v = float(torch.tensor(value, dtype=torch.float32))
    assert l2_norm(t) == pytest.approx(math.sqrt(t.numel()) * v, rel=1e-6)


def test_l2_norm_of_a_large_tensor_against_float64():
    torch.manual_seed(0)
    for t in (torch.randn(300, 500), torch.randn(500, 300).T):  # contiguous (dot) and not (vector_norm)
        assert l2_norm(t) == pytest.approx(t.double().norm().item(), rel=1e-6)


def test_l2_norm_of_a_tensor_subclass_keeps_its_own_norm(monkeypatch):
    class Sharded(torch.Tensor):  # (as DTensor: its norm may be a reduction over ranks, not a dot product)
        pass

    t = torch.randn(100, 100)
    sub = t.as_subclass(Sharded)
    monkeypatch.setattr(torch, "dot", lambda *a: pytest.fail("a subclass went to torch.dot"))
    assert l2_norm(sub) == pytest.approx(t.double().norm().item(), rel=1e-6)


def test_l2_norm_of_a_float64_tensor_is_its_own():
    t = torch.tensor([3e-5, 4e-5], dtype=torch.float64)
    assert l2_norm(t) == pytest.approx(5e-5, rel=1e-15)


def test_l2_norm_of_a_huge_float64_tensor_does_not_overflow():
    t = torch.tensor([1e200, 1e200], dtype=torch.float64)
    assert l2_norm(t) == pytest.approx(math.sqrt(2) * 1e200)
    assert l2_norm(torch.tensor([1e200, math.inf], dtype=torch.float64)) == math.inf  # a true inf stays


def test_figures_of_is_mean_abs_and_norm():
    t = torch.tensor([[3.0, -4.0], [0.0, 0.0]])
    assert figures_of(t, grads=True) == (1.75, 5.0)
    assert figures_of(t, grads=False) == (None, 5.0)


def test_figures_of_in_place_are_the_same_figures_and_leave_the_absolute_values():
    torch.manual_seed(0)
    for t in (torch.randn(5, 7), torch.randn(100, 100), torch.zeros(80, 80)):
        scratch = t.clone()
        assert figures_of(scratch, True, in_place=True) == figures_of(t, True)
        assert torch.equal(scratch, t.abs())


def test_a_sparse_tensor_is_measured_as_the_dense_one_it_stands_for_and_left_as_it_was():
    i = torch.tensor([[0, 2, 2], [1, 0, 0]])
    sparse = torch.sparse_coo_tensor(i, torch.tensor([3.0, -4.0, 1.0]), (3, 2), check_invariants=True)  # (2, 0) twice
    dense = sparse.to_dense()  # [[0, 3], [0, 0], [-3, 0]]
    assert figures_of(sparse, True) == figures_of(dense, True) == (1.0, pytest.approx(math.sqrt(18)))
    coalesced = sparse.coalesce()
    assert figures_of(coalesced, True)[0] == 1.0
    assert torch.equal(coalesced.to_dense(), dense)  # its values are the gradient itself: not made |g|
    assert figures_of(sparse, False) == (None, pytest.approx(math.sqrt(18)))


def test_stacked_figures_are_figures_of_each():
    torch.manual_seed(0)
    tensors = [torch.randn(3, 4) for _ in range(5)] + [torch.zeros(3, 4), torch.full((3, 4), 1e20)]
    for grads in (True, False):
        found = stacked_figures(tensors, grads)
        assert len(found) == len(tensors)
        for (mean, norm), t in zip(found, tensors):
            ref = t.double()
            assert norm == pytest.approx(ref.norm().item(), rel=1e-6)
            assert mean is None if not grads else mean == pytest.approx(ref.abs().mean().item(), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_gradients_mean_is_summed_in_float32(dtype):
    # a million elements of 0.1: a float16 sum would pass 65,504 (inf), a bfloat16 one keep 3 digits;
    # and the norm: a float16 one came out 99.3 for 100.0
    t = torch.full((1000, 1000), 0.1, dtype=dtype)
    ref = t.double().abs().mean().item()
    mean, norm = figures_of(t, grads=True)
    assert mean == pytest.approx(ref, rel=1e-6) and norm == pytest.approx(t.double().norm().item(), rel=1e-3)
    (stacked_mean, stacked_norm), _ = stacked_figures([t[:4].clone(), t[4:8].clone()], grads=True)
    assert stacked_mean == pytest.approx(ref, rel=1e-6)
    assert stacked_norm == pytest.approx(t[:4].double().norm().item(), rel=1e-3)


def _similarity(t):
    """Σ_{i≠j} x_i·x_j / ((N−1) Σ_i ‖x_i‖²) over the slices along dim 0, with the N×N Gram matrix."""
    x = t.double().reshape(t.shape[0], -1)
    gram = x @ x.T
    n = x.shape[0]
    return ((gram.sum() - gram.trace()) / ((n - 1) * gram.trace())).item()


def test_activation_figures_similarity_against_the_gram_matrix():
    torch.manual_seed(0)
    for shape in [(8, 16), (4, 3, 5, 5), (2, 7)]:
        t = torch.randn(shape) + 0.5
        norm, sim = activation_figures(t)
        assert norm == pytest.approx(t.double().norm().item(), rel=1e-6)
        assert sim == pytest.approx(_similarity(t), abs=1e-5)


@pytest.mark.parametrize(
    "t,sim",
    [
        (torch.ones(4, 3), 1.0),  # every example the same vector: collapsed
        (torch.eye(3), 0.0),  # orthogonal examples
        (torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), -1.0),  # opposite examples
        (torch.ones(1, 5), None),  # one example: nothing to compare
        (torch.ones(5), None),  # a vector: its examples are single numbers
        (torch.ones(3, 1), None),  # a slice of one number
        (torch.zeros(4, 3), None),  # an output of 0
    ],
)
def test_activation_figures_edge_cases(t, sim):
    norm, found = activation_figures(t)
    assert norm == pytest.approx(t.norm().item())
    assert found == (None if sim is None else pytest.approx(sim, abs=1e-6))


def test_a_sequence_compares_its_positions_too():
    torch.manual_seed(0)
    positions_alike = torch.randn(4, 1, 8).expand(4, 6, 8).contiguous()  # each example one vector at every position
    _, batch_only = activation_figures(positions_alike)
    _, both = activation_figures(positions_alike, sequence=True)
    assert batch_only == pytest.approx(_similarity(positions_alike), abs=1e-5) and batch_only < 0.9
    assert both == pytest.approx(1.0, abs=1e-5)  # the positions: one vector
    assert both == pytest.approx(_similarity(positions_alike.transpose(0, 1)), abs=1e-5)


def test_half_precision_is_measured_in_float32():
    torch.manual_seed(0)
    t = torch.randn(16, 64) * 0.01 + 1.0  # nearly collapsed: 1 - sim is ~1e-4, below float16's resolution near 1
    _, sim16 = activation_figures(t.half())
    assert sim16 == pytest.approx(_similarity(t.half().float()), abs=2e-6)


def test_sink_resolves_floats_and_tensors_in_order():
    s = Sink()
    s.add(("loss",), torch.tensor(2.5))  # a CPU tensor becomes a float at once
    s.add(("weight", "a"), 1.5)
    s.extend([("input", "a", 0), ("input", "b", 0)], [torch.tensor(0.25), 4.0])  # a tensor: stacked by pack
    assert s.resolve() == [
        (("loss",), 2.5),
        (("weight", "a"), 1.5),
        (("input", "a", 0), 0.25),
        (("input", "b", 0), 4.0),
    ]


def test_sink_resolves_an_integer_figure():
    s = Sink()
    s.add(("loss",), 3)
    s.add(("weight", "a"), torch.tensor(2))
    assert s.resolve() == [(("loss",), 3.0), (("weight", "a"), 2.0)]


def test_pack_keeps_the_keys_given_where_equal_and_accumulates():
    keys = (("loss",), ("weight", "a"))
    s = Sink()
    s.extend(list(keys), [1.0, 2.0])
    s.pack(keys_like=keys)
    assert s.keys is keys  # the very tuple: the steps of a watch share one
    s.add(("weight", "b"), 3.0)
    assert s.resolve() == [(("loss",), 1.0), (("weight", "a"), 2.0), (("weight", "b"), 3.0)]
    other = Sink()
    other.add(("loss",), 1.0)
    other.pack(keys_like=keys)
    assert other.keys == (("loss",),)


def test_combine_by_hand():
    items = [
        (("loss",), 1.0),
        (("loss",), 3.0),
        (("weight", "a"), 7.0),
        (("mean_abs", "a", 0), 1.0),
        (("mean_abs", "a", 1), 3.0),
        (("grad_norm", "a", 0), 2.0),
        (("grad_norm", "a", 1), 4.0),
        # 'a' called twice in batch 0 (two input tensors): √(3² + 4²) = 5; no input gradient in batch 1
        (("input", "a", 0), 3.0),
        (("input", "a", 0), 4.0),
        # two outputs of 4 and 12 elements, norms 2 and 4: RMS √((4 + 16) / 16); batch 1: one of norm 4 in 4
        (("act", "a", 0, 4), 2.0),
        (("act", "a", 0, 12), 4.0),
        (("act", "a", 1, 4), 4.0),
        (("sim", "a", 0), 0.2),
        (("sim", "a", 0), 0.4),
        (("sim", "a", 1), math.nan),  # not measured: left out
    ]
    out = combine(items, batches=2)
    assert out["loss"] == 2.0
    a = out["a"]
    assert a["weight"] == 7.0 and a["mean_abs"] == 2.0 and a["grad_norm"] == 3.0
    assert a["input"] == pytest.approx(5.0 / 2)  # the batch without one counts as 0
    assert a["rms"] == pytest.approx((math.sqrt(20 / 16) + math.sqrt(16 / 4)) / 2)
    assert a["similarity"] == pytest.approx(0.3)  # mean over the outputs, then over the measured batches
    assert set(a) == {"weight", "mean_abs", "grad_norm", "input", "rms", "similarity"}


def test_combine_without_a_loss_has_no_loss_key():
    assert combine([(("weight", "a"), 1.0)], batches=1) == {"a": {"weight": 1.0}}
