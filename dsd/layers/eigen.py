"""Eigendecompositions of batches of small symmetric matrices (the per-channel Gram matrices of decoupling).

PyTorch's batched ``eigh`` on the CPU calls LAPACK once per matrix in one thread: about 8 us for a 9x9 matrix,
a whole forward pass of resnet18 for its 3,392 input channels. These helpers split the batch over the
intra-op threads, and find a single leading eigenvector by repeated squaring (a few batched matmuls).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Tuple

import torch

__all__ = ["eigh", "eigvalsh", "dominant_eigenvector", "SQUARINGS"]

SQUARINGS = 24  # G^(2^24): eigenvalues more than ~1e-6 below the top one decay to nothing
_RENORMALISE_EVERY = 4  # a trace-normalised PSD matrix has top eigenvalue >= 1/n: 4 squarings stay above n^-16
_CONVERGED = 1e-6  # 1 - trace(P^2) of a converged P (float32 squaring's rounding: ~1e-7 of it)
_FLOAT32_SQUARING_SIZE = 128  # 128^-16 = 2e-34: still a normal float32
_MIN_SPLIT = 64  # matrices per thread below which one LAPACK loop is quicker than handing work to a thread
_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0


def _split(fn: Callable, matrix: torch.Tensor):
    """``fn`` over ``matrix``'s batch, in as many parts as torch has intra-op threads (LAPACK releases the GIL)."""
    global _pool, _pool_size
    threads = torch.get_num_threads()
    flat = matrix.reshape(-1, *matrix.shape[-2:])
    parts = min(threads, flat.shape[0] // _MIN_SPLIT)
    if parts < 2 or matrix.device.type != "cpu":
        return fn(matrix)
    if _pool is None or _pool_size != threads:
        _pool, _pool_size = ThreadPoolExecutor(threads, thread_name_prefix="dsd-eigh"), threads
    results = list(_pool.map(fn, flat.tensor_split(parts)))
    if isinstance(results[0], torch.Tensor):
        return torch.cat(results).reshape(*matrix.shape[:-2], *results[0].shape[1:])
    return tuple(torch.cat(r).reshape(*matrix.shape[:-2], *r[0].shape[1:]) for r in zip(*results))


def eigh(matrix: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` (ascending eigenvalues), the batch split over the intra-op threads."""
    return _split(torch.linalg.eigh, matrix)


def eigvalsh(matrix: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.eigvalsh`` (ascending), the batch split over the intra-op threads."""
    return _split(torch.linalg.eigvalsh, matrix)


def _trace(matrix: torch.Tensor) -> torch.Tensor:
    return matrix.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]


def dominant_eigenvector(gram: torch.Tensor, precision: torch.dtype = torch.float64) -> torch.Tensor:
    """A unit leading eigenvector (..., n) of each positive semi-definite matrix in ``gram`` (..., n, n), float64
    (``gram`` float32 or float64).

    The column of ``G^N`` (N = 2^SQUARINGS, by repeated squaring) at its largest diagonal entry, normalised.
    A component whose eigenvalue is a share rho of the top one keeps weight rho^N, so only eigenvalues within
    about 1e-6 of the top one survive in the vector, and mixing those in (tied or nearly tied leading
    eigenvalues) costs less than that share: the captured energy ``v' G v`` is within 1e-6 of the top eigenvalue,
    as good as the eigenvector for a best rank-1 approximation of float32 weights. ``precision=torch.float32``
    (the Gram matrices of float32 weights) squares in float32 up to 128x128 (a trace-normalised matrix stays
    above 128^-16 between renormalisations): the vector is then as precise as those weights. A zero matrix
    gives a zero vector.

    A matrix stops squaring once its trace-normalised power P is a rank-1 projection to within
    ``1 - trace(P^2) <= _CONVERGED`` (the trace of the next square, looked at after each renormalisation): its column
    then captures all but about n * 1e-12 of the top eigenvalue. Well separated spectra get there in 5 to 13
    squarings; tied or nearly tied ones run all ``SQUARINGS``.
    """
    n, batch = gram.shape[-1], gram.shape[:-2]
    power = (gram / _trace(gram).clamp_min(torch.finfo(gram.dtype).tiny)).reshape(-1, n, n)
    power = power.to(torch.float32 if precision == torch.float32 and n <= _FLOAT32_SQUARING_SIZE else torch.float64)
    small = torch.finfo(power.dtype).tiny
    result, pending = torch.empty_like(power), torch.arange(power.shape[0], device=power.device)
    spare = torch.empty_like(power)  # the squares alternate between two buffers: no allocation per step
    for step in range(1, SQUARINGS + 1):
        torch.matmul(power, power, out=spare)
        power, spare = spare, power
        if step % _RENORMALISE_EVERY == 0:
            power.div_(_trace(power).clamp_min(small))
        elif step % _RENORMALISE_EVERY == 1 and 1 < step < SQUARINGS:  # the square of a trace-one matrix
            converged = _trace(power)[:, 0, 0] >= 1 - _CONVERGED
            if converged.any():
                result[pending[converged]] = power[converged]
                power, pending = power[~converged], pending[~converged]
                spare = torch.empty_like(power)
                if not len(pending):
                    break
    result[pending] = power
    column = result.diagonal(dim1=-2, dim2=-1).contiguous().argmax(-1, keepdim=True)  # 6x slower on the strided view
    vector = result.gather(-1, column[..., None, :].expand(*result.shape[:-1], 1)).squeeze(-1).to(torch.float64)
    return (vector / vector.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)).reshape(*batch, n)
