"""The Cond batch and its dropout (edify.conditioning), the style vocabulary and camera fields (edify.data.vocab)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from edify.conditioning import DOF_NAMES, NULL, PITCH_NAMES, Cond, random_drop
from edify.data.vocab import StyleVocab, make_cond, parse_dof, parse_pitch
from edify.errors import EdifyError
from edify.text.encoders import TextEncoder


def _cond(batch: int = 4, length: int = 3, dim: int = 2) -> Cond:
    return Cond(
        text=torch.arange(batch * length * dim, dtype=torch.float32).reshape(batch, length, dim) + 1,
        text_mask=torch.ones(batch, length, dtype=torch.bool),
        media=torch.arange(batch) % 3,
        pitch=torch.arange(batch) % 3,
        dof=torch.arange(batch) % 2,
    )


# ---------------------------------------------------------------- Cond


def test_drop_where_nulls_only_selected_samples():
    c = _cond()
    where = torch.tensor([True, False, True, False])
    d = c.drop(["media", "pitch", "text"], where)
    assert d.media.tolist() == [NULL, 1, NULL, 0] and d.pitch.tolist() == [NULL, 1, NULL, 0]
    assert d.text_mask.any(1).tolist() == [False, True, False, True]
    assert torch.equal(d.dof, c.dof) and torch.equal(d.text, c.text)  # untouched
    assert torch.equal(c.media, torch.arange(4) % 3)  # the original is not modified


def test_drop_all_categorical():
    d = _cond().drop(["media", "dof"])
    assert d.media.tolist() == [NULL] * 4 and d.dof.tolist() == [NULL] * 4


def test_drop_all_text():
    assert not _cond().drop(["text"]).text_mask.any()


def test_drop_errors_and_absent_fields():
    with pytest.raises(ValueError, match="unknown condition 'colour'"):
        _cond().drop(["colour"])
    c = Cond(media=torch.tensor([1, 2]))
    d = c.drop(["text", "pitch"], torch.tensor([True, True]))
    assert d.text is None and d.pitch is None and d.media.tolist() == [1, 2]
    with pytest.raises(ValueError, match="together"):
        Cond(text=torch.zeros(1, 2, 3))


def test_repeat_interleaves_samples():
    c = _cond(batch=2)
    r = c.repeat(3)
    assert r.batch_size == 6 and r.media.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(r.text[3], c.text[1]) and torch.equal(r.text[2], c.text[0])
    assert torch.equal(r.index(slice(0, 6, 3)).text, c.text)


def test_cat_pads_text_to_the_longest():
    a, b = _cond(batch=2, length=3), _cond(batch=1, length=5)
    c = Cond.cat([a, b])
    assert c.text.shape == (3, 5, 2) and c.text_mask.shape == (3, 5)
    assert torch.equal(c.text[:2, :3], a.text) and torch.all(c.text[:2, 3:] == 0)
    assert c.text_mask.sum(1).tolist() == [3, 3, 5] and c.media.tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="'media' is set in some"):
        Cond.cat([a, Cond(text=b.text, text_mask=b.text_mask, pitch=b.pitch, dof=b.dof)])


# ---------------------------------------------------------------- random_drop


def _within(rate: float, p: float, n: int, k: float = 4.0) -> bool:
    return abs(rate - p) <= k * math.sqrt(p * (1 - p) / n)


def test_random_drop_rates_and_independence():
    n = 20_000
    c = _cond(batch=n, length=2, dim=1)
    probs = {"text": 0.1, "media": 0.3, "pitch": 0.5, "dof": 0.0}
    d = random_drop(c, probs, generator=torch.Generator().manual_seed(0))
    dropped = {
        "text": ~d.text_mask.any(1),
        "media": d.media == NULL,
        "pitch": d.pitch == NULL,
        "dof": d.dof == NULL,
    }
    for name, p in probs.items():
        assert _within(dropped[name].float().mean().item(), p, n), name
    # Independent draws: every pair's joint drop rate is the product of the marginals.
    for a, b in (("text", "media"), ("text", "pitch"), ("media", "pitch")):
        joint = (dropped[a] & dropped[b]).float().mean().item()
        assert _within(joint, probs[a] * probs[b], n), (a, b)
    # Kept samples keep their values.
    kept = ~dropped["media"]
    assert torch.equal(d.media[kept], c.media[kept])


def test_random_drop_extremes_determinism_and_errors():
    c = _cond(batch=64)
    d = random_drop(c, {"text": 1.0, "media": 1.0})
    assert not d.text_mask.any() and (d.media == NULL).all() and torch.equal(d.pitch, c.pitch)
    e1 = random_drop(c, {"pitch": 0.5}, generator=torch.Generator().manual_seed(3))
    e2 = random_drop(c, {"pitch": 0.5}, generator=torch.Generator().manual_seed(3))
    assert torch.equal(e1.pitch, e2.pitch)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\], got 1.5"):
        random_drop(c, {"media": 1.5})
    assert random_drop(Cond(), {"text": 0.5}) == Cond()


# ---------------------------------------------------------------- vocabulary and camera fields


def test_style_vocab_from_values_and_index():
    v = StyleVocab.from_values(["twemoji", "noto", None, "openmoji", "noto", ""])
    assert v.names == ("noto", "openmoji", "twemoji") and len(v) == 3
    assert [v.index(n) for n in ("noto", "openmoji", "twemoji", None)] == [0, 1, 2, NULL]
    assert v.indices(["twemoji", None, "noto"]).tolist() == [2, NULL, 0]
    with pytest.raises(EdifyError, match="unknown style 'fluent'; known: noto, openmoji, twemoji"):
        v.index("fluent")


def test_style_vocab_json_round_trip_and_errors():
    v = StyleVocab.from_values(["b", "a", "c"])
    w = StyleVocab.from_dict(json.loads(json.dumps(v.to_dict())))
    assert w == v and w.index("c") == 2
    with pytest.raises(EdifyError, match="sorted and unique"):
        StyleVocab(("b", "a"))
    with pytest.raises(EdifyError, match="'names' list"):
        StyleVocab.from_dict({"styles": ["a"]})
    with pytest.raises(EdifyError, match="must be strings, got 3"):
        StyleVocab.from_values(["a", 3])
    with pytest.raises(EdifyError, match=r"known: \(none\)"):
        StyleVocab.from_values([]).index("a")


@pytest.mark.parametrize("value, name", [
    ("ascending", "ascending"), ("Eye level", "eye level"), ("eye-level", "eye level"),
    ("eye_level", "eye level"), (" DESCENDING ", "descending"), ("low angle", "ascending"),
    ("bird's eye", "descending"),
])
def test_parse_pitch(value, name):
    assert parse_pitch(value) == PITCH_NAMES.index(name)


@pytest.mark.parametrize("value, name", [("shallow", "shallow"), ("Deep", "deep"),
                                         ("shallow depth-of-field", "shallow"), ("deep_dof", "deep")])
def test_parse_dof(value, name):
    assert parse_dof(value) == DOF_NAMES.index(name)


def test_camera_missing_indices_and_errors():
    assert parse_pitch(None) == parse_pitch("") == parse_dof(None) == parse_dof("  ") == NULL
    assert parse_pitch(2) == 2 and parse_dof(-1) == NULL
    with pytest.raises(EdifyError, match="pitch must be one of ascending, eye level, descending, got 'sideways'"):
        parse_pitch("sideways")
    with pytest.raises(EdifyError, match=r"depth of field index must be in \[-1, 1\], got 2"):
        parse_dof(2)
    with pytest.raises(EdifyError, match="got True"):
        parse_dof(True)


class WordEncoder(TextEncoder):
    """A stand-in encoder: one token per word plus an end token, state = (word length, position)."""

    def encode(self, texts):
        tokens = [t.split() + ["</s>"] for t in texts]
        length = max(len(t) for t in tokens)
        states = torch.zeros(len(texts), length, 2)
        mask = torch.zeros(len(texts), length, dtype=torch.bool)
        for i, words in enumerate(tokens):
            for j, w in enumerate(words):
                states[i, j] = torch.tensor([len(w), j + 1.0])
                mask[i, j] = True
        return states, mask

    dim = 2
    max_length = 16
    name = "words"
    device = torch.device("cpu")

    def to(self, device):
        return self


def test_make_cond_builds_a_batch():
    vocab = StyleVocab.from_values(["noto", "twemoji"])
    c = make_cond(WordEncoder(), ["a red heart", None, "cat"], ["twemoji", "noto", None], vocab,
                  pitch=["eye level", None, "ascending"], dof=["deep", "shallow", None])
    assert c.text.shape == (3, 4, 2) and c.text_mask.sum(1).tolist() == [4, 0, 2]
    assert torch.all(c.text[1] == 0) and c.text[0, 1].tolist() == [3.0, 2.0]
    assert c.media.tolist() == [1, 0, NULL] and c.pitch.tolist() == [1, NULL, 0] and c.dof.tolist() == [1, 0, NULL]
    bare = make_cond(WordEncoder(), ["cat"])
    assert bare.media is None and bare.pitch is None and bare.dof is None and bare.batch_size == 1


def test_make_cond_errors():
    vocab = StyleVocab.from_values(["noto"])
    with pytest.raises(EdifyError, match=r"styles must have one value per caption \(2\), got 1"):
        make_cond(WordEncoder(), ["a", "b"], ["noto"], vocab)
    with pytest.raises(EdifyError, match="without a StyleVocab"):
        make_cond(WordEncoder(), ["a"], ["noto"])
    with pytest.raises(EdifyError, match="unknown style 'twemoji'"):
        make_cond(WordEncoder(), ["a"], ["twemoji"], vocab)
    with pytest.raises(EdifyError, match="list of strings"):
        make_cond(WordEncoder(), "a cat")
