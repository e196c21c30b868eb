"""Evaluation metrics: FID/KID closed forms and behaviour on Inception features, SWD, retrieval,
the reference-feature cache, and `edify eval` end to end on a tiny random model.

Inception-v3 costs ~6 GFLOP per 299 px image on the CPU, so the real network sees one shared set of
12 synthetic "emoji-like" images (coloured shapes on white) and three noisy copies, computed once
per module.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import subprocess
import sys
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from scipy.linalg import sqrtm

from edify.cli import main as cli_main
from edify.errors import EdifyError
from edify.eval import evaluate
from edify.eval.evaluate import draw_prompts, load_split, parse_metrics
from edify.eval.features import InceptionFeatures, rebatch
from edify.eval.fid import FeatureStats, cache_key, fid, frechet_distance, kid, mmd2_unbiased, reference_stats
from edify.eval.retrieval import retrieval_accuracy
from edify.eval.swd import SWDDescriptors, sliced_wasserstein, swd

NOISE = (0.03, 0.1, 0.3)


def shapes(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """n images [-1, 1] of 2-4 outlined ellipses/rectangles in random colours on white."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        big = size * 4
        im = Image.new("RGB", (big, big), "white")
        draw = ImageDraw.Draw(im)
        for _ in range(rng.randint(2, 4)):
            x0, y0 = rng.randrange(3 * size), rng.randrange(3 * size)
            box = (x0, y0, x0 + rng.randrange(30, big - x0 + 30), y0 + rng.randrange(30, big - y0 + 30))
            fill = tuple(rng.randrange(256) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill, outline=(0, 0, 0), width=6)
        arr = np.asarray(im.resize((size, size), Image.Resampling.LANCZOS))
        out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(out)


def noisy(x: torch.Tensor, s: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + s * torch.randn(x.shape, generator=g)).clamp(-1, 1)


@pytest.fixture(scope="module")
def extractor():
    return InceptionFeatures(batch_size=12)


@pytest.fixture(scope="module")
def sets(extractor):
    """Images and Inception features: the base set and one noisy copy per noise level."""
    base = shapes(12)
    images = {0.0: base, **{s: noisy(base, s) for s in NOISE}}
    return {s: (x, extractor(x)) for s, x in images.items()}


