"""Files written by an earlier release still load and rebuild the same model.

``tests/data/legacy_plan_v0_1`` was written by dsd 0.1.0 (commit b0e5449) with
``dsd-convert dsd:digits_cnn --arch-kwarg width=8 --input-size 1 32 32 --target-flops 0.5`` and
``dsd-convert dsd:digits_mobilenet --input-size 1 32 32 --keep-receptive-field --rank 2``, together with
each converted model's outputs on a fixed input.
"""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dsd

LEGACY = Path(__file__).parent / "data" / "legacy_plan_v0_1"


@pytest.mark.parametrize("stem", ["digits_cnn_w8_dsd", "digits_mobilenet_krf_dsd"])
def test_legacy_plan_rebuilds_the_same_model(stem):
    expected = load_file(str(LEGACY / "expected_outputs.safetensors"))
    model = dsd.load_converted(LEGACY / f"{stem}.plan.json")
    with torch.no_grad():
        got = model(expected["input"])
    torch.testing.assert_close(got, expected[stem], rtol=1e-5, atol=1e-6)


def test_legacy_plan_options_read_back_as_convert_options():
    plan = dsd.ConversionPlan.load(LEGACY / "digits_cnn_w8_dsd.plan.json")
    assert [layer.rank for layer in plan.layers] == [2, 2]
    # written before target_flops_of existed: it meant the convs' FLOPs, and still does; sequential was off then
    assert dsd.ConvertOptions.from_dict(plan.options) == dsd.ConvertOptions(target_flops=0.5, target_flops_of="convs",
                                                                            sequential=False)
    krf = dsd.ConversionPlan.load(LEGACY / "digits_mobilenet_krf_dsd.plan.json")
    assert dsd.ConvertOptions.from_dict(krf.options) == dsd.ConvertOptions(rank=2, keep_receptive_field=True,
                                                                           target_flops_of="convs", sequential=False)
