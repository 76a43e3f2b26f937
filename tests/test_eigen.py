"""The batched symmetric eigensolvers behind decoupling: the threaded split and the rank-1 squaring."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsd.layers import eigen
from dsd.layers.decouple import decouple


def _psd_with_spectrum(values: torch.Tensor, batch: int = 1) -> torch.Tensor:
    """Matrices ``Q diag(values) Q^T`` with random orthogonal Q (float64)."""
    q, _ = torch.linalg.qr(torch.randn(batch, len(values), len(values), dtype=torch.float64))
    return (q * values) @ q.mT


@pytest.fixture
def split_everything(monkeypatch):
    """Split any batch over three threads, whatever this machine's thread count."""
    monkeypatch.setattr(eigen, "_MIN_SPLIT", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", [(7, 9, 9), (2, 5, 4, 4), (1, 3, 3)])
def test_split_eigh_equals_lapack(shape, split_everything):
    a = torch.randn(*shape, dtype=torch.float64)
    matrix = a @ a.mT
    values, vectors = eigen.eigh(matrix)
    expected_values, expected_vectors = torch.linalg.eigh(matrix)
    assert values.shape == expected_values.shape and vectors.shape == expected_vectors.shape
    # to rounding, not bit for bit: MKL's batched eigh rounds a matrix differently with the batch around it (seen
    # on an AMD EPYC: one matrix alone against the same matrix in a batch of 7, 2e-14 apart)
    scale = expected_values.abs().amax(-1, keepdim=True)
    torch.testing.assert_close(values / scale, expected_values / scale, rtol=0, atol=1e-12)
    signs = torch.sign((vectors * expected_vectors).sum(-2, keepdim=True))  # an eigenvector's sign is arbitrary
    torch.testing.assert_close(vectors * signs, expected_vectors, rtol=0, atol=1e-9)
    torch.testing.assert_close(eigen.eigvalsh(matrix) / scale, torch.linalg.eigvalsh(matrix) / scale, rtol=0, atol=1e-12)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 25), gaps=st.lists(st.sampled_from([0.0, 1e-9, 3e-8, 1e-7, 1e-6, 1e-3, 0.5]), min_size=3,
                                           max_size=3),
       scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e30]), seed=st.integers(0, 2 ** 16),
       precision=st.sampled_from([torch.float64, torch.float32]))
def test_dominant_eigenvector_captures_the_top_eigenvalue(n, gaps, scale, seed, precision):
    """Tied, nearly tied and well separated leading eigenvalues, at any scale, squared in either precision, mixed in
    one batch (so matrices stop squaring at different steps): each vector's Rayleigh quotient is the top eigenvalue
    to within the bound the docstring gives (1e-6 of it)."""
    torch.manual_seed(seed)
    grams = []
    for gap in gaps:
        values = torch.rand(n, dtype=torch.float64) * 0.9
        values[0], values[-1] = 1.0, 1.0 - gap if n > 1 else 1.0
        grams.append(_psd_with_spectrum(values * scale))
    gram = torch.cat(grams)
    vector = eigen.dominant_eigenvector(gram, precision)
    assert vector.shape == (3, n) and vector.dtype == torch.float64
    torch.testing.assert_close(vector.norm(dim=-1), torch.ones(3, dtype=torch.float64))
    captured = torch.einsum("bi,bij,bj->b", vector, gram, vector)
    assert (captured >= scale * (1 - 1e-6)).all() and (captured <= scale * (1 + 1e-12)).all()
    separated = torch.tensor(gaps) >= 1e-3  # well separated: the eigenvector itself, up to sign
    expected = torch.linalg.eigh(gram)[1][..., -1]
    torch.testing.assert_close((vector * expected).sum(-1).abs()[separated],
                               torch.ones(int(separated.sum()), dtype=torch.float64))


