"""Stage experts of a model folder: add, replace or remove the separate network of some stages.

A model folder can carry expert networks for some of its Laplacian stages (docs/laplacian.md,
"Denoisers and experts"): `config.json`'s `stage_experts` lists the groups of stages, and each group's
network is a model folder of its own, `expert-<stages>`. An expert is trained like any model, on its
stages only (`edify train ... --set init_from=MODEL --set stages=0`); `set_expert` then puts it into
the model folder, from its exported model folder, its run (the latest checkpoint) or one checkpoint:

    set_expert("weights/emoji-64", (0,), "runs/e0")          # add or replace the 64 px expert
    set_expert("weights/emoji-64", (0,), None, remove=True)  # the main network serves stage 0 again

Only the expert's folder and (when the groups change) `config.json` are written; the main network's
files stay as they are, byte for byte. The expert's weights are written like the main network's
(each file staged and renamed into place; `config.json` last), in the dtype of the main network's
files unless told otherwise. The source must do the model's task with the same network: the same
Laplacian process, resolution, text encoder, styles and network config; it is refused in one line
otherwise. The run record of the source (`training.json`) goes with it into the expert's folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from edify.errors import EdifyError
from edify.networks.unet import UNetConfig
from edify.pipelines.model_io import CONFIG_NAME, _stage_text, fsync, model_folder, read_bytes, save_model
from edify.pipelines.text2image import (TextToImagePipeline, expert_folder, expert_groups, network_state)

RECORD_NAME = "training.json"  # a run's record, written by `edify train --export`


@dataclass(frozen=True)
class ExpertChange:
    """What `set_expert` did: the folder, the stages, and the groups of stages with experts after it."""

    folder: Path
    stages: tuple[int, ...]
    removed: bool
    groups: tuple[tuple[int, ...], ...]
    written_bytes: int

    def __str__(self) -> str:
        what = "removed" if self.removed else f"wrote {expert_folder(self.stages)} ({self.written_bytes / 2**20:.2f} MiB)"
        now = ", ".join(expert_folder(g) for g in self.groups) or "none"
        return f"{self.folder}: {what}; experts now: {now}"


def check_stages(stages, levels: int) -> tuple[int, ...]:
    """Distinct stage numbers in 0..levels-1 (0 = finest), sorted."""
    try:
        out = tuple(sorted(int(s) for s in stages))
    except (TypeError, ValueError):
        raise EdifyError(f"stages must be integers in 0..{levels - 1}, got {stages!r}") from None
    if not out or len(set(out)) != len(out) or not all(0 <= s < levels for s in out):
        raise EdifyError(f"stages must be distinct integers in 0..{levels - 1} (0 = finest), got {list(stages)}")
    return out


def set_expert(model: str | os.PathLike, stages, source: str | os.PathLike | None, *, remove: bool = False,
               out: str | os.PathLike | None = None, dtype: torch.dtype | None = None,
               max_shard_bytes: int = 16 * 2**20) -> ExpertChange:
    """Add or replace the expert of `stages` in the model folder `model` with the network of
    `source` (a model folder, a training run's latest checkpoint or one checkpoint: its EMA
    weights), or remove it (`remove=True`, `source` None). With `out`, a copy of `model` is changed
    instead (`out` must not exist yet). Everything is checked before anything is written."""
    folder = model_folder(model)
    if remove == (source is not None):
        raise EdifyError("give either a source for the expert or remove=True, not both or neither")
    if out is not None and Path(out).exists():
        raise EdifyError(f"{str(out)!r} already exists; give a new folder for the copy")
    pipe = TextToImagePipeline.from_pretrained(folder)
    stages = check_stages(stages, pipe.process.levels)
    groups = dict(expert_groups(pipe.experts))
    for group in groups:
        if group != stages and set(group) & set(stages):
            raise EdifyError(f"stage(s) {'/'.join(map(str, sorted(set(group) & set(stages))))} are served by the "
                             f"expert {expert_folder(group)}; remove it first (stages {','.join(map(str, group))})")
    if remove and stages not in groups:
        raise EdifyError(f"{str(folder)!r} has no expert for stage(s) {','.join(map(str, stages))} "
                         f"(experts: {', '.join(expert_folder(g) for g in groups) or 'none'})")
    with contextlib.ExitStack() as stack:
        expert = None if remove else checked_expert(pipe, stack.enter_context(exported(source)))
        if out is not None:
            shutil.copytree(folder, out, ignore=shutil.ignore_patterns(".*"))
            folder = Path(out)
        if remove:
            del groups[stages]
            _write_config(folder, pipe, tuple(groups))  # the folder stops being read before it goes
            shutil.rmtree(folder / expert_folder(stages))
            return ExpertChange(folder, stages, True, tuple(sorted(groups)), 0)
        sub = folder / expert_folder(stages)
        dtype = dtype or getattr(pipe, "weights_dtype", None) or torch.float32
        alone = dataclasses.replace(pipe.config, stage_experts=()).to_dict()
        written = save_model(sub, alone, network_state(expert.network, dtype), max_shard_bytes).nbytes
        record = Path(expert.source) / RECORD_NAME
        if record.is_file():
            os.replace(_stage_text(sub / RECORD_NAME, read_bytes(record).decode("utf-8")), sub / RECORD_NAME)
        else:
            (sub / RECORD_NAME).unlink(missing_ok=True)  # an earlier expert's record would not be this one's
        fsync(sub)
    groups[stages] = expert.network
    if tuple(sorted(groups)) != pipe.config.stage_experts:
        _write_config(folder, pipe, tuple(groups))
    return ExpertChange(folder, stages, False, tuple(sorted(groups)), written)


def checked_expert(pipe: TextToImagePipeline, source: Path) -> TextToImagePipeline:
    """The model folder `source` loaded, once it is checked to be an expert for `pipe`: one network
    of the same config, doing the same task (process, resolution, text encoder, styles)."""
    expert = TextToImagePipeline.from_pretrained(source)
    if expert.experts:
        raise EdifyError(f"{str(source)!r} has stage experts of its own; give a model folder of one network")
    pipe.partner_denoiser(expert, "the expert")
    if UNetConfig.from_dict(expert.config.network) != UNetConfig.from_dict(pipe.config.network):
        raise EdifyError(f"the network of {str(source)!r} has another config than the one of the model; "
                         f"an expert is trained from the model's own network (--set init_from=MODEL)")
    expert.source = source
    return expert


@contextlib.contextmanager
def exported(source: str | os.PathLike):
    """`source` as a model folder: a model folder as it is; a training run (its latest checkpoint)
    or one checkpoint exported to a temporary folder (the EMA weights, with the run's record)."""
    from edify.training.checkpoint import LATEST
    from edify.training.export import export_pipeline

    src = Path(source)
    if not (src / LATEST).is_file() and not (src / "state.json").is_file():  # a run, or a checkpoint
        yield src
        return

    with tempfile.TemporaryDirectory(prefix="edify-expert-") as tmp:
        yield export_pipeline(src, Path(tmp) / "model")


def _write_config(folder: Path, pipe: TextToImagePipeline, groups: tuple[tuple[int, ...], ...]) -> None:
    config = dataclasses.replace(pipe.config, stage_experts=tuple(sorted(groups)))
    tmp = _stage_text(folder / CONFIG_NAME, json.dumps(config.to_dict(), indent=2) + "\n")
    os.replace(tmp, folder / CONFIG_NAME)
    fsync(folder)
