"""Control signals (section 5): annotators, inpainting masks and hints, paste-back, edge F1."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from edify.data import controls as C
from edify.data.annotators import DepthEstimator, HEDConfig, HEDNet, load_hed, save_hed
from edify.data.masks import MAX_INPAINT, OUTPAINT_KEEP, feather_weights, inpaint_mask, outpaint_mask, replace_mask
from edify.errors import EdifyError


def square_image(size=64, lo=16, hi=48, color=(1.0, -1.0, -1.0)):
    """A white image with a filled red square on [lo, hi) x [lo, hi)."""
    x = torch.ones(1, 3, size, size)
    x[0, :, lo:hi, lo:hi] = torch.tensor(color)[:, None, None]
    return x


def ring(size=64, lo=16, hi=48):
    """Distance masks around the square's border: on-border band, interior, exterior."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    inside = (ys >= lo) & (ys < hi) & (xs >= lo) & (xs < hi)
    dist = torch.minimum(torch.minimum(ys - lo + 0.5, hi - 0.5 - ys), torch.minimum(xs - lo + 0.5, hi - 0.5 - xs)).abs()
    border_y = torch.minimum((ys - lo + 0.5).abs(), (ys - hi + 0.5).abs())
    border_x = torch.minimum((xs - lo + 0.5).abs(), (xs - hi + 0.5).abs())
    near = ((border_y <= 1.5) & (xs >= lo - 2) & (xs < hi + 2)) | ((border_x <= 1.5) & (ys >= lo - 2) & (ys < hi + 2))
    return near, inside & (dist > 3), ~inside & ~near


# ---- Canny and soft edges --------------------------------------------------------------------

def test_canny_square_edges_on_border_only():
    e = C.canny_edges(square_image())
    assert e.shape == (1, 1, 64, 64) and set(e.unique().tolist()) <= {-1.0, 1.0}
    near, interior, exterior = ring()
    on = e[0, 0] > 0
    assert not on[interior].any() and not on[exterior].any()
    # a closed outline: every row and column crossing the square meets an edge on each of its sides
    span = slice(18, 46)
    for side in (on[span, 14:18], on[span, 46:50], on[14:18, span].T, on[46:50, span].T):
        assert side.any(dim=1).all()


def test_canny_sees_edges_between_equal_brightness_colours():
    x = torch.full((1, 3, 32, 32), -1.0)
    x[0, 0] = 0.2  # red field ...
    x[0, :, 8:24, 8:24] = torch.tensor([-1.0, -0.22, -1.0])[:, None, None]  # ... green square, similar luma
    assert (C.canny_edges(x) > 0).sum() > 40


def test_canny_rejects_bad_thresholds_and_images():
    with pytest.raises(EdifyError, match="low <= high"):
        C.canny_edges(square_image(), 200, 100)
    with pytest.raises(EdifyError, match=r"\[B, 3, H, W\]"):
        C.canny_edges(torch.zeros(1, 1, 8, 8))


def test_soft_edges_high_on_edges_low_in_flat_areas():
    s = C.soft_edges(square_image())
    assert s.shape == (1, 1, 64, 64) and s.min() >= -1 and s.max() == 1
    near, interior, exterior = ring()
    assert s[0, 0][near].mean() > 0.3
    assert s[0, 0][interior & ring(lo=22, hi=42)[1]].max() < -0.95  # flat, far from the border
    assert (C.soft_edges(torch.zeros(2, 3, 16, 16)) == -1).all()


def test_soft_edges_faint_noise_is_not_stretched_to_full_edges():
    g = torch.Generator().manual_seed(0)
    x = 0.002 * torch.randn(1, 3, 32, 32, generator=g)
    assert C.soft_edges(x).max() < -0.5


# ---- HED-style network -----------------------------------------------------------------------

TINY_HED = HEDConfig(channels=(4, 8), convs=(1, 1))


