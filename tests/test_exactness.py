"""Where mathematics says the decoupling is exact, the converted layer reproduces the original."""
import pytest
import torch
import torch.nn as nn
from timm.layers import Conv2dSame, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame

from dsd.convert import FULL_RANK, decouple, from_conv, full_rank
from dsd.layers.create import shrink_kernel


def rel_error(a, b):
    return ((a - b).norm() / b.norm()).item()


GEOMETRIES = [
    dict(in_channels=8, out_channels=16, kernel_size=3, padding=1),
    dict(in_channels=8, out_channels=4, kernel_size=5, stride=2, padding=2),
    dict(in_channels=6, out_channels=12, kernel_size=(1, 7), padding=(0, 3)),
    dict(in_channels=6, out_channels=6, kernel_size=4, padding="same"),  # even kernel: asymmetric padding
    dict(in_channels=6, out_channels=6, kernel_size=3, padding="same", dilation=2),
    dict(in_channels=6, out_channels=10, kernel_size=3, padding="valid", stride=(2, 1)),
    dict(in_channels=4, out_channels=8, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=4, out_channels=8, kernel_size=4, padding="same", padding_mode="circular"),
    dict(in_channels=4, out_channels=8, kernel_size=3, padding=2, padding_mode="replicate", dilation=2),
    dict(in_channels=16, out_channels=32, kernel_size=3, padding=1, groups=4),  # ResNeXt-like
    dict(in_channels=12, out_channels=6, kernel_size=5, padding=2, groups=3, bias=False),
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "-".join(f"{k}={v}" for k, v in g.items()))
def test_full_rank_is_exact(geometry):
    conv = nn.Conv2d(**geometry).double()
    x = torch.randn(2, conv.in_channels, 13, 11, dtype=torch.float64)
    sep = from_conv(conv, rank=FULL_RANK)
    assert sep.rank == full_rank(conv.out_channels, conv.groups, conv.kernel_size)
    assert rel_error(sep(x), conv(x)) < 1e-5


@pytest.mark.parametrize("cls,kwargs", [
    (Conv2dSame, dict(kernel_size=3, stride=2)),
    (Conv2dSame, dict(kernel_size=4, stride=1)),
    (StdConv2d, dict(kernel_size=3, padding=1)),
    (StdConv2dSame, dict(kernel_size=3, stride=2, padding="same")),
    (ScaledStdConv2d, dict(kernel_size=3, padding=1)),
    (ScaledStdConv2dSame, dict(kernel_size=5, stride=2, padding="same")),
])
@pytest.mark.parametrize("size", [(15, 16), (7, 9)])
def test_timm_subclasses_full_rank_exact_every_size(cls, kwargs, size):
    conv = cls(6, 12, **kwargs).double()
    if hasattr(conv, "gain"):
        nn.init.normal_(conv.gain)
    sep = from_conv(conv, rank=FULL_RANK)
    x = torch.randn(1, 6, *size, dtype=torch.float64)
    assert rel_error(sep(x), conv(x)) < 1e-5


def test_rank_one_kernel_is_exact_at_rank_one():
    out_channels, in_channels, k = 10, 7, 3
    a, b = torch.randn(in_channels, out_channels, dtype=torch.float64), torch.randn(in_channels, k * k, dtype=torch.float64)
    weight = torch.einsum("co,ck->ock", a, b).reshape(out_channels, in_channels, k, k)  # W[:, c] = a_c b_c^T
    conv = nn.Conv2d(in_channels, out_channels, k, padding=1).double()
    conv.weight.data.copy_(weight)
    sep = from_conv(conv, rank=1)
    _, _, error = decouple(conv.weight, 1, 1)
    assert error < 1e-12
    x = torch.randn(2, in_channels, 9, 9, dtype=torch.float64)
    assert rel_error(sep(x), conv(x)) < 1e-10


