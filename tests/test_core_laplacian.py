"""Bands, the forward process and the resolution switch (Edify Image Eq. 3-10)."""

import math

import pytest
import torch

from edify.core.laplacian import LaplacianProcess, down, merge, project_down, scale_bands, split, switch_up, up
from edify.errors import EdifyError

f64 = torch.float64


@pytest.mark.parametrize("levels,shape", [(1, (2, 3, 5, 7)), (2, (2, 3, 6, 10)), (3, (1, 2, 12, 8)),
                                          (4, (2, 1, 16, 24))])
def test_split_merge_exact_and_native_resolutions(levels, shape):
    x = torch.randn(shape, dtype=f64)
    bands = split(x, levels)
    assert len(bands) == levels
    for i, b in enumerate(bands):  # band i lives at R / 2^i
        assert b.shape[-2:] == (shape[-2] >> i, shape[-1] >> i)
    assert (merge(bands) - x).abs().max() < 1e-12
    # Eq. 3 written out: x = sum_i up^i(x_i)
    assert (sum(up(b, i) for i, b in enumerate(bands)) - x).abs().max() < 1e-12
    assert (bands[-1] - down(x, levels - 1)).abs().max() < 1e-14


def test_bands_are_orthogonal():
    x = torch.randn(4, 3, 16, 16, dtype=f64)
    full = [up(b, i) for i, b in enumerate(split(x, 4))]
    for i in range(4):
        for j in range(i + 1, 4):
            inner = (full[i] * full[j]).sum(dim=(1, 2, 3))
            assert inner.abs().max() < 1e-10, (i, j)
    # hence energies add up (Pythagoras)
    total = sum(f.square().sum() for f in full)
    assert torch.allclose(total, x.square().sum(), rtol=1e-12)


def test_down_up():
    x = torch.randn(2, 3, 4, 6, dtype=f64)
    assert torch.equal(down(up(x)), x)
    assert torch.equal(up(x)[..., ::2, 1::2], x)
    big = torch.arange(16.0).reshape(4, 4)
    assert torch.equal(down(big), torch.tensor([[2.5, 4.5], [10.5, 12.5]]))
    assert torch.allclose(down(big, 2), big.mean().reshape(1, 1))


def test_attenuation_ramp():
    for ramp in ("cosine", "linear"):
        p = LaplacianProcess(3, (1.0, 4.0), ramp=ramp, ramp_width=2.0)
        a = p.attenuation(torch.tensor([0.1, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 4.0, 100.0]))
        assert torch.equal(a[:, 2], torch.ones(9, dtype=f64))  # a_K = 1
        assert a[0, 0] == 1 and a[1, 0] == 1 and a[3, 0] == 0 and a[4, 0] == 0  # 1 below s*/2, 0 from s*
        assert 0 < a[2, 0] < 1
        assert a[5, 1] == 1 and 0 < a[6, 1] < 1 and a[7, 1] == 0 and a[8, 1] == 0
        assert (a[1:, :2] <= a[:-1, :2]).all()  # non-increasing in sigma
    # the midpoint of the ramp in log sigma: cosine and linear both give 1/2
    p = LaplacianProcess(2, (1.0,), ramp_width=4.0)
    assert p.attenuation(0.5)[0].item() == pytest.approx(0.5, abs=1e-15)
    lin = LaplacianProcess(2, (1.0,), ramp="linear", ramp_width=4.0)
    assert lin.attenuation(0.25 * 4 ** 0.25)[0].item() == pytest.approx(0.75, abs=1e-12)


def test_stage():
    p = LaplacianProcess(3, (1.0, 4.0))
    assert [p.stage(s) for s in (0.0, 0.5, 1.0, 2.0, 4.0, 80.0)] == [0, 0, 1, 1, 2, 2]


def test_forward_and_noisy_state():
    p = LaplacianProcess(3, (1.0, 4.0))
    x0, eps = torch.randn(3, 2, 16, 8, dtype=f64), torch.randn(3, 2, 16, 8, dtype=f64)
    sigma = torch.tensor([0.3, 1.4, 6.0], dtype=f64)
    x_t = p.forward(x0, sigma, eps)
    bands = [up(b, i) for i, b in enumerate(split(x0, 3))]
    for n in range(3):
        a = p.attenuation(sigma[n].item())
        expect = sum(a[i] * bands[i][n] for i in range(3)) + sigma[n] * eps[n]  # Eq. 4-5
        assert (x_t[n] - expect).abs().max() < 1e-12
    for stage in range(3):
        y = p.noisy_state(x0, sigma, eps, stage)
        assert (y - down(x_t, stage)).abs().max() < 1e-12
    # at stage j the per-pixel noise is sigma / 2^j: check with x0 = 0 over many pixels
    z = torch.randn(1, 1, 256, 256, generator=torch.Generator().manual_seed(0), dtype=f64)
    y = p.noisy_state(torch.zeros_like(z), 3.0, z, 2)
    assert y.std().item() == pytest.approx(3.0 / 4, rel=0.05)


