"""Initialisers that fill a ``DepthwiseSeparableConv2d`` from a dense conv's trained weight.

An initialiser is ``fn(separable, weight, bias) -> relative error or None`` registered by name, so
``convert_model(init=...)`` and the CLI's ``--init`` can name it. It is handed an uninitialised layer
(memory allocated, not written) and writes every weight and bias of it.
"""
from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..errors import DsdError
from .eigen import dominant_eigenvector, eigh, eigvalsh
from .separable import DepthwiseSeparableConv2d

__all__ = [
    "decouple", "decouple_many", "Factors", "factorize", "factorize_many", "initialize", "channel_slices",
    "separable_weights", "relative_error", "load_factors", "assigns_parameters", "rank_errors", "energy_rank",
    "full_rank", "resample_taps",
    "register_initializer",
    "get_initializer", "list_initializers",
]

Initializer = Callable[[DepthwiseSeparableConv2d, torch.Tensor, Optional[torch.Tensor]], Optional[float]]
_INITIALIZERS: Dict[str, Initializer] = {}


def register_initializer(name: str) -> Callable[[Initializer], Initializer]:
    def wrap(fn: Initializer) -> Initializer:
        _INITIALIZERS[name] = fn
        return fn
    return wrap


def get_initializer(name: str) -> Initializer:
    if name not in _INITIALIZERS:
        raise DsdError(f"unknown init {name!r}: choose one of {list_initializers()}")
    return _INITIALIZERS[name]


def list_initializers() -> list:
    """Per-layer initialisers; ``convert_model`` also takes ``init="data"`` (with calibration data)."""
    return sorted(_INITIALIZERS)