def test_truncation_error_is_the_discarded_energy():
    weight = torch.randn(16, 8, 3, 3, dtype=torch.float64)
    s = torch.linalg.svdvals(weight.permute(1, 0, 2, 3).reshape(8, 16, 9))
    for rank in (1, 3, 9):
        _, _, error = decouple(weight, 1, rank)
        expected = (s[:, rank:].square().sum() / s.square().sum()).sqrt().item()
        assert error == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="full rank 9"):
        decouple(weight, 1, 10)


@pytest.mark.parametrize("kernel,target,expected", [(5, None, (3, 2)), (7, None, (3, 3)), (7, 4, (4, 2)),
                                                    (9, None, (3, 4)), (3, None, None), (4, None, None)])
def test_shrink_kernel(kernel, target, expected):
    assert shrink_kernel(kernel, target) == expected


@pytest.mark.parametrize("kernel,target", [(5, True), (7, True), (7, 4)])
def test_keep_receptive_field_exact_on_grid_kernel(kernel, target):
    """A kernel whose only non-zero taps lie on the dilated grid converts exactly, same receptive field."""
    conv = nn.Conv2d(4, 6, kernel, padding=kernel // 2).double()
    new_kernel, step = shrink_kernel(kernel, None if target is True else target)
    mask = torch.zeros(kernel, kernel, dtype=torch.float64)
    mask[::step, ::step] = 1
    conv.weight.data *= mask
    sep = from_conv(conv, rank=FULL_RANK, keep_receptive_field=target)
    assert sep.kernel_size == (new_kernel, new_kernel) and sep.dilation == (step, step)
    x = torch.randn(1, 4, 12, 12, dtype=torch.float64)
    assert rel_error(sep(x), conv(x)) < 1e-5


def test_dilation_spreads_the_trained_taps():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    sep = from_conv(conv, rank=FULL_RANK, dilation=2)
    reference = from_conv(conv, rank=FULL_RANK)
    assert sep.dilation == (2, 2) and sep.padding == ((2, 2), (2, 2))
    torch.testing.assert_close(sep.depthwise.weight, reference.depthwise.weight)


def test_random_init_ignores_the_weights():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    a, b = from_conv(conv, init="random"), from_conv(conv, init="svd")
    assert not torch.allclose(a.depthwise.weight, b.depthwise.weight)


@pytest.mark.parametrize("kwargs,message", [
    (dict(rank=0), "rank"), (dict(rank=-1), "rank"), (dict(rank=1.5), "rank"), (dict(dilation=0), "dilation"),
    (dict(init="nope"), "unknown init"), (dict(dilation=2, keep_receptive_field=True), "choose one"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        from_conv(nn.Conv2d(4, 4, 3), **kwargs)


@pytest.mark.parametrize("shape", [(5, 64, 9), (5, 9, 64), (3, 49, 49), (2, 16, 25)])
@pytest.mark.parametrize("rank", [1, 4, 9])
def test_factorization_matches_lapack_svd(shape, rank):
    """The Gram-eigenvector route gives the same best rank-r approximation as torch.linalg.svd."""
    from dsd.layers.decouple import factorize
    a = torch.randn(*shape, dtype=torch.float64)
    left, right, *_ = factorize(a, rank)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    best = (u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]
    assert rel_error(left @ right, best) < 1e-9
    torch.testing.assert_close(left.norm(dim=-2), right.norm(dim=-1))  # singular values split evenly


@pytest.mark.parametrize("out_channels,in_channels,groups,kernel", [(128, 6, 1, 3), (256, 8, 2, 3), (128, 4, 1, (1, 3)),
                                                                     (130, 5, 1, 3)])
def test_channel_slices_with_many_rows_decouple_as_lapack_svd(out_channels, in_channels, groups, kernel):
    """Slices of 128 rows or more and at most 9 taps get their Gram matrices from products over pairs of
    neighbouring channels (an odd count of channels does not pair): each channel's decoupling error is still the
    energy LAPACK's SVD discards, and the full rank is exact."""
    from dsd.layers.decouple import _side_by_side_in_memory, channel_slices
    torch.manual_seed(0)
    conv = nn.Conv2d(in_channels, out_channels, kernel, groups=groups, bias=False).double()
    slices = channel_slices(conv.weight, groups)
    assert _side_by_side_in_memory(slices) == (in_channels // groups % 2 == 0)
    energy = torch.linalg.svdvals(slices).square()
    q = full_rank(out_channels, groups, conv.kernel_size)
    for rank in (1, 2, q):
        _, _, error = decouple(conv.weight, groups, rank)
        expected = (energy[..., rank:].sum() / energy.sum()).sqrt().item()
        assert error == pytest.approx(expected, rel=1e-9, abs=1e-12), rank
    x = torch.randn(1, in_channels, 9, 8, dtype=torch.float64)
    assert rel_error(from_conv(conv, rank=FULL_RANK)(x), conv(x)) < 1e-10


def test_decoupling_many_layers_together_equals_one_at_a_time():
    """``decouple_many`` solves the eigenproblems of every layer together, grouped by Gram size, solver and
    precision; each layer gets what it gets alone: tall and wide, grouped, 1x1 to 7x7 kernels, ranks 1 to full,
    float32 and float64 weights."""
    from dsd.layers.decouple import decouple_many
    torch.manual_seed(0)
    layers = [(torch.randn(16, 8, 3, 3), 1, 1), (torch.randn(32, 4, 3, 3), 2, 1),
              (torch.randn(4, 6, 3, 3, dtype=torch.float64), 1, 2), (torch.randn(12, 3, 7, 7), 1, 1),
              (torch.randn(16, 8, 3, 3, dtype=torch.float64), 1, 1), (torch.randn(12, 8, 3, 3), 1, 9),
              (torch.randn(8, 5, 5, 5), 1, 3), (torch.randn(6, 6, 1, 1), 1, 1)]
    together = decouple_many(layers)
    for (weight, groups, rank), (depthwise, pointwise, error) in zip(layers, together):
        alone = decouple(weight, groups, rank)
        assert depthwise.dtype == pointwise.dtype == weight.dtype
        torch.testing.assert_close(depthwise, alone[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(pointwise, alone[1], rtol=1e-12, atol=1e-12)
        assert error == pytest.approx(alone[2], rel=1e-12, abs=1e-15)


def test_building_layers_together_runs_each_initializer_on_its_layers(monkeypatch):
    """``build_layers`` initialises a conversion's layers in one call per initialiser: dsd's svd batched, any
    other (here one a user registered) layer by layer; each layer as ``build_layer`` builds it alone."""
    from dsd.layers.create import build_layer, build_layers, layer_spec
    from dsd.layers.decouple import _INITIALIZERS
    calls = []

    def halves(sep, weight, bias):
        calls.append(sep)
        for conv in (sep.depthwise, sep.pointwise):
            conv.weight.data.fill_(0.5)
        sep.pointwise.bias.data.zero_()
        return None
    monkeypatch.setitem(_INITIALIZERS, "halves", halves)
    convs = [nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 5, padding=2, groups=2), nn.Conv2d(8, 6, 3)]
    specs = [layer_spec(convs[0], 1, None, False, "svd"), layer_spec(convs[1], 2, None, False, "halves"),
             layer_spec(convs[2], 3, None, False, "svd")]
    built = build_layers(list(zip(convs, specs)))
    assert len(calls) == 1
    x = torch.randn(2, 4, 9, 9)
    for conv, spec, (layer, built_spec) in zip(convs, specs, built):
        alone, alone_spec = build_layer(conv, spec)
        assert built_spec == alone_spec and (spec.init == "halves") == (built_spec.init_error is None)
        torch.testing.assert_close(layer.state_dict(), alone.state_dict(), rtol=0, atol=0)
    assert rel_error(built[0][0](x), convs[0](x)) < 0.9
