"""Data-aware initialisation: decouple each conv so its error is small on real inputs, not in weight space.

1. Patch statistics: per input channel, the second moment of the KxK input patches the depthwise
   kernel sees (streamed over batches: O(C * k^4) memory, no stored activations).
2. Whitened decoupling: per channel, the best rank-r factors of ``W_c Sigma_c^(1/2)``, un-whitened
   by ``Sigma_c^(-1/2)``: the rank-r filter that minimises the channel's output error on the data.
3. Pointwise refit: with the depthwise filters fixed, the pointwise weights (and bias) by ridge least
   squares against the original layer's outputs, from streamed moments of the depthwise outputs z
   and the original outputs o (O((C*r)^2 + C*r*M) memory). The same moments give the output error.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..layers.decouple import channel_slices, factorize, relative_error, separable_weights
from ..layers.eigen import eigh, eigvalsh
from ..layers.separable import DepthwiseSeparableConv2d

__all__ = ["PatchStats", "RefitStats", "whitened_depthwise", "refit_pointwise", "whitening", "output_rank_errors",
           "RIDGE"]

RIDGE = 1e-5  # relative to the mean eigenvalue: keeps near-singular statistics invertible


def _sym_power(matrix: torch.Tensor, power: float) -> torch.Tensor:
    values, vectors = eigh(matrix)
    return (vectors * values.clamp_min(torch.finfo(values.dtype).tiny).pow(power)[..., None, :]) @ vectors.mT


def _regularise(second_moment: torch.Tensor) -> torch.Tensor:
    n = second_moment.shape[-1]
    scale = torch.diagonal(second_moment, dim1=-2, dim2=-1).mean(-1, keepdim=True)[..., None].clamp_min(1e-12)
    return second_moment + RIDGE * scale * torch.eye(n, dtype=second_moment.dtype)


class PatchStats:
    """Streaming per-channel second moment of the input patches of a separable layer's depthwise kernel."""

    def __init__(self, layer: DepthwiseSeparableConv2d):
        self.layer = layer
        taps = layer.kernel_size[0] * layer.kernel_size[1]
        self.sum = torch.zeros(layer.in_channels, taps, taps, dtype=torch.float64)
        self.count = 0  # patches seen (samples x output positions)
        self.samples = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        if not x.shape[0]:  # an empty batch (a detector's head on no boxes) has no patches
            return
        patches = F.unfold(self.layer.pad_input(x.detach().float()), self.layer.kernel_size,
                           dilation=self.layer.dilation, stride=self.layer.stride)
        n, _, positions = patches.shape
        # (C, taps, n * positions): one batched float32 GEMM per batch (a float64 einsum was 10x slower);
        # the batches accumulate in float64.
        patches = patches.reshape(n, self.layer.in_channels, -1, positions).permute(1, 2, 0, 3).flatten(2)
        self.sum += torch.bmm(patches, patches.mT).cpu().to(torch.float64)
        self.count += n * positions
        self.samples += n

    @property
    def positions_per_sample(self) -> float:
        return self.count / max(self.samples, 1)

    def second_moment(self) -> torch.Tensor:
        if not self.count:
            raise ValueError("no calibration data reached this layer")
        return self.sum / self.count


def whitening(second_moment: torch.Tensor) -> torch.Tensor:
    """Per-channel ``Sigma^(1/2)`` (ridge-regularised) of patch second moments (C, k*k, k*k)."""
    return _sym_power(_regularise(second_moment), 0.5)


def output_rank_errors(weight: torch.Tensor, groups: int, second_moment: torch.Tensor, whitened: bool
                       ) -> torch.Tensor:
    """Squared output error per output position (summed over output channels) of decoupling ``weight`` at every
    rank 0..full, on inputs whose patches have ``second_moment``: of the whitened factors (``init="data"``) or
    of the plain SVD factors (``init="svd"``). As in the decoupling, errors of different input channels are
    taken as uncorrelated. Plain SVD at rank r leaves, per channel, ``sum_{i>r} s_i^2 v_i' Sigma v_i``."""
    w = channel_slices(weight, groups)
    taps = w.shape[-1]
    if whitened:
        a = w @ whitening(second_moment).reshape(*w.shape[:2], taps, taps)
        per_component = eigvalsh(a.mT @ a).flip(-1).clamp_min(0)
    else:
        sigma = _regularise(second_moment).reshape(*w.shape[:2], taps, taps)
        energy, vectors = eigh(w.mT @ w)
        energy, vectors = energy.flip(-1).clamp_min(0), vectors.flip(-1)
        per_component = energy * torch.einsum("...ti,...tu,...ui->...i", vectors, sigma, vectors)
    per_rank = per_component.reshape(-1, taps).sum(0)[:min(w.shape[-2], taps)]
    total = per_component.sum()
    return torch.cat([total[None], total - per_rank.cumsum(0)]).clamp_min(0)