def tiny_hed(tmp_path, config=TINY_HED):
    torch.manual_seed(0)
    net = HEDNet(config)
    net.pixel_mean.copy_(torch.tensor([120.0, 115.0, 105.0]))
    return net, save_hed(net, tmp_path / "hed")


@pytest.mark.parametrize("fuse", ["conv", "mean"])
def test_hed_round_trips_through_a_folder(tmp_path, fuse):
    net, folder = tiny_hed(tmp_path, HEDConfig((4, 8), (1, 1), fuse))
    loaded = C.load_annotator("softedge", folder)
    x = torch.rand(2, 3, 20, 18) * 2 - 1  # odd sizes: the side outputs are upsampled to the input
    out = loaded(x)
    assert out.shape == (2, 1, 20, 18) and out.min() >= -1 and out.max() <= 1
    assert torch.equal(out, net(x))
    control, _ = C.make_control("softedge", x, annotator=loaded)
    assert torch.equal(control, out)


def test_hed_folder_errors_name_the_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(EdifyError, match="does not exist.*nowhere"):
        load_hed(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdifyError, match="empty.*no config.json"):
        load_hed(tmp_path / "empty")
    _, folder = tiny_hed(tmp_path)
    (folder / "config.json").write_text(json.dumps({"model_type": "dpt"}))
    with pytest.raises(EdifyError, match="holds a 'dpt' model"):
        load_hed(folder)
    _, folder = tiny_hed(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "channels": [4, 16]}))
    with pytest.raises(EdifyError, match="do not match its config.json") as err:
        load_hed(folder)
    assert "\n" not in str(err.value)
    (folder / "model.safetensors").unlink()
    with pytest.raises(EdifyError, match="no model.safetensors"):
        load_hed(folder)


# ---- depth -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_depth(tmp_path_factory):
    """A random 16-wide DPT with its image processor config, saved as safetensors."""
    from transformers import DPTConfig, DPTForDepthEstimation
    config = DPTConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                       image_size=32, patch_size=8, backbone_out_indices=[0, 1, 2, 3],
                       neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5])
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("dpt")
    DPTForDepthEstimation(config).save_pretrained(folder, safe_serialization=True)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "DPTImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
        "keep_aspect_ratio": False, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    return folder


def test_depth_estimator_gives_normalised_maps(tiny_depth):
    est = C.load_annotator("depth", tiny_depth)
    assert est.near_is_large  # DPT predicts inverse depth
    x = torch.rand(2, 3, 48, 40) * 2 - 1
    d = est(x)
    assert d.shape == (2, 1, 48, 40)
    assert torch.allclose(d.amin(dim=(1, 2, 3)), torch.tensor(-1.0))
    assert torch.allclose(d.amax(dim=(1, 2, 3)), torch.tensor(1.0))
    flipped = DepthEstimator(tiny_depth, near_is_large=False)(x)
    assert torch.allclose(flipped, -d, atol=1e-5)
    control, target = C.make_control("depth", x, annotator=est)
    assert torch.equal(control, d) and target is x


def test_depth_folder_errors(tmp_path, tiny_depth):
    with pytest.raises(EdifyError, match="depth model folder does not exist"):
        DepthEstimator(tmp_path / "nope")
    _, hed = tiny_hed(tmp_path)
    with pytest.raises(EdifyError, match="holds a 'edify-hed' model, not a depth estimator"):
        DepthEstimator(hed)
    unsafe = tmp_path / "no-safetensors"
    unsafe.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (unsafe / name).write_bytes((tiny_depth / name).read_bytes())
    with pytest.raises(EdifyError, match="no-safetensors' has no .safetensors weights") as err:
        DepthEstimator(unsafe)
    assert "\n" not in str(err.value)
    with pytest.raises(EdifyError, match="needs a depth estimator"):
        C.make_control("depth", square_image())
    with pytest.raises(EdifyError, match="no network annotator"):
        C.load_annotator("canny", tiny_depth)


