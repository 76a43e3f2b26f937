"""ConvertOptions is the one definition of a conversion: API keywords, CLI flags, recipes and plans."""
import argparse
import dataclasses
import re

import pytest
import torch
import torch.nn as nn

import dsd
from dsd.cli.convert import add_arguments
from dsd.convert import ConvertOptions
from dsd.finetune import load_recipe
from dsd.timing import BenchmarkSettings


def _net():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 5, padding=2))


def _group_dests(parser: argparse.ArgumentParser, title_start: str):
    (group,) = [g for g in parser._action_groups if (g.title or "").startswith(title_start)]
    return {action.dest for action in group._group_actions}


def test_every_field_has_a_flag_and_every_flag_a_field():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    conversion = _group_dests(parser, "conversion") - {"calib", "calib_batch_size"}  # the data, not the options
    assert conversion == {f.name for f in dataclasses.fields(ConvertOptions)} - {"benchmark"}
    measurement = _group_dests(parser, "measurement") - {"input_size", "json", "md", "plot"}
    assert measurement == {f.name for f in dataclasses.fields(BenchmarkSettings)}


def test_every_field_has_help_text():
    for cls in (ConvertOptions, BenchmarkSettings):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


def test_to_dict_from_dict_round_trip():
    options = ConvertOptions(rank=2, dilation=2, include=["layer1.*", re.compile("^x")], exclude="y",
                             skip=["stem"], only_if_faster=True, benchmark=BenchmarkSettings(batch_size=8))
    data = options.to_dict()
    assert data["include"] == ["layer1.*", "^x"] and data["benchmark"]["batch_size"] == 8
    assert ConvertOptions.from_dict({**data, "include": ["layer1.*"]}).rank == 2
    assert ConvertOptions.from_dict(ConvertOptions().to_dict()) == ConvertOptions()


@pytest.mark.parametrize("data,fragment", [
    ({"rank": 0}, "rank must be a positive integer"),
    ({"rank": True}, "rank must be a positive integer"),
    ({"target_flops": 1.5}, "fraction in (0, 1]"),
    ({"target_flops": 0.5, "energy": 0.9}, "choose one of"),
    ({"target_flops": 0.5, "rank": 2}, "rank and a budget"),
    ({"sequential": "yes"}, "sequential must be true or false"),
    ({"min_channels": -1}, "min_channels must be an integer >= 0"),
    ({"calibration_batches": 0}, "calibration_batches must be an integer >= 1"),
    ({"skip": ["head"]}, "unknown skip rule"),
    ({"exclude": ["re:(["]}, "not a valid regular expression"),
    ({"init": "zeros"}, "unknown init"),
    ({"benchmark": {"iters": 0}}, "iters must be an integer >= 1"),
    ({"benchmark": {"device": "bogus"}}, "is not a torch device"),
    ({"ranks": 2}, "unknown conversion option 'ranks'"),
])
def test_bad_values_are_refused_with_the_field_name(data, fragment):
    with pytest.raises(dsd.DsdError) as error:
        ConvertOptions.from_dict(data)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_options_object_and_keywords_convert_alike():
    model, x = _net(), torch.randn(1, 3, 12, 12)
    by_keywords, report_k = dsd.convert_model(model, x, rank=2, dilation=2, exclude=["0"])
    by_options, report_o = dsd.convert_model(model, x, ConvertOptions(rank=2, dilation=2, exclude=("0",)))
    overridden, report_v = dsd.convert_model(model, x, ConvertOptions(rank=3), rank=2, dilation=2, exclude="0")
    assert report_k.plan.to_dict() == report_o.plan.to_dict() == report_v.plan.to_dict()
    assert torch.equal(by_keywords(x), by_options(x)) and torch.equal(by_options(x), overridden(x))


def test_the_plan_records_the_options():
    _, report = dsd.convert_model(_net(), torch.randn(1, 3, 12, 12), target_flops=0.5)
    recorded = ConvertOptions.from_dict(report.plan.options)
    assert recorded == ConvertOptions(target_flops=0.5)


def test_device_keyword_of_earlier_releases_sets_the_benchmark_device():
    assert ConvertOptions().with_overrides(device="cpu").benchmark.device == "cpu"
    with pytest.raises(dsd.DsdError, match="no CUDA GPU|unknown"):
        ConvertOptions().with_overrides(device="cuda" if not torch.cuda.is_available() else "bogus")


def test_every_option_works_in_a_recipe(tmp_path):
    recipe = load_recipe("digits", ["student.convert.target_latency=0.7", "student.convert.only_if_faster=true",
                                    "student.convert.benchmark.iters=5", "student.convert.exclude=[features.0.0]"])
    options = recipe.student.convert
    assert isinstance(options, ConvertOptions)
    assert (options.target_latency, options.only_if_faster, options.benchmark.iters, options.exclude) == (
        0.7, True, 5, ("features.0.0",))
    with pytest.raises(dsd.DsdError, match="student.convert: unknown conversion option 'device'"):
        load_recipe("digits", ["student.convert.device=cpu"])
    assert recipe.to_dict()["student"]["convert"]["exclude"] == ["features.0.0"]


def test_target_flops_means_the_whole_model_except_in_plans_and_recipes_that_do_not_say():
    assert ConvertOptions(target_flops=0.5).target_flops_of == "model"
    assert ConvertOptions.from_dict({"target_flops": 0.5}).target_flops_of == "convs"  # dsd 0.1's meaning
    assert ConvertOptions.from_dict(ConvertOptions(target_flops=0.5).to_dict()).target_flops_of == "model"
    recipe = load_recipe("digits", ["student.convert.target_flops=0.5"])
    assert recipe.student.convert.target_flops_of == "convs"


def test_new_conversion_flags_parse():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["m.pt", "--target-flops", "0.5", "--target-flops-of", "convs", "--allocation", "sensitivity",
                              "--no-sequential"])
    assert (args.target_flops_of, args.allocation, args.sequential) == ("convs", "sensitivity", False)
    defaults = parser.parse_args(["m.pt"])
    assert (defaults.target_flops_of, defaults.allocation, defaults.sequential) == ("model", "layer", True)
    with pytest.raises(SystemExit):
        parser.parse_args(["m.pt", "--allocation", "fisher"])