def test_apply_A_per_stage_matches_scale_bands():
    p = LaplacianProcess(3, (1.0, 4.0))
    x = torch.randn(2, 1, 8, 8, dtype=f64)
    a = p.attenuation(2.0).tolist()
    assert torch.allclose(p.apply_A(x, 2.0, 1), merge([a[1] * b for b in split(x, 2)[:1]] + [split(x, 2)[1]]))
    assert torch.equal(scale_bands(x, [0.5, 0.5]), x * 0.5)


def test_switch_up_decomposition_exact():
    """x_up = up(down(signal)) + (2 s) eps' with eps' = up(n)/2 + (e - up(down(e))) (Eq. 6-10)."""
    g = torch.Generator().manual_seed(3)
    signal = torch.randn(2, 3, 8, 8, dtype=f64, generator=g)
    n = torch.randn(2, 3, 4, 4, dtype=f64, generator=g)
    s = 0.7
    y = down(signal) + s * n
    x_up, s_up = switch_up(y, s, torch.Generator().manual_seed(11))
    assert s_up == 2 * s
    e = torch.randn(2, 3, 8, 8, dtype=f64, generator=torch.Generator().manual_seed(11))  # same draw
    eps_prime = up(n) / 2 + (e - up(down(e)))
    assert (x_up - (up(down(signal)) + s_up * eps_prime)).abs().max() < 1e-13
    # the two parts of eps' are orthogonal and project_down undoes the switch exactly
    assert (down(e - up(down(e)))).abs().max() < 1e-15
    y_back, s_back = project_down(x_up, s_up)
    assert (y_back - y).abs().max() < 1e-13 and s_back == s


def test_switch_up_noise_is_white_with_variance_2sigma_squared():
    s, draws = 0.5, 20_000
    y = s * torch.randn(draws, 1, 2, 2, dtype=f64, generator=torch.Generator().manual_seed(0))
    x_up, s_up = switch_up(y, s, torch.Generator().manual_seed(1))
    v = x_up.reshape(draws, 16)
    C = v.T @ v / draws
    se = s_up**2 * math.sqrt(2 / draws)  # std of a sample variance; covariances have std s_up^2/sqrt(N)
    assert (C.diagonal() - s_up**2).abs().max() < 5 * se
    off = C - torch.diag(C.diagonal())
    assert off.abs().max() < 5 * s_up**2 / math.sqrt(draws)
    # without the added noise, pixels in a 2x2 block would be perfectly correlated: the test can fail
    assert (up(y).reshape(draws, 16).T @ up(y).reshape(draws, 16) / draws)[0, 1] > 0.2


def test_switch_and_forward_commute_at_switch_sigma():
    """At sigma >= s_1*, switching the stage-1 state up gives a valid stage-0 state (Eq. 10)."""
    p = LaplacianProcess(2, (1.0,))
    x0 = torch.randn(1, 1, 8, 8, dtype=f64)
    sigma = 1.0
    assert p.attenuation(sigma)[0] == 0
    y = p.noisy_state(x0, sigma, torch.zeros_like(x0), 1)  # signal part only
    x_up = p.up_stage(y, sigma, 1, torch.Generator().manual_seed(0))
    noise = x_up - p.apply_A(x0, sigma, 0)
    assert (down(noise)).abs().max() < 1e-12  # all of the signal is in place: noise only in band 1


@pytest.mark.parametrize("bad", [
    lambda: split(torch.zeros(1, 1, 6, 8), 3),
    lambda: split(torch.zeros(1, 1, 8, 8), 0),
    lambda: down(torch.zeros(1, 1, 5, 4)),
    lambda: merge([torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 3, 4)]),
    lambda: switch_up(torch.zeros(1, 1, 4, 4), 0.0),
    lambda: switch_up(torch.zeros(1, 1, 4, 4), -1.0),
    lambda: project_down(torch.zeros(1, 1, 4, 4), 0.0),
    lambda: LaplacianProcess(0, ()),
    lambda: LaplacianProcess(3, (4.0, 1.0)),
    lambda: LaplacianProcess(3, (1.0,)),
    lambda: LaplacianProcess(2, (1.0,), ramp_width=1.0),
    lambda: LaplacianProcess(2, (1.0,), ramp="step"),
    lambda: LaplacianProcess(2, (1.0,)).forward(torch.zeros(1, 1, 4, 4), 0.0, torch.zeros(1, 1, 4, 4)),
    lambda: LaplacianProcess(2, (1.0,)).noisy_state(torch.zeros(1, 1, 4, 4), 1.0, torch.zeros(1, 1, 4, 4), 2),
    lambda: LaplacianProcess(2, (1.0,)).up_stage(torch.zeros(1, 1, 4, 4), 1.0, 0),
])
def test_bad_input_raises(bad):
    with pytest.raises(EdifyError):
        bad()


def test_error_message_names_value():
    with pytest.raises(EdifyError, match="multiples of 4, got 6x8"):
        split(torch.zeros(1, 1, 6, 8), 3)
