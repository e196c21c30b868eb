"""TrainConfig: presets, JSON round trip, --set overrides with type checking, validation errors."""

import json

import pytest

from edify.errors import EdifyError
from edify.training.config import PRESETS, TrainConfig, apply_overrides, diff, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name):
    config = get_preset(name)
    again = TrainConfig.from_json(config.to_json())
    assert again == config
    assert json.loads(again.to_json()) == json.loads(config.to_json())


def test_emoji_preset_matches_the_demo_setting():
    c = get_preset("emoji-64")
    assert (c.resolution, c.levels, c.model, c.text_encoder) == (64, 3, "emoji-64", "minilm")
    assert [c.resolution >> j for j in range(c.levels)] == [64, 32, 16]
    assert len(c.switch_sigmas) == 2 and c.switch_sigmas[0] < c.switch_sigmas[1]
    assert c.styles and "cond_drop" in c.to_dict() and c.cond_drop["media"] > 0


def test_overrides_are_converted_to_the_field_types():
    c = apply_overrides(get_preset("tiny-cpu"), [
        "lr=3e-4", "total_images=2e3", "batch_size=1_024", "betas=0.8,0.95", "compile=true",
        "cond_drop.text=0.25", "switch_sigmas=[1.5]", 'model={"widths": [16, 32]}', "stages=1", "name=x"])
    assert c.lr == 3e-4 and isinstance(c.lr, float)
    assert c.total_images == 2000 and isinstance(c.total_images, int)
    assert c.batch_size == 1024
    assert c.betas == (0.8, 0.95)
    assert c.compile is True
    assert c.cond_drop == {"text": 0.25, "media": 0.1}
    assert c.switch_sigmas == (1.5,)
    assert c.model == {"widths": [16, 32]}
    assert c.stages == (1,) and c.name == "x"
    # the preset itself is untouched (frozen dataclass, replaced copies)
    assert get_preset("tiny-cpu").lr == 1e-3


@pytest.mark.parametrize("override, words", [
    ("lr=fast", ["lr", "float", "'fast'"]),
    ("levels=1.5", ["levels", "int", "'1.5'"]),
    ("compile=maybe", ["compile", "bool", "'maybe'"]),
    ("bogus=1", ["unknown", "'bogus'"]),
    ("lr", ["key=value", "'lr'"]),
    ("cond_drop.camera=0.1", ["cond_drop", "'camera'"]),
    ("cond_drop.text=2", ["cond_drop.text", "[0, 1]", "2"]),
    ("batch_size=0", ["batch_size", "0"]),
    ("batch_size=6", ["grad_accum", "6"]),  # tiny-cpu has grad_accum 1, so use the next case too
    ("precision=fp8", ["precision", "'fp8'"]),
    ("dist=mpi", ["dist", "'mpi'"]),
    ("switch_sigmas=3,1", ["switch_sigmas", "3.0, 1.0"]),
    ("model={bad json", ["model", "JSON"]),
])
def test_bad_overrides_raise_one_line_errors(override, words):
    base = get_preset("tiny-cpu")
    if override == "batch_size=6":
        base = base.replace(grad_accum=4, batch_size=8)
    with pytest.raises(EdifyError) as err:
        apply_overrides(base, [override])
    message = str(err.value)
    assert "\n" not in message
    for w in words:
        assert w in message


def test_unknown_preset_and_unknown_json_key():
    with pytest.raises(EdifyError, match="unknown training preset 'nope'"):
        get_preset("nope")
    d = get_preset("tiny-cpu").to_dict()
    d["learning_rate"] = 1.0
    with pytest.raises(EdifyError, match="learning_rate"):
        TrainConfig.from_dict(d)


def test_diff_ignores_fields_that_may_change_on_resume():
    a = get_preset("tiny-cpu")
    assert diff(a, a.replace(total_images=10_000, checkpoint_images=7, data="elsewhere")) == []
    assert diff(a, a.replace(lr=0.5)) == ["lr: 0.001 -> 0.5"]