def test_dominant_eigenvector_stops_squaring_the_converged_matrices(monkeypatch):
    """In one batch, well separated spectra stop after a few squarings and tied, nearly tied and zero matrices run
    all of them; every vector still captures the top eigenvalue to the docstring's bound, at its place in the
    batch."""
    squared = []
    matmul = torch.matmul
    monkeypatch.setattr(torch, "matmul", lambda a, b, **kw: squared.append(a.shape[0]) or matmul(a, b, **kw))
    torch.manual_seed(0)
    separated = torch.tensor([1.0, 0.5, 0.2, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    tied = torch.tensor([1.0, 1.0 - 1e-7, 0.3, 0.2, 0.1, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    grams = torch.cat([_psd_with_spectrum(separated, 5), _psd_with_spectrum(tied, 2),
                       torch.zeros(1, 9, 9, dtype=torch.float64), _psd_with_spectrum(separated * 1e-3, 4)])
    order = torch.randperm(len(grams))
    grams = grams[order].reshape(3, 4, 9, 9)
    vector = eigen.dominant_eigenvector(grams, torch.float32)
    assert vector.shape == (3, 4, 9)
    top = torch.linalg.eigvalsh(grams)[..., -1]
    captured = torch.einsum("...i,...ij,...j->...", vector, grams, vector)
    assert (captured >= top * (1 - 1e-6)).all()
    assert len(squared) == eigen.SQUARINGS and squared[0] == 12 and squared[-1] == 3  # ties and zero: every step
    assert sum(squared) <= 12 * 9 + 3 * (eigen.SQUARINGS - 9)  # the separated ones stop by the ninth squaring
    well_separated = (order < 5) | (order >= 8)
    expected = torch.linalg.eigh(grams)[1][..., -1].reshape(12, 9)[well_separated]
    torch.testing.assert_close((vector.reshape(12, 9)[well_separated] * expected).sum(-1).abs(),
                               torch.ones(int(well_separated.sum()), dtype=torch.float64))


def test_dominant_eigenvector_of_a_zero_matrix_is_zero():
    vector = eigen.dominant_eigenvector(torch.zeros(2, 4, 9, 9, dtype=torch.float64))
    assert vector.shape == (2, 4, 9) and not vector.any()


@pytest.mark.parametrize("shape", [(64, 32, 3, 3), (8, 16, 5, 5), (1, 4, 3, 3), (16, 1, 7, 7)])
def test_rank_one_decoupling_is_the_best_rank_one_approximation(shape):
    """Against LAPACK's SVD, per input channel: the same captured energy, so the same error."""
    weight = torch.randn(*shape)
    depthwise, pointwise, error = decouple(weight, 1, 1)
    w = weight.double().reshape(shape[0], shape[1], -1).transpose(0, 1)
    s = torch.linalg.svdvals(w)
    best = ((s[:, 1:] ** 2).sum() / (s ** 2).sum()).sqrt().item()
    assert error == pytest.approx(best, rel=1e-6, abs=1e-7)
    approximation = pointwise.double()[:, :, 0, 0].T[:, :, None] * depthwise.double().reshape(shape[1], 1, -1)
    assert ((w - approximation).norm() / w.norm()).item() == pytest.approx(best, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("rank", [1, 3, 9])
def test_decoupling_zero_and_rank_deficient_channels(rank):
    """A channel of zero weights and channels of rank 2 (zero singular values at ranks above 2): finite factors,
    zero for the dead channel, and the reconstruction exact wherever the rank covers the channel's own."""
    torch.manual_seed(0)
    weight = torch.randn(16, 4, 3, 3, dtype=torch.float64)
    weight[:, 1] = 0
    weight[:, 2:] = (torch.randn(2, 16, 2, dtype=torch.float64) @ torch.randn(2, 2, 9, dtype=torch.float64)
                     ).permute(1, 0, 2).reshape(16, 2, 3, 3)
    depthwise, pointwise, _ = decouple(weight, 1, rank)
    assert torch.isfinite(depthwise).all() and torch.isfinite(pointwise).all()
    assert not depthwise.reshape(4, rank, 9)[1].any() and not pointwise.reshape(16, 4, rank)[:, 1].any()
    approximation = torch.einsum("ocr,crk->ock", pointwise.reshape(16, 4, rank), depthwise.reshape(4, rank, 9))
    exact = [1, 2, 3] if rank >= 2 else [1]
    torch.testing.assert_close(approximation[:, exact], weight.reshape(16, 4, 9)[:, exact], rtol=0, atol=1e-10)
