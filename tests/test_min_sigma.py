"""min_sigma: a model trained only down to the noise level its sampling ends at. The loss draws no
sigma below it, the trainer may switch it on when a run resumes, the exported config records it,
and the pipeline refuses a schedule that ends below it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from _training_helpers import WordHashEncoder, tiny_config
from edify.core.laplacian import LaplacianProcess
from edify.core.losses import LaplacianEDMLoss
from edify.errors import EdifyError
from edify.training.export import export_pipeline
from edify.training.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_the_loss_draws_no_sigma_below_the_floor_and_keeps_the_log_normal_above_it():
    process = LaplacianProcess(3, (1.0, 5.0))
    plain, floored = LaplacianEDMLoss(process), LaplacianEDMLoss(process, min_sigma=0.3)
    g = torch.Generator().manual_seed(0)
    s = floored.sample_sigma(20000, 0, generator=g)
    assert float(s.min()) >= 0.3 and float(s.max()) <= 1.0
    # truncated log-normal(-1.2, 1.2) on [0.3, 1]: P(sigma < 0.4) = (Phi(z(0.4)) - Phi(z(0.3))) / (Phi(z(1)) - Phi(z(0.3)))
    def Phi(x):
        return 0.5 * (1 + math.erf((math.log(x) + 1.2) / 1.2 / math.sqrt(2)))
    expected = (Phi(0.4) - Phi(0.3)) / (Phi(1.0) - Phi(0.3))
    assert float((s < 0.4).float().mean()) == pytest.approx(expected, abs=0.015)
    # without the floor, most of the finest stage's draws lie below 0.4, where sampling never goes
    p = plain.sample_sigma(20000, 0, generator=torch.Generator().manual_seed(0))
    assert float((p < 0.4).float().mean()) == pytest.approx(Phi(0.4) / Phi(1.0), abs=0.015)
    for stage in (1, 2):  # ranges above the floor are unchanged
        a = plain.sample_sigma(64, stage, generator=torch.Generator().manual_seed(1))
        b = floored.sample_sigma(64, stage, generator=torch.Generator().manual_seed(1))
        assert torch.equal(a, b)
    with pytest.raises(EdifyError, match="stage 0 has no sigma to train"):
        LaplacianEDMLoss(process, min_sigma=1.5).sample_sigma(4, 0)
    for bad in (-0.1, math.inf, math.nan):
        with pytest.raises(EdifyError, match="min_sigma must be finite"):
            LaplacianEDMLoss(process, min_sigma=bad)


def test_switched_on_when_resuming_recorded_on_export_and_enforced_by_the_pipeline(tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_config(), run, text_encoder=WordHashEncoder()).run(max_steps=1)
    t = Trainer(tiny_config(min_sigma=0.5), run, resume=True, text_encoder=WordHashEncoder())
    assert t.state.step == 1 and t.loss_fn.min_sigma == 0.5
    t.run(max_steps=1)
    folder = export_pipeline(run, tmp_path / "model")
    saved = json.loads((folder / "config.json").read_text())
    assert saved["min_sigma"] == 0.5 and saved["defaults"]["sigma_min"] == 0.5  # the default end is raised

    from edify.pipelines.text2image import PipelineConfig, TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(folder, text_encoder=WordHashEncoder())
    assert pipe("a red disc", seed=0, num_steps=4, output_type="tensor").images.shape[0] == 1
    with pytest.raises(EdifyError, match="sigma_min must be >= 0.5, the lowest noise level"):
        pipe("a red disc", seed=0, num_steps=4, sigma_min=0.1)
    bad = dict(saved, min_sigma=0.9)  # a default end below the floor
    with pytest.raises(EdifyError, match="sigma_min 0.5 is below the model's min_sigma 0.9"):
        PipelineConfig.from_dict(bad)
    with pytest.raises(EdifyError, match="min_sigma must be >= 0"):
        tiny_config(min_sigma=-1.0)