# ---------------------------------------------------------------------------------------------
# FID


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(6, generator=g, dtype=torch.float64) + 0.1, torch.rand(6, generator=g, dtype=torch.float64)
    mu1, mu2 = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    expected = float(((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_scipy_sqrtm_on_full_covariances():
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(8, 8, generator=g, dtype=torch.float64), torch.randn(8, 8, generator=g, dtype=torch.float64)
    S1, S2 = A @ A.T + 0.1 * torch.eye(8), B @ B.T + 0.1 * torch.eye(8)
    mu1, mu2 = torch.randn(8, generator=g, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    root = sqrtm(S1.numpy() @ S2.numpy()).real
    reference = float(((mu1 - mu2) ** 2).sum()) + float(np.trace((S1 + S2).numpy() - 2 * root))
    assert frechet_distance(mu1, S1, mu2, S2) == pytest.approx(reference, rel=1e-8)


def test_low_rank_fid_equals_the_covariance_formula():
    # 20 samples in 64 dims: singular covariances, the exact feature-space trace must agree
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20, 64, generator=g, dtype=torch.float64)
    y = 0.5 * torch.randn(30, 64, generator=g, dtype=torch.float64) + 0.3
    sx, sy = FeatureStats.from_features(x), FeatureStats.from_features(y)
    assert fid(sx, sy) == pytest.approx(frechet_distance(sx.mu, sx.sigma, sy.mu, sy.sigma), rel=1e-6)
    assert fid(x, x) == pytest.approx(0.0, abs=1e-9)


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise(sets):
    f0 = sets[0.0][1]
    assert abs(fid(f0, f0)) < 1e-3
    values = [fid(f0, sets[s][1]) for s in NOISE]
    assert values[0] > 1.0, values
    assert values == sorted(values) and values[0] < values[1] < values[2], values


# ---------------------------------------------------------------------------------------------
# KID


def test_mmd2_unbiased_matches_a_direct_double_sum():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    k = lambda a, b: (float(a @ b) / 4 + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
    yy = sum(k(y[i], y[j]) for i in range(6) for j in range(6) if i != j) / 30
    xy = sum(k(x[i], y[j]) for i in range(5) for j in range(6)) / 30
    assert mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_is_unbiased_for_two_samples_of_one_distribution():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(400, 16, generator=g), torch.randn(400, 16, generator=g)
    same, same_std = kid(x, y, subsets=50, subset_size=100, seed=0)
    shifted, _ = kid(x, y + 0.5, subsets=50, subset_size=100, seed=0)
    assert abs(same) < 2 * same_std  # zero within the subset spread
    assert shifted > 10 * same_std


def test_kid_on_identical_sets_is_the_diagonal_term_and_near_zero(sets):
    f0 = sets[0.0][1].double()
    n = f0.shape[0]
    value, _ = kid(f0, f0)
    K = (f0 @ f0.T / f0.shape[1] + 1) ** 3
    off = (K.sum() - K.diagonal().sum()) / (n * (n - 1))
    # with X = Y the cross term keeps the n pairs (x_i, x_i): exactly -(2/n)(mean diag - mean off-diag)
    assert value == pytest.approx(float(-(2 / n) * (K.diagonal().mean() - off)), rel=1e-9)
    noisy_kid = [kid(f0, sets[s][1])[0] for s in NOISE]
    assert abs(value) < 0.5 * noisy_kid[-1]
    assert noisy_kid[0] < noisy_kid[2]


# ---------------------------------------------------------------------------------------------
# SWD


def test_sliced_wasserstein_of_a_shift_is_the_mean_projected_length():
    # b = a + c: every sorted projection moves by theta.c, so SW = E|theta.c| = |c| G(d/2) / (sqrt(pi) G((d+1)/2))
    d = 5
    g = torch.Generator().manual_seed(5)
    a = torch.randn(300, d, generator=g, dtype=torch.float64)
    c = torch.tensor([3.0, -1.0, 0.5, 2.0, 0.0], dtype=torch.float64)
    expected = float(c.norm()) * math.gamma(d / 2) / (math.sqrt(math.pi) * math.gamma((d + 1) / 2))
    assert sliced_wasserstein(a, a + c) == pytest.approx(expected, rel=0.03)
    assert sliced_wasserstein(a, a.clone()) == 0.0


def test_swd_is_zero_on_identical_sets_and_grows_with_noise(sets):
    x0 = sets[0.0][0]
    same = swd(x0, x0.clone(), repeats=1)
    assert set(same) == {"swd_64", "swd_32", "swd_16", "swd"}
    assert all(v == 0.0 for v in same.values())
    values = [swd(x0, sets[s][0], repeats=1)["swd"] for s in NOISE]
    assert 0 < values[0] < values[1] < values[2], values
    # descriptors do not depend on batching
    one, two = SWDDescriptors(seed=0), SWDDescriptors(seed=0)
    one.add(x0)
    two.add(x0[:5])
    two.add(x0[5:])
    assert all(torch.equal(a, b) for a, b in zip(one.finish(), two.finish()))


# ---------------------------------------------------------------------------------------------
# Retrieval


def test_retrieval_is_perfect_when_the_generated_images_are_the_real_ones(sets):
    f0 = sets[0.0][1]
    labels = [(f"caption {i}", "noto") for i in range(12)]
    assert retrieval_accuracy(f0, f0, labels, labels) == {"retrieval_top1": 1.0, "retrieval_top5": 1.0}
    shifted = labels[1:] + labels[:1]  # every image asked to retrieve another image's prompt
    scores = retrieval_accuracy(f0, f0, shifted, labels)
    assert scores["retrieval_top1"] < 0.5 and scores["retrieval_top1"] <= scores["retrieval_top5"]


def test_retrieval_counts_any_real_image_of_the_prompt():
    real = torch.eye(4)  # orthogonal features: real j is most similar to fake j only
    fake = torch.eye(4)[[1, 0, 2, 3]]
    real_labels = ["a", "a", "b", "c"]  # two real images carry prompt "a"
    assert retrieval_accuracy(fake, real, ["a", "a", "b", "c"], real_labels, ks=(1,)) == {"retrieval_top1": 1.0}
    assert retrieval_accuracy(fake, real, ["b", "a", "a", "c"], real_labels, ks=(1, 3))["retrieval_top1"] == 0.5


# ---------------------------------------------------------------------------------------------
# evaluate() and the reference cache


def test_evaluate_identical_sets(sets):
    x0, f0 = sets[0.0]
    labels = [(f"c{i}", None) for i in range(12)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate(x0, x0, ("fid", "kid", "swd", "retrieval"), extractor=_Spy(sets),
                          real_stats=FeatureStats.from_features(f0), fake_labels=labels, real_labels=labels,
                          batch_size=7)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and "FID from 12 generated / 12 real" in messages[0] and "below 2048" in messages[0]
    assert "KID from 12 generated / 12 real" in messages[1] and "below 100" in messages[1]
    assert abs(result["fid"]) < 1e-3 and result["swd"] == 0.0 and result["retrieval_top1"] == 1.0
    assert result["kid"] == pytest.approx(kid(f0, f0)[0], rel=1e-9)
    assert result["num_fake"] == result["num_real"] == 12


class _Spy:
    """Extractor stand-in: answers from precomputed features and counts calls."""

    id = "spy"

    def __init__(self, sets):
        self.table = {x.numpy().tobytes(): f for x, f in (sets[s] for s in sets) for x, f in zip(x, f)}
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        return torch.stack([self.table[x.numpy().tobytes()] for x in images])


def test_reference_cache_returns_the_same_numbers_without_recomputing(tmp_path, sets):
    spy = _Spy(sets)
    x0, f0 = sets[0.0]
    key = cache_key("data/emoji", "val", 64, "spy")
    first, meta = reference_stats(key, tmp_path, lambda: (spy(x0), {"count": 12}))
    assert spy.calls == 1 and meta == {"count": 12}
    second, meta2 = reference_stats(key, tmp_path, lambda: (spy(x0), {"count": 12}))
    assert spy.calls == 1 and meta2 == {"count": 12}  # read from the cache, extractor untouched
    assert torch.equal(first.mu, second.mu) and torch.equal(first.sigma, second.sigma)
    assert torch.equal(first.features, second.features) and torch.equal(second.features, f0)
    assert fid(first, sets[0.3][1]) == fid(second, sets[0.3][1])
    assert key != cache_key("data/emoji", "val", 128, "spy") != cache_key("data/emoji", "train", 64, "spy")
    reference_stats(key, None, lambda: (spy(x0), {}))  # cache off: recomputes
    assert spy.calls == 2


def test_features_do_not_depend_on_batching(extractor, sets):
    x0, f0 = sets[0.0]
    f = extractor([x0[:3], x0[3:4], x0[4:6]])  # re-cut into one batch of 6
    torch.testing.assert_close(f, f0[:6], rtol=1e-4, atol=1e-4)
    assert [b.shape[0] for b in rebatch([torch.zeros(3), torch.zeros(5), torch.zeros(2)], 4)] == [4, 4, 2]


def test_bad_inputs_raise_edify_error(extractor, tmp_path):
    with pytest.raises(EdifyError, match="expected 0000000000"):
        InceptionFeatures(sha1="0" * 40)  # the weights file is checked against its known sha1
    with pytest.raises(EdifyError, match="feature batch size must be >= 1, got 0"):
        InceptionFeatures(batch_size=0)
    with pytest.raises(EdifyError, match=r"in \[-1, 1\]"):
        extractor(torch.full((1, 3, 8, 8), 2.0))
    with pytest.raises(EdifyError, match=r"\[B, 3, H, W\]"):
        extractor(torch.zeros(1, 1, 8, 8))
    with pytest.raises(EdifyError, match="at least 2 samples, got 1"):
        fid(torch.zeros(1, 4), torch.zeros(3, 4))
    with pytest.raises(EdifyError, match="same dimension"):
        kid(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(EdifyError, match="at least 16 px, got 8x8"):
        swd(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8))
    with pytest.raises(EdifyError, match="subset of fid, kid, swd, retrieval, got"):
        parse_metrics("fid,isc")
    with pytest.raises(EdifyError, match="SWD needs the real images"):
        evaluate(torch.zeros(2, 3, 16, 16), None, "swd")
    with pytest.raises(EdifyError, match="retrieval needs fake_labels"):
        evaluate(torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 16, 16), "retrieval", extractor=object())
    with pytest.raises(EdifyError, match="one label per generated image"):
        retrieval_accuracy(torch.eye(3), torch.eye(3), ["a"], ["a", "b", "c"])
    with pytest.raises(EdifyError, match="has no split 'test'"):
        load_split(_make_data(tmp_path), "test", 32)
    with pytest.raises(EdifyError, match="model makes 64 px images, the data split holds 32 px"):
        load_split(_make_data(tmp_path), "val", 64)


# ---------------------------------------------------------------------------------------------
# `edify eval` on a tiny random model folder and a tiny synthetic shard (CLI smoke test)


def _make_data(root, n: int = 6):
    """<root>/data/val/shard-0000.tar: n 32 px images keyed "32.png" with caption/style json."""
    data = root / "data"
    (data / "val").mkdir(parents=True, exist_ok=True)
    images = shapes(n, 32, seed=7)
    with tarfile.open(data / "val" / "shard-0000.tar", "w") as tf:
        for i, x in enumerate(images):
            buf = io.BytesIO()
            Image.fromarray(((x + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(buf, "PNG")
            meta = json.dumps({"caption": f"shape number {i}", "style": "noto" if i % 2 else "other"}).encode()
            for name, payload in ((f"{i:04d}.32.png", buf.getvalue()), (f"{i:04d}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    return data


class _HashText:
    """Deterministic stand-in text encoder: one 384-d state per word from its hash."""

    dim, max_length, name, device = 384, 8, "hash", torch.device("cpu")

    def to(self, device):
        return self

    def encode(self, texts):
        L = max(len(t.split()) for t in texts)
        states, mask = torch.zeros(len(texts), L, 384), torch.zeros(len(texts), L, dtype=torch.bool)
        for b, t in enumerate(texts):
            for i, w in enumerate(t.split()):
                seed = int(hashlib.sha256(w.encode()).hexdigest()[:8], 16)
                states[b, i], mask[b, i] = torch.randn(384, generator=torch.Generator().manual_seed(seed)), True
        return states, mask


def test_eval_cli_on_a_tiny_model_and_shard(tmp_path, monkeypatch, capsys):
    from edify.networks.presets import build_network
    from edify.pipelines.text2image import PipelineConfig, SamplingDefaults, TextToImagePipeline

    torch.manual_seed(0)
    net = build_network("tiny")
    config = PipelineConfig(network=net.config.to_dict(), levels=3, switch_sigmas=(1.0, 5.0), resolution=32,
                            styles=("noto", "twemoji"), defaults=SamplingDefaults(num_steps=3, guidance_scale=2.0))
    TextToImagePipeline(net, config).save_pretrained(tmp_path / "model")
    monkeypatch.setattr(TextToImagePipeline, "text_encoder", property(lambda self: _HashText()))
    data = _make_data(tmp_path)
    args = ["eval", "--model", str(tmp_path / "model"), "--data", str(data), "--split", "val",
            "--num-samples", "4", "--steps", "3", "--sampler", "euler", "--seed", "3", "--batch", "4",
            "--cache", str(tmp_path / "cache")]
    assert cli_main(args) == 0
    out, err = capsys.readouterr()
    record = json.loads(out.strip().splitlines()[-1])
    assert "below 2048" in err and "below 100" in err
    assert record["num_samples"] == 4 and record["num_real"] == 6 and record["resolution"] == 32
    assert record["nfe"] == 3 and record["sampler"] == "euler" and record["steps"] == 3 and record["seed"] == 3
    assert record["swd_32"] > 0 and record["fid"] > 0 and 0 <= record["retrieval_top1"] <= record["retrieval_top5"] <= 1
    assert {"kid", "kid_std", "swd", "swd_16", "guidance", "model", "data", "seconds"} <= set(record)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1  # the real features, cached

    # the caption list depends only on the seed and the split
    real = load_split(data, "val", 32)
    assert draw_prompts(real, 4, 3) == draw_prompts(real, 4, 3) != draw_prompts(real, 4, 4)
    assert sorted(draw_prompts(real, 12, 3)) == sorted(list(range(6)) * 2)

    # errors: non-zero exit, one line
    assert cli_main(args[:-2] + ["--cache", str(tmp_path / "cache"), "--num-samples", "0"]) == 2
    assert cli_main(["eval", "--model", str(tmp_path / "model"), "--data", str(data), "--split", "test",
                     "--num-samples", "2"]) == 2
    _, err = capsys.readouterr()
    assert "has no split 'test'" in err


# ---------------------------------------------------------------------------------------------
# A reference set that lost images is refused, never silently evaluated on the rest


def _truncate(shard, keep: float = 0.3) -> None:
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * keep)])


def _with_sidecar(data, count: int):
    (data / "val" / "shard-0000.tar.json").write_text(json.dumps({"count": count}))


def test_a_truncated_shard_is_refused_with_the_number_of_lost_images(tmp_path):
    data = _make_data(tmp_path, n=12)
    _with_sidecar(data, 12)
    _truncate(data / "val" / "shard-0000.tar")
    with pytest.raises(EdifyError, match=r"lost (\d+) of 12 images .*broken_shard: 1.*--allow-missing") as info:
        load_split(data, "val", 32)
    lost = int(info.value.args[0].split(" lost ")[1].split()[0])
    assert 0 < lost < 12 and "\n" not in str(info.value)
    with pytest.raises(EdifyError, match=f"lost {lost} of 12"):
        load_split(data, "val", 32, allow_missing=lost - 1)
    with pytest.warns(UserWarning, match=f"evaluating without {lost} unreadable"):
        real = load_split(data, "val", 32, allow_missing=lost)
    assert len(real.captions) == 12 - lost and real.lost == lost
    assert len(load_split(data, "val", 32, max_images=2).captions) == 2  # the first two survived: no loss


def test_a_truncated_shard_without_a_count_is_refused_as_an_unknown_loss(tmp_path):
    data = _make_data(tmp_path, n=12)
    _truncate(data / "val" / "shard-0000.tar")
    with pytest.raises(EdifyError, match="how many images were lost is unknown"):
        load_split(data, "val", 32, allow_missing=100)


def test_corrupt_images_count_as_lost_in_shards_and_folders(tmp_path):
    data = _make_data(tmp_path, n=6)
    shard = data / "val" / "shard-0000.tar"
    with tarfile.open(shard, "a") as tf:  # one more sample whose PNG is garbage
        for name, payload in (("0099.32.png", b"not a png"), ("0099.json", json.dumps({"caption": "x"}).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    with pytest.raises(EdifyError, match=r"lost 1 of 7 images .*bad_image: 1"):
        load_split(data, "val", 32)
    folder = tmp_path / "folder" / "val"
    folder.mkdir(parents=True)
    for i, x in enumerate(shapes(3, 32, seed=2)):
        Image.fromarray(((x + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"shape {i}")
    (folder / "1.png").write_bytes((folder / "1.png").read_bytes()[:60])  # header intact, data cut
    with pytest.raises(EdifyError, match=r"lost 1 of 3 images .*bad_image: 1"):
        load_split(tmp_path / "folder", "val", 32)
    with pytest.warns(UserWarning, match="evaluating without 1 unreadable"):
        assert load_split(tmp_path / "folder", "val", 32, allow_missing=1).lost == 1


def _edify(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDIFY_")}
    return subprocess.run([sys.executable, "-m", "edify.cli", *args], capture_output=True, text=True,
                          env={**env, "OMP_NUM_THREADS": "1"}, timeout=300)


def _one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    assert all(f in result.stderr for f in fragments), result.stderr


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from edify.networks.presets import build_network
    from edify.pipelines.text2image import PipelineConfig, SamplingDefaults, TextToImagePipeline

    torch.manual_seed(0)
    net = build_network("tiny")
    config = PipelineConfig(network=net.config.to_dict(), resolution=32, styles=("noto", "twemoji"),
                            defaults=SamplingDefaults(num_steps=3, guidance_scale=2.0))
    folder = tmp_path_factory.mktemp("eval-model") / "model"
    TextToImagePipeline(net, config).save_pretrained(folder)
    return folder


def test_eval_cli_refuses_a_damaged_split_and_a_cache_that_is_a_file(tmp_path, tiny_model):
    data = _make_data(tmp_path, n=12)
    _with_sidecar(data, 12)
    _truncate(data / "val" / "shard-0000.tar")
    base = ["eval", "--model", str(tiny_model), "--data", str(data), "--num-samples", "2", "--batch", "2",
            "--steps", "3", "--metrics", "swd", "--no-cache"]
    _one_line_error(_edify(*base), "of 12 images", "--allow-missing")
    (tmp_path / "cache").write_text("a file")
    _one_line_error(_edify(*base[:-3], "--metrics", "fid", "--cache", str(tmp_path / "cache")),
                    "--cache must be a folder")
    with pytest.warns(UserWarning):
        lost = 12 - len(load_split(data, "val", 32, allow_missing=12).captions)
    result = _edify(*base, "--allow-missing", str(lost))
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.splitlines()[-1])
    assert record["real_missing"] == lost and record["num_real"] == 12 - lost
    assert f"evaluating without {lost} unreadable" in result.stderr and "Traceback" not in result.stderr


def test_eval_progress_and_a_broken_model(tmp_path, tiny_model, monkeypatch):
    """evaluate_pipeline reports each generated batch and stops on a non-finite sampler state."""
    from edify.eval.evaluate import evaluate_pipeline
    from edify.pipelines.text2image import TextToImagePipeline

    monkeypatch.setattr(TextToImagePipeline, "text_encoder", property(lambda self: _HashText()))
    pipe = TextToImagePipeline.from_pretrained(tiny_model)
    real = load_split(_make_data(tmp_path), "val", 32)
    done, steps = [], []
    result = evaluate_pipeline(pipe, real, 3, sampler="euler", steps=3, guidance=2.0, metrics="swd", batch_size=2,
                               progress=done.append, callback=lambda info: steps.append(info["i"]))
    assert done == [2, 1] and steps == [0, 1, 2] * 2 and result["num_fake"] == 3
    with torch.no_grad():
        pipe.network.head.bias.fill_(3e38)
    with pytest.raises(EdifyError, match="non-finite values"):
        evaluate_pipeline(pipe, real, 2, sampler="euler", steps=3, guidance=2.0, metrics="swd", batch_size=2)