def test_user_depth_map_is_normalised_and_size_checked():
    ramp = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))  # white (near) on the right
    d = C.depth_from_image(Image.fromarray(ramp), (16, 16))
    assert d.shape == (1, 1, 16, 16) and d[0, 0, 0, 0] == -1 and d[0, 0, 0, -1] == 1
    assert torch.allclose(C.depth_from_image(ramp, (16, 16), near_is_white=False), -d, atol=1e-6)
    with pytest.raises(EdifyError, match="depth map is 16x16 but the image is 32x32; pass resize=True"):
        C.control_from_image("depth", torch.from_numpy(ramp), (32, 32))
    assert C.control_from_image("depth", torch.from_numpy(ramp), (32, 32), resize=True).shape == (1, 1, 32, 32)


def test_user_edge_maps():
    m = torch.zeros(1, 1, 8, 8)
    m[..., 3, :] = 1.0
    e = C.control_from_image("canny", m, (8, 8))
    assert torch.equal(e, m * 2 - 1)
    assert torch.equal(C.control_from_image("softedge", m * 0.5, (8, 8)), m - 1)
    with pytest.raises(EdifyError, match="canny map is 8x8 but the image is 16x16"):
        C.control_from_image("canny", m, (16, 16))
    with pytest.raises(EdifyError, match="prepare_inpaint"):
        C.control_from_image("inpaint", m, (8, 8))


# ---- inpainting masks ------------------------------------------------------------------------

def test_inpaint_masks_cover_a_documented_share():
    g = torch.Generator().manual_seed(0)
    cover = torch.stack([inpaint_mask(64, 64, g).mean() for _ in range(40)])
    assert (cover > 0).all() and (cover <= MAX_INPAINT).all()
    assert 0.05 < cover.mean() < 0.5


def test_outpaint_masks_keep_a_box_or_a_half():
    g = torch.Generator().manual_seed(1)
    cover = torch.stack([outpaint_mask(64, 64, g).mean() for _ in range(40)])
    halves = cover == 0.5
    lo, hi = 1 - OUTPAINT_KEEP[1] ** 2 - 0.01, 1 - OUTPAINT_KEEP[0] ** 2 + 0.01
    assert halves.any() and (~halves).any()
    assert ((cover[~halves] >= lo) & (cover[~halves] <= hi)).all()


def test_outpaint_half_keeps_a_whole_side():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        m = outpaint_mask(16, 16, g)
        if m.mean() == 0.5:
            kept = m == 0
            rows, cols = kept.any(1), kept.any(0)
            assert rows.all() or cols.all()  # a full-width or full-height half


def test_replace_mask_is_the_object_grown():
    alpha = torch.zeros(64, 64)
    alpha[20:40, 24:44] = 1.0
    m = replace_mask(alpha)  # default growth: 64 / 32 = 2 px
    assert m[20:40, 24:44].all() and m.sum() == 24 * 24
    assert m[17, 30] == 0 and m[18, 30] == 1


