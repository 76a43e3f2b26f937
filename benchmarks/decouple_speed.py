"""Decoupling speed: Gram-matrix eigenvectors (what dsd uses) vs LAPACK's batched SVD, same layers, same run.

At rank 1 dsd finds each Gram matrix's leading eigenvector by repeated squaring (dsd.layers.eigen); the last
column is what one LAPACK ``eigh`` of a Gram matrix costs in PyTorch's batched call (one thread).

    python benchmarks/decouple_speed.py [--repeats 3]

Each row is one dense conv weight (out, in, k, k), decoupled at rank 1 in float64. Both methods give
the same best rank-r approximation (tests/test_exactness.py); this measures only their time.
"""
from __future__ import annotations

import argparse

import torch

from dsd.layers.decouple import factorize
from _results import median_seconds, write

LAYERS = {  # name: (out, in, kh, kw)
    "resnet50 layer1 3x3": (64, 64, 3, 3),
    "resnet50 layer4 3x3": (512, 512, 3, 3),
    "resnet50 stem 7x7": (64, 3, 7, 7),
    "vgg16 conv5 3x3": (512, 512, 3, 3),
    "vgg pre-logits 7x7": (4096, 512, 7, 7),
    "convnext stem 4x4": (96, 3, 4, 4),
}


def per_channel(weight: torch.Tensor) -> torch.Tensor:
    out, cin, kh, kw = weight.shape
    return weight.double().reshape(out, cin, kh * kw).permute(1, 0, 2)  # (C, M, k*k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    print(f"{'layer':22} {'shape':>20} {'gram s':>9} {'svd s':>9} {'svd/gram':>9} {'eigh us/matrix':>15}")
    for name, shape in LAYERS.items():
        a = per_channel(torch.randn(*shape))
        grams = a.mT @ a if a.shape[-2] >= a.shape[-1] else a @ a.mT
        factorize(a, 1), torch.linalg.svd(a, full_matrices=False), torch.linalg.eigh(grams)  # warm-up
        gram = median_seconds(lambda: factorize(a, 1), args.repeats)
        svd = median_seconds(lambda: torch.linalg.svd(a, full_matrices=False), args.repeats)
        eigh = median_seconds(lambda: torch.linalg.eigh(grams), args.repeats) / len(grams)
        rows.append({"layer": name, "shape": list(shape), "gram_s": gram, "svd_s": svd, "ratio": svd / gram,
                     "lapack_eigh_us_per_matrix": eigh * 1e6})
        print(f"{name:22} {str(shape):>20} {gram:9.4f} {svd:9.4f} {svd / gram:8.1f}x {eigh * 1e6:15.1f}", flush=True)
    print(f"wrote {write('decouple_speed', rows, repeats=args.repeats, dtype='float64', rank=1)}")


if __name__ == "__main__":
    main()