def full_rank(out_channels: int, groups: int, kernel_size: Sequence[int]) -> int:
    """Rank at which decoupling is exact: min(out_channels / groups, kh * kw)."""
    return min(out_channels // groups, kernel_size[0] * kernel_size[1])


def _safe_divide(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """x / d where d > 0, else 0 (a zero singular value's component carries nothing); ``d`` broadcasts to ``x``
    and is the smaller: its reciprocal is taken there, so ``x`` is read once."""
    return x * torch.where(d > 0, d.clamp_min(torch.finfo(d.dtype).tiny).reciprocal(), 0)


class Factors(NamedTuple):
    """``left @ right`` approximates each matrix; ``kept`` and ``total`` are its captured and total energy
    (sums of squared singular values, float64, one per matrix)."""
    left: torch.Tensor
    right: torch.Tensor
    kept: torch.Tensor
    total: torch.Tensor


def factorize(a: torch.Tensor, rank: int) -> Factors:
    """Best rank-``rank`` factors of a batch of matrices ``a`` (..., m, n): ``left @ right ~= a``.

    Singular values are split evenly (sqrt) between the factors. The SVD comes from the eigenvectors of
    the smaller Gram matrix (k*k <= 49 taps against hundreds of output channels): far faster than
    LAPACK's batched SVD on tall matrices, and still exact at full rank since ``a @ V @ V.T == a``. At rank 1
    only the leading eigenvector is found (:func:`dominant_eigenvector`, a few batched matmuls instead of one
    LAPACK call per matrix). The factors come in ``a``'s dtype; the eigenvectors, in float64, are orthonormal
    to float64 precision whatever the Gram matrix's rounding.
    """
    return factorize_many([a], [rank])[0]


def factorize_many(matrices: Sequence[torch.Tensor], ranks: Sequence[int]) -> List[Factors]:
    """:func:`factorize` of each batch of matrices at its rank, the eigenproblems of Gram matrices of one size
    solved together: resnet18's 17 layers in one call instead of 17 rounds of small batched matmuls."""
    grams = [_gram(a) for a in matrices]
    spectra = _leading_spectra(grams, ranks, [a.dtype for a in matrices])
    return [_factors(a, spectrum) for a, spectrum in zip(matrices, spectra)]


def _is_tall(a: torch.Tensor) -> bool:
    return a.shape[-2] >= a.shape[-1]


_FEW_TAPS, _PAIRED_MIN_ROWS = 9, 128  # at most a 3x3 kernel; see _gram


def _gram(a: torch.Tensor) -> torch.Tensor:
    """The smaller Gram matrix of each matrix in ``a``, in ``a``'s dtype."""
    if not _is_tall(a):
        return a @ a.mT
    if _side_by_side_in_memory(a):
        # Two neighbouring matrices as one twice as wide, their Gram matrices the diagonal blocks of its: batched
        # products over tall strided slices (conv weights of 3x3 kernels) run 1.2-2.7x faster on half as many
        # matrices twice as wide, measured on 128-1024 channels (at 64, 1.2x slower: not paired there)
        *batch, count, rows, n = a.shape
        pairs = a.as_strided((*batch, count // 2, rows, 2 * n), (*a.stride()[:-3], 2 * n, a.stride(-2), 1),
                             a.storage_offset())
        blocks = (pairs.mT @ pairs).unflatten(-1, (2, n)).unflatten(-3, (2, n))  # (..., count/2, 2, n, 2, n)
        return blocks.diagonal(dim1=-4, dim2=-2).movedim(-1, -3).reshape(*batch, count, n, n)
    return a.mT @ a


def _side_by_side_in_memory(a: torch.Tensor) -> bool:
    """Whether each pair of neighbouring matrices in ``a`` (..., count, rows, n) lies row by row side by side in
    memory, as the per-channel slices of a conv weight do, and the pair is worth a product of its own."""
    return (a.dim() >= 3 and a.shape[-3] % 2 == 0 and a.shape[-2] >= _PAIRED_MIN_ROWS
            and a.shape[-1] <= _FEW_TAPS and a.stride(-1) == 1 and a.stride(-3) == a.shape[-1])


class _Spectrum(NamedTuple):
    """A Gram batch's ``rank`` leading eigenpairs, largest first, float64: ``energy`` (..., r) clamped at zero,
    ``vectors`` (..., n, r); ``total`` (...) is its trace, all the energy."""
    energy: torch.Tensor
    vectors: torch.Tensor
    total: torch.Tensor


def _leading_spectra(grams: Sequence[torch.Tensor], ranks: Sequence[int], precisions: Sequence[torch.dtype]
                     ) -> List[_Spectrum]:
    """Each Gram batch's :class:`_Spectrum` at its rank; batches that share a size, a device and a solver (rank 1:
    :func:`dominant_eigenvector` in its precision; else ``eigh`` in float64) are concatenated and solved in one
    call, and what follows from the eigenvalues is computed once per such group."""
    groups: Dict[tuple, List[int]] = {}
    for i, (gram, rank, precision) in enumerate(zip(grams, ranks, precisions)):
        key = (gram.shape[-1], gram.device, precision if rank == 1 else None)
        groups.setdefault(key, []).append(i)
    spectra: List[_Spectrum] = [None] * len(grams)  # type: ignore[list-item]
    for (n, _, precision), members in groups.items():
        flat = torch.cat([grams[i].reshape(-1, n, n) for i in members])
        totals = flat.diagonal(dim1=-2, dim2=-1).sum(-1, dtype=torch.float64)
        if precision is not None:
            vectors = dominant_eigenvector(flat, precision)[..., None]
            top = vectors.to(flat.dtype)
            energies = (top.mT @ flat @ top)[..., 0].to(torch.float64)
        else:
            energies, vectors = eigh(flat.to(torch.float64))  # ascending
        energies = energies.clamp_min(0)
        sizes = [grams[i][..., 0, 0].numel() for i in members]
        for i, energy, vector, total in zip(members, energies.split(sizes), vectors.split(sizes), totals.split(sizes)):
            batch, rank = grams[i].shape[:-2], ranks[i]
            if precision is None:
                energy, vector = energy[..., -rank:].flip(-1), vector[..., -rank:].flip(-1)
            spectra[i] = _Spectrum(energy.reshape(*batch, rank), vector.reshape(*batch, n, rank), total.reshape(batch))
    return spectra


def _project(a: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``a @ basis``; onto one vector of a few taps (at most 3x3) a multiply and sum: batched matmul's
    matrix-vector product ran at half its speed on a conv weight's strided channel slices (at 7x7 the matmul was
    1.4x faster)."""
    if basis.shape[-1] == 1 and a.shape[-1] <= _FEW_TAPS:
        return torch.linalg.vecdot(a, basis.mT)[..., None]
    return a @ basis


def _factors(a: torch.Tensor, spectrum: _Spectrum) -> Factors:
    energy, vectors, total = spectrum
    root = energy.sqrt().sqrt().to(a.dtype)  # sqrt of the singular values
    basis = vectors.to(a.dtype)
    if _is_tall(a):  # basis = right singular vectors V
        left, right = _safe_divide(_project(a, basis), root[..., None, :]), root[..., :, None] * basis.mT
    else:
        left, right = root[..., None, :] * basis, _safe_divide(basis.mT @ a, root[..., :, None])
    return Factors(left, right, energy.sum(-1), total)


def channel_slices(weight: torch.Tensor, groups: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A dense conv weight ``(M, C/g, kh, kw)`` as per-input-channel slices ``(g, C/g, M/g, kh*kw)`` (a strided view
    where ``dtype`` is the weight's: batched matmuls read it in place)."""
    out_ch, cin_g, kh, kw = weight.shape
    return weight.detach().to(dtype).reshape(groups, out_ch // groups, cin_g, kh * kw).transpose(1, 2)


def separable_weights(left: torch.Tensor, right: torch.Tensor, kernel_size: Sequence[int]
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel factors ``left`` (g, C/g, M/g, r) and ``right`` (g, C/g, r, kh*kw) as the depthwise weight
    ``(C*r, 1, kh, kw)`` and the grouped pointwise weight ``(M, C*r/g, 1, 1)``, both contiguous: a transposed
    view as a parameter would differ in strides from the same layer built by ``apply_plan``, which DDP refuses
    (a student converted on one rank, loaded from its plan on another)."""
    groups, cin_g, m_g, rank = left.shape
    depthwise = right.reshape(groups * cin_g * rank, 1, *kernel_size)
    pointwise = left.permute(0, 2, 1, 3).reshape(groups * m_g, cin_g * rank, 1, 1)
    return (depthwise.contiguous(memory_format=torch.contiguous_format),
            pointwise.contiguous(memory_format=torch.contiguous_format))


def relative_error(w: torch.Tensor, approximation: torch.Tensor) -> float:
    """Relative Frobenius error; measured on the reconstruction, since the Gram route's small eigenvalues
    are only accurate to ~1e-16 * the largest."""
    total = w.square().sum()
    return ((w - approximation).square().sum() / total).sqrt().item() if total > 0 else 0.0


def decouple(weight: torch.Tensor, groups: int, rank: int) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """Network Decoupling (Guo et al., BMVC 2018): per input channel, a rank-``rank`` SVD of W[:, c].

    ``weight`` is a dense conv weight ``(M, C/g, kh, kw)``. Returns the depthwise weight
    ``(C*rank, 1, kh, kw)``, the pointwise weight ``(M, C*rank/g, 1, 1)`` and the relative Frobenius
    error of the approximation. The Gram products in the weight's precision (at least float32), the eigenvectors
    in float64, batched over all groups and channels.
    """
    return decouple_many([(weight, groups, rank)])[0]


def decouple_many(layers: Sequence[Tuple[torch.Tensor, int, int]]
                  ) -> List[Tuple[torch.Tensor, torch.Tensor, float]]:
    """:func:`decouple` of each ``(weight, groups, rank)``, the eigenproblems solved together
    (:func:`factorize_many`)."""
    slices = []
    for weight, groups, rank in layers:
        q = full_rank(weight.shape[0], groups, weight.shape[2:])
        if not 1 <= rank <= q:
            raise ValueError(f"rank must be between 1 and the full rank {q} of this kernel, got {rank}")
        slices.append(channel_slices(weight, groups, torch.promote_types(weight.dtype, torch.float32)))
    factors = factorize_many(slices, [rank for _, _, rank in layers])
    return [_decoupled(weight, w, f) for (weight, _, _), w, f in zip(layers, slices, factors)]


def _decoupled(weight: torch.Tensor, w: torch.Tensor, factors: Factors) -> Tuple[torch.Tensor, torch.Tensor, float]:
    left, right, kept, total = factors
    depthwise, pointwise = separable_weights(left, right, weight.shape[2:])
    total = total.sum()
    discarded = ((total - kept.sum()).clamp_min(0) / total).item() if total > 0 else 0.0
    # Total minus kept energy gives the error without a reconstruction, except near exactness, where it is the
    # Gram matrix's rounding (1e-16 of the largest eigenvalue in float64, 1e-7 in float32) and the square root
    # would make that 1e-8 (3e-4): there the reconstruction decides, in float64.
    if discarded > max(1e-8, 100 * torch.finfo(w.dtype).eps):
        error = discarded ** 0.5
    else:
        error = relative_error(w.to(torch.float64), (left @ right).to(torch.float64))
    return depthwise.to(weight.dtype), pointwise.to(weight.dtype), error


def resample_taps(weight: torch.Tensor, step: Sequence[int]) -> torch.Tensor:
    """Keep the taps of a KxK kernel that fall on a grid with the given step (for a dilated smaller kernel)."""
    return weight[:, :, ::step[0], ::step[1]]


@torch.no_grad()
def load_factors(sep: DepthwiseSeparableConv2d, depthwise: torch.Tensor, pointwise: torch.Tensor,
                 bias: Optional[torch.Tensor], assign: bool = False) -> None:
    """Copy decoupled weights into ``sep``; the dense conv's bias (or zeros) goes to the pointwise conv.

    ``assign=True`` makes them ``sep``'s parameters instead (its own copy of the bias), as
    ``load_state_dict(assign=True)`` does: ``sep`` may then be a layer built on the meta device.
    """
    if not assign:
        sep.depthwise.weight.copy_(depthwise)
        sep.pointwise.weight.copy_(pointwise)
        if sep.pointwise.bias is not None:
            sep.pointwise.bias.copy_(bias if bias is not None else torch.zeros_like(sep.pointwise.bias))
        return
    sep.depthwise.weight = nn.Parameter(depthwise)
    sep.pointwise.weight = nn.Parameter(pointwise)
    if sep.pointwise.bias is not None:
        own = pointwise.new_zeros(sep.out_channels) if bias is None else bias.detach().to(pointwise.dtype, copy=True)
        sep.pointwise.bias = nn.Parameter(own)


def svd_layers(layers: Sequence[Tuple[DepthwiseSeparableConv2d, torch.Tensor, Optional[torch.Tensor]]],
               assign: bool = False) -> List[float]:
    """The ``svd`` initialiser over many layers at once (:func:`decouple_many`); ``assign``: as in
    :func:`load_factors`."""
    decoupled = decouple_many([(weight, sep.groups, sep.rank) for sep, weight, _ in layers])
    for (sep, _, bias), (depthwise, pointwise, _) in zip(layers, decoupled):
        load_factors(sep, depthwise, pointwise, bias, assign)
    return [error for _, _, error in decoupled]


@register_initializer("svd")
def svd_init(sep: DepthwiseSeparableConv2d, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> float:
    return svd_layers([(sep, weight, bias)])[0]


def assigns_parameters(name: str) -> bool:
    """Whether :func:`initialize` with ``assign=True`` gives initialiser ``name``'s layers new parameters (dsd's
    ``svd``: its layers may be built on the meta device and never allocated twice) instead of writing them."""
    return _INITIALIZERS.get(name) is svd_init


def initialize(name: str, layers: Sequence[Tuple[DepthwiseSeparableConv2d, torch.Tensor, Optional[torch.Tensor]]],
               assign: bool = False) -> List[Optional[float]]:
    """Initialiser ``name`` over ``(separable, weight, bias)`` triples; the errors it returns, in order. dsd's
    ``svd`` decouples them all in one batched computation (and with ``assign``, see :func:`assigns_parameters`)."""
    if assigns_parameters(name):
        return svd_layers(layers, assign)
    initializer = get_initializer(name)
    return [initializer(*layer) for layer in layers]


@register_initializer("random")
def random_init(sep: DepthwiseSeparableConv2d, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """PyTorch's default conv initialisation, ignoring the trained weights (a baseline)."""
    for conv in (sep.depthwise, sep.pointwise):
        nn.Conv2d.reset_parameters(conv)
    return None


def rank_errors(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Relative squared Frobenius error of decoupling at every rank: ``errors[r]`` for r = 0..full rank.

    ``errors[0] == 1`` (nothing kept) and ``errors[full] == 0``; from the same per-channel eigenvalues
    as :func:`decouple`, so it costs one batched ``eigh``, not one decomposition per rank. Output errors on
    calibration inputs: :func:`dsd.calibration.output_rank_errors`.
    """
    w = channel_slices(weight, groups, torch.promote_types(weight.dtype, torch.float32))
    gram = _gram(w).to(torch.float64)  # as decouple() forms it and hands it to eigh
    energy = eigvalsh(gram).flip(-1).clamp_min(0).reshape(-1, gram.shape[-1]).sum(0)
    total = energy.sum()
    if total <= 0:
        return torch.zeros(energy.numel() + 1, dtype=torch.float64)
    kept = torch.cat([energy.new_zeros(1), energy.cumsum(0)])
    return ((total - kept) / total).clamp_min(0)


def energy_rank(errors: torch.Tensor, energy: float) -> int:
    """Network Decoupling's rule: the smallest rank whose kept singular values hold ``energy`` of the total."""
    kept = 1 - errors
    return int(torch.nonzero(kept >= energy - 1e-12)[0].item())