def test_training_masks_are_reproducible_and_use_every_task():
    alphas = torch.zeros(24, 1, 32, 32)
    alphas[:, :, 8:24, 8:24] = 1
    a = C.training_masks(24, 32, 32, alphas, torch.Generator().manual_seed(3))
    b = C.training_masks(24, 32, 32, alphas, torch.Generator().manual_seed(3))
    c = C.training_masks(24, 32, 32, alphas, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    assert set(a[1].tolist()) == {0, 1, 2}
    replace = a[1] == C.TASKS.index("replace")
    assert torch.equal(a[0][replace], replace_mask(alphas[0, 0])[None, None].expand(int(replace.sum()), 1, 32, 32))


def test_per_sample_generators_make_masks_independent_of_the_batch():
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    big, big_tasks = C.training_masks(3, 24, 24, None, gens([5, 6, 7]))
    one, one_tasks = C.training_masks(1, 24, 24, None, gens([6]))
    assert torch.equal(big[1:2], one) and big_tasks[1] == one_tasks[0]
    with pytest.raises(EdifyError, match="one generator per sample: batch 2, got 3"):
        C.training_masks(2, 24, 24, None, gens([1, 2, 3]))


def test_replace_needs_a_usable_object_mask():
    _, tasks = C.training_masks(16, 32, 32, None, torch.Generator().manual_seed(0))
    assert C.TASKS.index("replace") not in tasks.tolist()
    empty = torch.zeros(16, 1, 32, 32)  # no object: fall back to an inpaint mask
    masks, tasks = C.training_masks(16, 32, 32, empty, torch.Generator().manual_seed(0), tasks=("replace",))
    assert (tasks == C.TASKS.index("inpaint")).all() and (masks.mean(dim=(1, 2, 3)) > 0).all()


def test_inpaint_control_layout():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 32, 32, generator=g) * 2 - 1
    alphas = (torch.rand(6, 1, 32, 32, generator=g) > 0.3).float()
    control, target = C.make_control("inpaint", x, alphas, torch.Generator().manual_seed(7))
    assert control.shape == (6, C.control_channels("inpaint"), 32, 32) == (6, 7, 32, 32) and target is x
    masked, mask, onehot = control[:, :3], control[:, 3:4], control[:, 4:]
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(masked, torch.where(mask > 0, torch.full_like(x, C.MASK_FILL), x))
    _, tasks = C.training_masks(6, 32, 32, alphas, torch.Generator().manual_seed(7))
    assert torch.equal(onehot, torch.nn.functional.one_hot(tasks, 3).float()[:, :, None, None].expand(-1, -1, 32, 32))


# ---- inference inputs ------------------------------------------------------------------------

def test_prepare_inpaint_from_a_user_mask():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mask = torch.zeros(16, 16)
    mask[4:8, 4:8] = 0.9
    control, m = C.prepare_inpaint(x, mask, "outpaint")
    assert m.shape == (2, 1, 16, 16) and m.sum() == 2 * 16
    assert (control[:, 4:] == torch.tensor([0.0, 0.0, 1.0])[None, :, None, None]).all()
    with pytest.raises(EdifyError, match="mask is empty"):
        C.prepare_inpaint(x, torch.zeros(16, 16), "inpaint")
    with pytest.raises(EdifyError, match="mask is full"):
        C.prepare_inpaint(x, torch.ones(1, 1, 16, 16), "inpaint")
    with pytest.raises(EdifyError, match="mask is 8x8 but the image is 16x16; pass resize=True"):
        C.prepare_inpaint(x, mask[::2, ::2], "inpaint")
    _, m8 = C.prepare_inpaint(x, mask[::2, ::2], "inpaint", resize=True)
    assert torch.equal(m8, m)
    with pytest.raises(EdifyError, match="unknown inpainting task 'erase'; known tasks: replace, inpaint, outpaint"):
        C.prepare_inpaint(x, mask, "erase")


def test_outpaint_canvas_from_padding():
    x = torch.rand(1, 3, 8, 10) * 2 - 1
    canvas, mask = C.outpaint_canvas(x, (1, 2, 3, 4))
    assert canvas.shape == (1, 3, 14, 14) and mask.shape == (1, 1, 14, 14)
    assert torch.equal(canvas[:, :, 2:10, 1:11], x) and (mask[:, :, 2:10, 1:11] == 0).all()
    assert mask.sum() == 14 * 14 - 80 and (canvas[mask.expand_as(canvas) > 0] == C.MASK_FILL).all()
    control, _ = C.prepare_inpaint(canvas, mask, "outpaint")
    assert control.shape == (1, 7, 14, 14)
    with pytest.raises(EdifyError, match="nothing to generate"):
        C.outpaint_canvas(x, (0, 0, 0, 0))
    with pytest.raises(EdifyError, match="four integers >= 0"):
        C.outpaint_canvas(x, (1, -1, 0, 0))


