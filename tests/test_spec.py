"""The gen_args declarations: validation rules and defaults."""

import pytest

from sdmme.spec import MODELS, InvalidInput, Param


def test_every_default_passes_its_own_rule():
    for spec in MODELS.values():
        for param in spec.params:
            assert param.validate(param.default) == param.default, (spec.name, param.name)
        assert spec.validate_args({}) == spec.defaults()


@pytest.mark.parametrize(
    ("value", "expected"),
    [(5, 5), (5.0, 5), (1, 1), (150, 150)],
)
def test_int_param_accepts(value, expected):
    assert Param("n", int, 1, "", min=1, max=150).validate(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "out of range"),
        (151, "out of range"),
        (5.5, "must be int"),
        (True, "must be int"),
        ("5", "must be int"),
        (None, "must not be null"),
    ],
)
def test_int_param_rejects(value, message):
    with pytest.raises(InvalidInput, match=message) as e:
        Param("n", int, 1, "", min=1, max=150).validate(value)
    assert "gen_args.n" in str(e.value) and "[1, 150]" in str(e.value)


def test_float_choices_multiple_and_null():
    assert Param("g", float, 1.0, "", min=0, max=30).validate(7) == 7.0
    with pytest.raises(InvalidInput, match="finite"):
        Param("g", float, 1.0, "", min=0, max=30).validate(float("nan"))
    with pytest.raises(InvalidInput, match="not one of a, b"):
        Param("s", str, "a", "", choices=("a", "b")).validate("c")
    with pytest.raises(InvalidInput, match="multiple of 8"):
        Param("h", int, 64, "", min=64, max=1024, multiple_of=8).validate(100)
    assert Param("seed", int, None, "", nullable=True).validate(None) is None


def test_unknown_keys_are_named_with_the_allowed_ones():
    with pytest.raises(InvalidInput) as e:
        MODELS["sd_base"].validate_args({"steps": 3, "num_inference_steps": 3})
    assert "unknown gen_args key(s) steps" in str(e.value)
    assert "num_inference_steps" in str(e.value).split("allowed:")[1]


def test_strength_times_steps_must_run_a_step():
    with pytest.raises(InvalidInput, match="num_inference_steps \\* gen_args.strength"):
        MODELS["sd_depth"].validate_args({"num_inference_steps": 2, "strength": 0.3})
    assert MODELS["sd_depth"].validate_args({"num_inference_steps": 2, "strength": 0.5})["strength"] == 0.5