def whitened_depthwise(weight: torch.Tensor, groups: int, rank: int, second_moment: torch.Tensor
                       ) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """Depthwise and pointwise weights minimising each channel's output error under ``second_moment``.

    Returns ``(depthwise, pointwise, relative weight-space error)``; exact at full rank.
    """
    w = channel_slices(weight, groups)
    taps = w.shape[-1]
    sigma = _regularise(second_moment).reshape(*w.shape[:2], taps, taps)
    root, inverse_root = _sym_power(sigma, 0.5), _sym_power(sigma, -0.5)
    left, right, *_ = factorize(w @ root, rank)
    right = right @ inverse_root  # un-whiten: the depthwise filters act on raw patches
    depthwise, pointwise = separable_weights(left, right, weight.shape[2:])
    return depthwise.to(weight.dtype), pointwise.to(weight.dtype), relative_error(w, left @ right)


def _pointwise_blocks(layer: DepthwiseSeparableConv2d) -> Tuple[int, int, int, int, int]:
    """(out channels M, depthwise channels C*r, groups g, M/g, C*r/g) of the grouped pointwise conv."""
    m, width, g = layer.out_channels, layer.in_channels * layer.rank, layer.groups
    return m, width, g, m // g, width // g


class RefitStats:
    """Streaming moments of [z, 1] (depthwise outputs) and o (original outputs), per pixel."""

    def __init__(self, layer: DepthwiseSeparableConv2d):
        self.layer = layer
        width = layer.in_channels * layer.rank + 1
        self.zz = torch.zeros(width, width, dtype=torch.float64)
        self.zo = torch.zeros(width, layer.out_channels, dtype=torch.float64)
        self.oo = torch.zeros((), dtype=torch.float64)
        self.count = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor, target: torch.Tensor) -> None:
        weight = self.layer.depthwise.weight
        z = self.layer.depthwise(self.layer._pad(x.detach().to(weight.device, weight.dtype)))
        z = z.to(torch.float64).permute(1, 0, 2, 3).reshape(z.shape[1], -1)
        z = torch.cat([z, torch.ones(1, z.shape[1], dtype=z.dtype, device=z.device)])
        o = target.detach().to(z.device, torch.float64).permute(1, 0, 2, 3).reshape(target.shape[1], -1)
        self.zz += (z @ z.T).cpu()
        self.zo += (z @ o.T).cpu()
        self.oo += o.square().sum().cpu()
        self.count += z.shape[1]

    def output_error(self, pointwise: torch.Tensor, bias: Optional[torch.Tensor]) -> float:
        """Relative squared output error E||P z + b - o||^2 / E||o||^2 of given pointwise weights."""
        p = self._dense(pointwise, bias)
        error = (p @ self.zz @ p.T).trace() - 2 * (p @ self.zo).trace() + self.oo
        return (error.clamp_min(0) / self.oo.clamp_min(1e-30)).item()

    def _dense(self, pointwise: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The grouped pointwise weight as a dense (M, C*r + 1) matrix, bias in the last column."""
        m, width, g, m_g, w_g = _pointwise_blocks(self.layer)
        dense = torch.zeros(m, width + 1, dtype=torch.float64)
        weight = pointwise.detach().to(torch.float64).cpu().reshape(m, w_g)
        for j in range(g):
            dense[j * m_g:(j + 1) * m_g, j * w_g:(j + 1) * w_g] = weight[j * m_g:(j + 1) * m_g]
        if bias is not None:
            dense[:, -1] = bias.detach().to(torch.float64).cpu()
        return dense


def refit_pointwise(stats: RefitStats) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Ridge least-squares pointwise weights (and bias, where the layer has one), group by group."""
    layer = stats.layer
    m, width, g, m_g, w_g = _pointwise_blocks(layer)
    has_bias = layer.pointwise.bias is not None
    weight = torch.zeros(m, w_g, dtype=torch.float64)
    bias = torch.zeros(m, dtype=torch.float64)
    for j in range(g):
        cols = list(range(j * w_g, (j + 1) * w_g)) + ([width] if has_bias else [])
        zz = _regularise(stats.zz[cols][:, cols])
        solution = torch.linalg.solve(zz, stats.zo[cols][:, j * m_g:(j + 1) * m_g])  # (cols, M/g)
        weight[j * m_g:(j + 1) * m_g] = solution[:w_g].T
        if has_bias:
            bias[j * m_g:(j + 1) * m_g] = solution[w_g]
    dtype = layer.pointwise.weight.dtype
    return weight.reshape(m, w_g, 1, 1).to(dtype), bias.to(dtype) if has_bias else None