def test_paste_known_keeps_known_pixels_exactly_and_feathers_inside():
    g = torch.Generator().manual_seed(0)
    image = (torch.randint(0, 256, (2, 3, 32, 32), generator=g).float() / 127.5 - 1)
    generated = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:24, 8:24] = 1
    out = C.paste_known(generated, image, mask, feather_px=3)
    known = mask.expand_as(image) == 0
    assert ((out - image)[known].abs() * 127.5 < 0.5).all()  # equal to 1/255 (in fact exactly)
    assert torch.equal(out[known], image[known])
    assert torch.equal(out[:, :, 12:20, 12:20], generated[:, :, 12:20, 12:20])  # 4+ px from the seam
    w = feather_weights(mask, 3)
    assert torch.allclose(w[0, 0, 8, 8:24][2:-2], torch.tensor(0.25)) and w[0, 0, 10, 12] == 0.75
    band = out[:, :, 8, 12]  # 1 px inside the seam: a quarter generated
    assert torch.allclose(band, 0.25 * generated[:, :, 8, 12] + 0.75 * image[:, :, 8, 12])
    hard = C.paste_known(generated, image, mask, feather_px=0)
    assert torch.equal(hard, torch.where(mask > 0, generated, image))


# ---- the entry point -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["canny", "softedge", "inpaint"])
def test_make_control_shapes(kind):
    x = square_image(32, 8, 24).repeat(3, 1, 1, 1)
    control, target = C.make_control(kind, x, None, torch.Generator().manual_seed(0))
    assert control.shape == (3, C.control_channels(kind), 32, 32) and control.dtype == x.dtype
    assert target is x and control.min() >= -1 and control.max() <= 1


def test_make_control_bad_input():
    x = square_image(32, 8, 24)
    with pytest.raises(EdifyError, match="unknown control 'sketch'; known controls: canny, softedge, depth, inpaint"):
        C.make_control("sketch", x)
    with pytest.raises(EdifyError, match="unknown control"):
        C.control_channels("sketch")
    with pytest.raises(EdifyError, match="mask is 16x16 but the image is 32x32"):
        C.make_control("inpaint", x, torch.ones(1, 1, 16, 16))
    control, _ = C.make_control("inpaint", x, torch.ones(1, 1, 16, 16), torch.Generator(), resize=True)
    assert control.shape == (1, 7, 32, 32)
    with pytest.raises(EdifyError, match="annotator returned"):
        C.make_control("softedge", x, annotator=lambda im: im)


# ---- edge F1 ---------------------------------------------------------------------------------

def line_map(col, size=16):
    e = -torch.ones(1, 1, size, size)
    e[..., 2:14, col] = 1
    return e


def test_edge_f1_closed_forms():
    a = line_map(5)
    assert C.edge_f1(a, a, 1).item() == 1
    assert C.edge_f1(a, line_map(12), 2).item() == 0  # 7 px apart
    assert C.edge_f1(a, line_map(6), 1).item() == 1  # a 1 px shift, within tolerance
    assert C.edge_f1(a, line_map(6), 0).item() == 0
    both = torch.maximum(a, line_map(12))  # half the predicted pixels are spurious
    s = C.edge_scores(both, a, 1)
    assert s.precision.item() == 0.5 and s.recall.item() == 1 and abs(s.f1.item() - 2 / 3) < 1e-12
    empty = -torch.ones(1, 1, 16, 16)
    assert C.edge_f1(empty, empty).item() == 1 and C.edge_f1(empty, a).item() == 0


def test_edge_f1_of_canny_against_itself_under_noise():
    x = square_image()
    ref = C.canny_edges(x)
    noisy = C.canny_edges((x + 0.02 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1))
    assert C.edge_f1(noisy, ref, 1).item() > 0.9
