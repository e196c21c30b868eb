"""Text encoders (bundled MiniLM, T5 from a local folder) and the on-disk embedding cache."""

from __future__ import annotations

import json
import shutil
import socket
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from edify.errors import EdifyError
from edify.text.cache import CachedTextEncoder, entry_key, precompute
from edify.text.encoders import MiniLMEncoder, T5Encoder, TextEncoder, load_text_encoder

SENTENCES = ["a red apple on a wooden table", "a cat sleeping on a sofa", "the dog runs in the park",
             "a photo of a smiling face", "a blue car"]


def _no_network(*args, **kwargs):
    raise AssertionError("network access attempted")


@pytest.fixture(scope="module")
def minilm():
    # Any socket connection or DNS lookup during the load fails the test.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket, "getaddrinfo", _no_network)
        return MiniLMEncoder()


def _make_tiny_t5(folder, seed: int, model_max_length: int | None = None, dtype=torch.float32):
    """A randomly initialised 1-layer T5 (d_model 16) and a word-level tokenizer trained here, offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   **kwargs)
    fast.save_pretrained(folder)
    config = T5Config(vocab_size=len(fast), d_model=16, num_layers=1, num_heads=2, d_ff=32, d_kv=8,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(seed)
    T5EncoderModel(config).to(dtype).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return _make_tiny_t5(tmp_path_factory.mktemp("t5a"), seed=0)


@pytest.fixture(scope="module")
def t5(t5_dir):
    return T5Encoder(t5_dir, max_length=12)


class Spy(TextEncoder):
    """Delegates to an encoder and records each batch it was asked to encode."""

    def __init__(self, inner: TextEncoder):
        self.inner, self.calls = inner, []

    def encode(self, texts):
        self.calls.append(list(texts))
        return self.inner.encode(texts)

    dim = property(lambda self: self.inner.dim)
    max_length = property(lambda self: self.inner.max_length)
    name = property(lambda self: self.inner.name)
    device = property(lambda self: self.inner.device)

    def to(self, device):
        self.inner.to(device)
        return self


# ---------------------------------------------------------------- MiniLM


def test_minilm_shapes_mask_and_zero_padding(minilm):
    texts = ["", "a cat", "a red apple on a wooden table"]
    states, mask = minilm.encode(texts)
    counts = [len(minilm.tokenizer(t)["input_ids"]) for t in texts]
    assert counts[0] == 2  # the empty prompt is [CLS] [SEP]
    assert states.shape == (3, max(counts), 384) and states.dtype == torch.float32
    assert mask.dtype == torch.bool and mask.tolist() == [[j < n for j in range(max(counts))] for n in counts]
    assert not states.requires_grad
    assert torch.all(states[~mask] == 0) and torch.all(states[mask].abs().sum(-1) > 0)
    assert minilm.dim == 384 and minilm.max_length == 77 and minilm.device == torch.device("cpu")
    assert minilm.to("cpu") is minilm


def test_minilm_deterministic_and_text_dependent(minilm):
    a1, m1 = minilm.encode(["a cat sleeping on a sofa", "a cat sleeping on a sofa"])
    a2, _ = minilm.encode(["a cat sleeping on a sofa", "a cat sleeping on a sofa"])
    assert torch.equal(a1, a2) and torch.equal(a1[0], a1[1])
    b, mb = minilm.encode(["a dog running in a park", "a dog running in a park"])
    assert m1.shape == mb.shape  # same token count, so only the content differs
    assert (a1[0] - b[0]).abs().mean() > 0.1


def test_minilm_weights_are_the_trained_ones(minilm):
    # Mean-pooled states of a trained sentence encoder rank a paraphrase above an unrelated text;
    # random weights would not.
    states, mask = minilm.encode(["a photo of a cat", "a picture of a kitten", "quarterly tax spreadsheet"])
    pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    cos = torch.nn.functional.cosine_similarity(pooled[0:1], pooled[1:], dim=-1)
    assert cos[0] > cos[1] + 0.2


def test_minilm_truncation_warns_once_and_respects_max_length(minilm):
    long_text = " ".join(["word"] * 200)
    with pytest.warns(UserWarning, match="limit of 77 tokens") as record:
        states, mask = minilm.encode([long_text, long_text + " more", "short"])
    assert len([r for r in record if "truncated" in str(r.message)]) == 1
    assert "2 of 3" in str(record[0].message)
    assert states.shape[1] == 77 and mask.sum(1).tolist()[:2] == [77, 77]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        minilm.encode(["short", "also short"])


def test_minilm_limits_and_bad_input(minilm):
    with pytest.raises(EdifyError, match="at most 512 tokens, got max_length=513"):
        MiniLMEncoder(max_length=513)
    with pytest.raises(EdifyError, match="positive integer, got 0"):
        MiniLMEncoder(max_length=0)
    with pytest.raises(EdifyError, match="list of strings"):
        minilm.encode("a cat")
    with pytest.raises(EdifyError, match="at least one text"):
        minilm.encode([])


def test_load_text_encoder_specs(tmp_path, t5_dir):
    for spec in ("bert", "t5:", "T5:/x", ""):
        with pytest.raises(EdifyError, match="unknown text encoder"):
            load_text_encoder(spec)
    with pytest.raises(EdifyError, match="does not exist"):
        load_text_encoder(f"t5:{tmp_path / 'missing'}")
    enc = load_text_encoder(f"t5:{t5_dir}", max_length=20)
    assert isinstance(enc, T5Encoder) and enc.max_length == 20


# ---------------------------------------------------------------- T5


def test_t5_loads_from_folder_with_its_tokenizer(t5):
    texts = ["a cat", "", "the dog runs in the park"]
    states, mask = t5.encode(texts)
    # Word-level tokens plus the </s> the post-processor appends; "" is just </s>.
    assert mask.sum(1).tolist() == [3, 1, 7]
    assert states.shape == (3, 7, 16) and states.dtype == torch.float32 and t5.dim == 16
    assert torch.all(states[~mask] == 0) and torch.all(states[mask].abs().sum(-1) > 0)
    # Unknown words map to <unk>: still real tokens.
    assert t5.encode(["zebra giraffe"])[1].sum().item() == 3


def test_encoding_stays_fp32_under_autocast(t5):
    ref = t5.encode(SENTENCES)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = t5.encode(SENTENCES)
    assert out[0].dtype == torch.float32 and torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_bf16_checkpoint_runs_in_fp32(tmp_path):
    enc = T5Encoder(_make_tiny_t5(tmp_path, seed=0, dtype=torch.bfloat16))
    assert all(p.dtype == torch.float32 for p in enc.model.parameters())
    assert enc.encode(["a cat"])[0].dtype == torch.float32


def test_t5_truncation_and_declared_limit(t5, tmp_path):
    with pytest.warns(UserWarning, match="limit of 12 tokens"):
        states, mask = t5.encode([" ".join(["cat"] * 30)])
    assert states.shape[1] == 12 and bool(mask.all())
    folder = _make_tiny_t5(tmp_path / "t5", seed=0, model_max_length=32)
    with pytest.raises(EdifyError, match="at most 32 tokens, got max_length=64"):
        T5Encoder(folder, max_length=64)


def test_t5_folder_errors(tmp_path):
    with pytest.raises(EdifyError, match="does not exist") as err:
        T5Encoder(tmp_path / "nope")
    assert "\n" not in str(err.value)
    with pytest.raises(EdifyError, match="must contain config.json"):
        T5Encoder(tmp_path)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(EdifyError, match="model_type 't5'.*got 'bert'"):
        T5Encoder(bert)


def test_encoder_names_identify_weights_and_length(t5_dir, t5, minilm, tmp_path):
    other = T5Encoder(_make_tiny_t5(tmp_path / "seed1", seed=1), max_length=12)
    moved = T5Encoder(shutil.copytree(t5_dir, tmp_path / "moved"), max_length=12)
    assert moved.name == t5.name  # the id follows the files, not their location
    assert len({t5.name, other.name, T5Encoder(t5_dir, max_length=13).name, minilm.name}) == 4
    assert t5.name.endswith("len12") and minilm.name.startswith("minilm")


# ---------------------------------------------------------------- cache


def test_cache_miss_hit_and_new_process_are_bitwise_identical(t5, tmp_path):
    texts = ["a cat", "the dog runs in the park", "", "a blue car"]
    ref_states, ref_mask = t5.encode(texts)
    spy = Spy(t5)
    cached = CachedTextEncoder(spy, tmp_path / "cache")
    miss = cached.encode(texts)
    hit = cached.encode(texts)
    fresh_spy = Spy(t5)
    fresh = CachedTextEncoder(fresh_spy, tmp_path / "cache").encode(texts)  # as a new process would
    for states, mask in (miss, hit, fresh):
        assert torch.equal(states, ref_states) and torch.equal(mask, ref_mask)
    assert spy.calls == [texts] and fresh_spy.calls == []
    assert (cached.hits, cached.misses) == (4, 4)
    files = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert len(files) == 4 and not list((tmp_path / "cache").rglob(".tmp-*"))
    path = cached.path("a cat")
    assert path in files and path.parent.name == path.name[:2] == entry_key(t5.name, "a cat")[:2]
    with safe_open(str(path), framework="pt") as f:  # trimmed to the real tokens
        assert f.get_tensor("states").shape == (3, 16)
        assert f.metadata() == {"encoder": t5.name, "text": "a cat"}


def test_cache_mixed_batch_encodes_only_missing_once(t5, tmp_path):
    spy = Spy(t5)
    cached = CachedTextEncoder(spy, tmp_path)
    first, _ = cached.encode(["a cat"])
    states, mask = cached.encode(["a blue car", "a cat", "a blue car", "a red apple on a wooden table"])
    assert spy.calls == [["a cat"], ["a blue car", "a red apple on a wooden table"]]
    assert torch.equal(states[1, :3], first[0]) and torch.equal(states[0], states[2])
    ref, ref_mask = t5.encode(["a blue car", "a red apple on a wooden table"])
    assert torch.equal(states[[0, 3]], ref) and torch.equal(mask[[0, 3]], ref_mask)
    assert mask.sum(1).tolist() == [4, 3, 4, 8] and torch.all(states[~mask] == 0)


def test_cache_names_do_not_collide(t5, t5_dir, tmp_path):
    longer = T5Encoder(t5_dir, max_length=4)  # same weights, different max_length -> different entries
    text = "the dog runs in the park"
    a = CachedTextEncoder(t5, tmp_path).encode([text])
    with pytest.warns(UserWarning, match="limit of 4"):
        b = CachedTextEncoder(longer, tmp_path).encode([text])
    assert a[1].sum() == 7 and b[1].sum() == 4
    assert len(list(tmp_path.rglob("*.safetensors"))) == 2


def test_cache_replaces_foreign_or_corrupt_entries(t5, tmp_path):
    cached = CachedTextEncoder(t5, tmp_path)
    path = cached.path("a cat")
    path.parent.mkdir(parents=True)
    save_file({"states": torch.ones(3, 16)}, str(path), metadata={"encoder": "other", "text": "a cat"})
    states, _ = cached.encode(["a cat"])
    assert torch.equal(states, t5.encode(["a cat"])[0])  # re-encoded and overwritten
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["encoder"] == t5.name
    path.write_bytes(b"\x00garbage")  # a truncated entry
    states, _ = cached.encode(["a cat"])
    assert torch.equal(states, t5.encode(["a cat"])[0])


def test_cache_memory_lru(t5, tmp_path):
    spy = Spy(t5)
    cached = CachedTextEncoder(spy, tmp_path, memory_items=2)
    cached.encode(["a cat", "a blue car", "a red apple on a wooden table"])
    shutil.rmtree(tmp_path)
    cached.encode(["a blue car", "a red apple on a wooden table"])  # served from memory
    assert len(spy.calls) == 1
    cached.encode(["a cat"])  # evicted, and gone from disk: encoded again
    assert spy.calls[-1] == ["a cat"]
    with pytest.raises(EdifyError, match="memory_items must be >= 0, got -1"):
        CachedTextEncoder(t5, tmp_path, memory_items=-1)


def test_precompute_fills_cache_once(t5, tmp_path):
    spy = Spy(t5)
    cached = CachedTextEncoder(spy, tmp_path)
    captions = SENTENCES + SENTENCES[:2] + [""]
    assert precompute(cached, captions, batch_size=2) == 6
    assert [len(c) for c in spy.calls] == [2, 2, 2]
    assert precompute(cached, captions, batch_size=2) == 0
    n_calls = len(spy.calls)
    states, mask = cached.encode(captions)
    assert len(spy.calls) == n_calls and states.shape[0] == len(captions)
    with pytest.raises(EdifyError, match="batch_size must be >= 1, got 0"):
        precompute(cached, captions, batch_size=0)
    with pytest.raises(EdifyError, match="CachedTextEncoder"):
        precompute(t5, captions)


def test_cache_with_minilm_is_bitwise(minilm, tmp_path):
    texts = ["a grinning face with big eyes", "a red heart", ""]
    ref = minilm.encode(texts)
    for _ in range(2):
        out = CachedTextEncoder(minilm, tmp_path).encode(texts)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
