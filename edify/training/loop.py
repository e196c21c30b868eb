"""The training loop of a Laplacian diffusion model (Edify Image section 2.2, EDM training).

Each optimizer step trains one resolution stage of the mixture of experts (section 2.2.2; picked
by seed and step, the same on every rank) on `batch_size` images over all ranks and
`grad_accum` micro-steps:

    x0, captions, styles  <- this rank's next micro-batch (a resumable stream)
    cond                  <- text tokens + media token, fields dropped at random (section 3.1, CFG)
    loss                  <- LaplacianEDMLoss: sigma ~ log-normal on the stage's range, D at R / 2^j (Eq. 1)
    AdamW step (linear warm-up, optional inverse-sqrt decay, gradient clipping), then the EMA update.

All randomness of a step comes from generators seeded by (seed, step, rank, micro-step), and the
data stream reports its position, so a resumed run reproduces an uninterrupted one bit for bit.
A non-finite loss or gradient norm skips the update; `max_nonfinite` in a row stop the run.
With `max_minutes`, the run also stops (and checkpoints) once that much wall-clock time has passed
since the trainer started, so a fixed-length job (e.g. one 10-minute accelerator call) always ends
with a checkpoint; `--resume` continues it. `max_cpu_minutes` does the same on the CPU time of the
process (all threads) since `run` began: a budget that other load on the machine does not shrink.
SIGTERM (a scheduler's preemption, `kill`) and SIGINT (Ctrl-C) stop the run the same way: the step
under way finishes, the run checkpoints, records itself and returns (stop "signal"); a second
Ctrl-C interrupts at once. Under torchrun the ranks agree on every such stop (one all-reduce per
step), so they stop at the same step and checkpoint together. Each `run` appends one line to
`runs.jsonl` in the run folder (command, device, GPU name, images, wall, training and CPU
seconds), which the model card reads.
"""

from __future__ import annotations

import json
import math
import platform
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from edify import runtime
from edify.conditioning import Cond, random_drop
from edify.core.laplacian import LaplacianProcess
from edify.core.losses import LaplacianEDMLoss
from edify.core.precond import EDMPrecond
from edify.data.vocab import StyleVocab, make_cond
from edify.errors import EdifyError
from edify.networks.unet import growth_refusal, zero_new_attention_outputs
from edify.pipelines.text2image import TextToImagePipeline
from edify.training import checkpoint, distributed, monitor
from edify.training.batches import Batch, open_stream
from edify.training.checkpoint import TrainState
from edify.training.config import TrainConfig
from edify.training.ema import EMA
from edify.training.export import build_net, init_snapshot, pipeline_config, write_init_snapshot


class StopSignals:
    """While active, SIGTERM and SIGINT set `received` (the signal's name) instead of ending the
    process, so that the loop can stop at a step boundary with a checkpoint. Installed only from the
    main thread; a signal the process ignores (SIGINT in a background job) stays ignored; a second
    SIGINT raises KeyboardInterrupt at once. The previous handlers come back on exit."""

    def __init__(self):
        self.received: str | None = None
        self.previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name  # no I/O here: the handler may interrupt a print

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def step_seed(*parts: int) -> int:
    """A 63-bit seed mixing integers (splitmix64 finaliser), distinct per (seed, step, rank, micro)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return h >> 1


def wall_clock() -> float:
    """Seconds on a monotonic clock (the `max_minutes` budget; tests replace it)."""
    return time.monotonic()


def cpu_clock() -> float:
    """CPU seconds of this process, all threads (the `max_cpu_minutes` budget; tests replace it)."""
    return time.process_time()


def device_name(device: torch.device) -> str:
    """The accelerator's name (torch.cuda.get_device_name), else the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def load_text_encoder(spec: str, cache_dir: Path | None, device):
    """The frozen text encoder of a config (None for "none"), behind an embedding cache."""
    if spec == "none":
        return None
    from edify.text.encoders import load_text_encoder as load

    encoder = load(spec, device=device)
    if cache_dir is not None:
        from edify.text.cache import CachedTextEncoder

        encoder = CachedTextEncoder(encoder, cache_dir, memory_items=4096)
    return encoder


@dataclass
class TrainResult:
    """What a call to `Trainer.run` did: one loss per optimizer step (mean over ranks), in order."""

    losses: list[float] = field(default_factory=list)
    step: int = 0
    images: int = 0
    nonfinite_total: int = 0
    checkpoint: Path | None = None
    stop: str = ""  # "total_images", "max_steps", "max_minutes", "max_cpu_minutes" or "signal"


class Trainer:
    """Builds everything a run needs from a TrainConfig; `run()` trains to `total_images`.

    stream / text_encoder: optional replacements for the ones the config names (tests inject a
    synthetic stream or a small encoder). With resume=True the latest checkpoint in `out_dir`
    is loaded (a missing one means a fresh start). `command`: the command line that started the
    run, recorded in runs.jsonl for the model card.
    """

    def __init__(self, config: TrainConfig, out_dir: str | Path, *, resume: bool = False,
                 stream=None, text_encoder=None, device: torch.device | None = None,
                 command: str | None = None):
        self.started = wall_clock()  # the max_minutes budget counts data loading and compilation too
        self.command = command
        c = self.config = config
        self.out_dir = Path(out_dir)
        self.device = device or distributed.init_from_env()
        self.rank, self.world = distributed.rank(), distributed.world_size()
        distributed.check_mode(c.dist)
        if self.world > 1 and c.dist == "none":  # ranks would train unsynchronised copies
            raise EdifyError(f"{self.world} processes need dist='ddp' or 'fsdp' (--set dist=ddp), got 'none'")
        per_rank = c.batch_size // c.grad_accum
        if per_rank % self.world:
            raise EdifyError(f"batch_size / grad_accum must be a multiple of the world size {self.world}, "
                             f"got {c.batch_size} / {c.grad_accum}")
        self.micro_batch = per_rank // self.world

        torch.manual_seed(c.seed)  # the same initial weights on every rank
        self.net = build_net(c)
        self.process = LaplacianProcess(c.levels, c.switch_sigmas)
        self.stages = c.stages or trained_stages(c)
        net_cfg = self.net.config
        if net_cfg.num_stages < c.levels:
            raise EdifyError(f"the network embeds {net_cfg.num_stages} stages, the config trains levels={c.levels}")
        if len(c.styles) > net_cfg.num_media_types:
            raise EdifyError(f"the network has {net_cfg.num_media_types} media types, got {len(c.styles)} styles")
        multiple = net_cfg.size_multiple * 2 ** (c.levels - 1)  # the coarsest stage must fit the U-Net
        if c.resolution % multiple:
            raise EdifyError(f"resolution must be a multiple of {multiple} for this network and "
                             f"{c.levels} levels, got {c.resolution}")
        self.vocab = StyleVocab(c.styles) if c.styles else None
        cache = self.out_dir / "text-cache" if c.text_cache else None
        if text_encoder is None and c.text_table:
            if c.text_encoder == "none":
                raise EdifyError(f"text_table needs a text_encoder, got 'none' with {c.text_table!r}")
            from edify.training.memory_data import TableTextEncoder, TextTable

            text_encoder = TableTextEncoder(TextTable.load(c.text_table), self.device)
        self.text_encoder = text_encoder if text_encoder is not None else load_text_encoder(
            c.text_encoder, cache, self.device)
        if stream is None and c.data_in_memory:
            from edify.training.memory_data import open_memory_stream

            stream = open_memory_stream(c.data, c.resolution, multiple, self.micro_batch, c.seed, c.num_workers,
                                        c.weight_key, self.rank, self.world, self.text_encoder, self.vocab,
                                        self.device, log=distributed.print0, masks=c.data_masks)
        self.stream = stream if stream is not None else open_stream(
            c.data, c.resolution, multiple, self.micro_batch, c.seed, c.num_workers, c.weight_key,
            self.rank, self.world, masks=c.data_masks)
        if c.crop:  # random windows, aligned to the coarsest stage's Haar grid (edify.training.crops)
            from edify.training.crops import CropStream

            if c.crop % multiple:
                raise EdifyError(f"crop must be a multiple of {multiple} for this network and {c.levels} levels, "
                                 f"got {c.crop}")
            self.stream = CropStream(self.stream, c.crop, 4 * 2 ** (c.levels - 1), c.seed, self.rank)

        # bf16 autocast on CUDA, and on CPUs too (fast where they have bf16 dot products: AVX512-BF16, AMX).
        dtype = torch.bfloat16 if c.precision == "bf16" else torch.float32
        if dtype == torch.bfloat16 and self.device.type == "cpu" and distributed.is_main():
            warning = runtime.bf16_cpu_warning(runtime.bf16_matmul_slowdown())
            if warning:
                print(warning, file=sys.stderr, flush=True)
        self.net.to(self.device)
        self.flops_per_image = self._count_flops(dtype) if c.peak_tflops > 0 else {}
        self.model = distributed.wrap_model(self.net, c.dist, self.device)
        # One static graph per stage resolution (and bucket shape); no dynamic-shape kernels.
        forward = torch.compile(self.model, dynamic=False) if c.compile else self.model
        self.denoiser = EDMPrecond(forward, c.sigma_data, dtype)
        self.network_dtype = dtype
        self.loss_fn = LaplacianEDMLoss(self.process, c.P_mean, c.P_std, c.sigma_data, c.expert_ranges,
                                        c.max_sigma or math.inf, c.min_sigma, c.fine_band_weight)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=c.lr, betas=tuple(c.betas),
                                           weight_decay=c.weight_decay)
        ema_on = c.ema_std == 0 and c.ema_decay == 0
        self.ema = EMA(self.model, c.ema_halflife_images if ema_on else 0.0, c.ema_rampup, c.ema_decay, c.ema_std)
        self.state = TrainState()
        self.consecutive_nonfinite = 0
        self.loss_stats = monitor.LossStats()
        self.grad_norm, self.last_stage = float("nan"), self.stages[0]
        self.init_snapshot: dict | None = None  # the model folder a warm start read (export.init_snapshot)
        loaded = checkpoint.load_latest(self.out_dir, c, self.model, self.optimizer, self.ema) if resume else None
        if loaded is None and c.init_from:
            self.warm_start(c.init_from)
        if loaded is not None:
            self.state = loaded
            self.stream.load_state_dict(loaded.data)
            distributed.print0(f"resumed from {checkpoint.latest_checkpoint(self.out_dir)} at {loaded.images} images")

    def warm_start(self, folder: str) -> None:
        """Network and EMA from the weights of an exported model folder (the optimizer state, the data
        position and the image count start afresh).

        The saved network must be this run's, or one this run's network grows: every saved tensor
        has a tensor of the same name and shape here (e.g. attention added at another level, or the
        pooled condition path). Each added attention block's output projection starts at zero (the
        block is then the identity) and the pooled map is zero at init, so the grown network starts
        computing what the saved one did."""
        from edify.pipelines.model_io import inside, model_folder, read_json, scan_weights

        path = model_folder(folder)
        saved = read_json(inside(path, "config.json", "model folder")).get("network")
        try:
            saved_config = type(self.net.config).from_dict(saved)
        except EdifyError as e:
            raise EdifyError(f"init_from {folder!r}: {e}") from None
        refusal = growth_refusal(saved_config, self.net.config)
        if refusal:
            raise EdifyError(f"init_from {folder!r} holds a network of another config than this run's, {refusal}")
        old = type(self.net)(saved_config)
        scan_weights(path).load_into(old)
        full = type(self.net)(self.net.config)  # a full copy: the wrapped model may be sharded
        state, saved_state = full.state_dict(), old.state_dict()
        added = [k for k in state if k not in saved_state]
        zero_new_attention_outputs(full, state, added)
        state.update(saved_state)
        self.load_start_weights(state)
        self.init_snapshot = init_snapshot(folder)  # written into the run folder at its first checkpoint
        grown = (f", grown by {len(added)} tensors ({sum(state[k].numel() for k in added):,} values) whose "
                 f"outputs start at zero" if added else "")
        distributed.print0(f"warm start: network and EMA from {path}{grown}")

    def load_start_weights(self, weights: dict) -> None:
        """Copy a full state dict of `self.net` into the (possibly sharded) model and the EMA."""
        module = distributed.unwrap(self.model)
        state = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.copy_(distributed.shard_like(state[name].to(p.device), p))
            for name, b in module.named_buffers():
                if name in state:
                    b.copy_(state[name].to(b.device))
        self.ema.load_state_dict(state)

    # ---- pieces of a step ----------------------------------------------------------------------

    def stage_for(self, step: int) -> int:
        """The stage trained at `step`: round robin, or drawn by stage_weights (same on all ranks)."""
        if self.config.stage_sampling == "round_robin":
            return self.stages[step % len(self.stages)]
        w = torch.tensor(self.config.stage_weights or [1.0] * len(self.stages), dtype=torch.float64)
        g = torch.Generator().manual_seed(step_seed(self.config.seed, step, 0xA5))
        return self.stages[int(torch.multinomial(w, 1, generator=g))]

    def set_dropout(self, stage: int) -> None:
        """The residual blocks' dropout for `stage` (config.stage_dropout; a no-op when it is empty).
        Its draws come from the global generator, whose state every checkpoint keeps."""
        if self.config.stage_dropout:
            p = float(self.config.stage_dropout[self.stages.index(stage)])
            for m in self.net.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = p

    def make_cond(self, captions: list[str], styles: list[str | None]) -> Cond:
        media = self.vocab.indices(styles) if self.vocab is not None else None
        if self.text_encoder is None:
            return Cond(media=media).to(self.device)
        return make_cond(self.text_encoder, captions, styles if self.vocab is not None else None,
                         self.vocab, device=self.device)

    def lr_at(self, images: int) -> float:
        """Linear warm-up over warmup_images; then constant, or lr / sqrt(images / lr_decay_images)
        once past lr_decay_images (the inverse square-root schedule of edm2, Karras et al. 2024);
        times a linear cool-down to 0 over the last cooldown_images before total_images (the
        warmup-stable-decay schedule, Hägele et al. 2024)."""
        c = self.config
        lr = c.lr * (min(1.0, images / c.warmup_images) if c.warmup_images > 0 else 1.0)
        if c.lr_decay_images > 0:
            lr /= math.sqrt(max(images / c.lr_decay_images, 1.0))
        if c.cooldown_images > 0:
            lr *= min(1.0, max(0.0, (c.total_images - images) / c.cooldown_images))
        return lr

    def _count_flops(self, dtype) -> dict[int, int]:
        """Training FLOPs per image of each stage, counted on one image before any wrapping."""
        c = self.config
        denoiser = EDMPrecond(self.net, c.sigma_data, dtype)
        data = getattr(self.stream, "data", None)
        if getattr(data, "table", None) is not None:  # in memory: the padded text length every step sees
            cond = Cond(text=data.text[:1], text_mask=data.text_mask[:1],
                        media=None if data.media is None else data.media[:1])
        else:
            cond = self.make_cond([c.sample_prompts[0]], [c.styles[0] if c.styles else None])
        out = {}
        for stage in self.stages:
            side = (c.crop or c.resolution) >> stage
            x = torch.randn(1, 3, side, side, device=self.device)
            out[stage] = monitor.count_training_flops(denoiser, x, torch.ones(1, device=self.device), cond, stage)
        return out

    def train_step(self) -> float:
        """One optimizer step (or a skipped one); returns the loss averaged over ranks and micro-steps."""
        c, step = self.config, self.state.step
        stage = self.stage_for(step)
        self.set_dropout(stage)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for k in range(c.grad_accum):
            batch: Batch = self.stream.next()
            gen = torch.Generator().manual_seed(step_seed(c.seed, step, self.rank, k))
            x0 = batch.image.to(self.device, torch.float32)
            drop = dict(sorted(c.cond_drop.items()))  # a fixed order of random draws, however the dict was built
            cond = batch.cond if batch.cond is not None else self.make_cond(batch.caption, batch.style)
            cond = random_drop(cond, drop, generator=gen)
            weight = batch.weight.to(self.device) if c.weight_key else None
            with distributed.gradient_sync(self.model, k == c.grad_accum - 1):
                loss, sigma = self.loss_fn(self.denoiser, x0, cond, stage, generator=gen, weight=weight,
                                           return_sigma=True)
                (loss.mean() / c.grad_accum).backward()
            total += loss.detach().mean() / c.grad_accum
            self.loss_stats.add(loss, sigma, stage)
        mean_loss = float(distributed.all_reduce_mean(total))
        self.state.step += 1
        self.state.images += c.batch_size
        self.last_stage = stage

        finite = math.isfinite(mean_loss)
        if finite:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip if c.grad_clip > 0 else math.inf)
            self.grad_norm = float(distributed.to_full(norm))
            finite = math.isfinite(self.grad_norm)
        if not finite:  # skip: no optimizer or EMA update
            self.optimizer.zero_grad(set_to_none=True)
            self.state.nonfinite_total += 1
            self.consecutive_nonfinite += 1
            distributed.print0(f"non-finite loss or gradient at step {step}: update skipped "
                               f"({self.consecutive_nonfinite} in a row, {self.state.nonfinite_total} in total)")
            if self.consecutive_nonfinite >= c.max_nonfinite:
                raise EdifyError(f"training stopped: {self.consecutive_nonfinite} consecutive non-finite losses "
                                 f"(max_nonfinite={c.max_nonfinite}) at step {step}, {self.state.images} images; "
                                 "lower lr or check the data")
            return mean_loss
        self.consecutive_nonfinite = 0
        for group in self.optimizer.param_groups:  # a group may scale the schedule (e.g. a finetune's style rows)
            group["lr"] = self.lr_at(self.state.images) * group.get("lr_scale", 1.0)
        self.optimizer.step()
        self.ema.update(self.model, self.state.images, c.batch_size)
        return mean_loss

    # ---- outputs ------------------------------------------------------------------------------

    def save(self) -> Path:
        state = TrainState(self.state.step, self.state.images, self.stream.state_dict(), self.state.nonfinite_total)
        saved = checkpoint.save_checkpoint(self.out_dir, self.config, self.model, self.optimizer, self.ema, state)
        if self.init_snapshot is not None and distributed.is_main():
            write_init_snapshot(self.out_dir, self.init_snapshot)
        return saved

    def sample_grid(self) -> Path | None:
        """EMA samples of `sample_prompts` through the text-to-image pipeline, saved as one PNG."""
        c = self.config
        weights = self.ema.state_dict(self.model)  # collective under FSDP
        if not distributed.is_main():
            return None
        if c.max_sigma:
            distributed.print0("no sample grid: an upsampler (max_sigma > 0) samples from an input image")
            return None
        if self.text_encoder is None:
            distributed.print0("no sample grid: the text-to-image pipeline needs a text encoder")
            return None
        net = build_net(c)
        net.load_state_dict(weights)
        pipe = TextToImagePipeline(net, pipeline_config(c, net, getattr(self.text_encoder, "max_length", None)),
                                   text_encoder=self.text_encoder)
        pipe.to(self.device, self.denoiser.dtype)
        n = len(c.sample_prompts)
        styles = [c.styles[i % len(c.styles)] if c.styles else None for i in range(n)]
        out = pipe(list(c.sample_prompts), style=styles, seed=c.seed, output_type="tensor")
        return monitor.save_grid(out.images, self.out_dir / "samples" / f"{self.state.images:012d}.png")

    def _scalars(self, losses: list[float], images: int, seconds: float, flops: float) -> dict[str, float]:
        """One log point: losses by stage and noise bin (this rank's samples), lr, img/s, MFU."""
        seconds = max(seconds, 1e-9)  # time in train_step only, not in checkpoints or samples
        out = {"loss": sum(losses) / len(losses), "lr": self.lr_at(self.state.images),
               "img_per_s": images / seconds, "interval_images": images, "interval_seconds": seconds,
               "grad_norm": self.grad_norm,
               "nonfinite_total": self.state.nonfinite_total, **self.loss_stats.means()}
        if flops:  # achieved FLOP/s per device over the peak (MFU)
            out["mfu"] = monitor.mfu(flops / images, images / seconds / self.world, self.config.peak_tflops)
        self.loss_stats.reset()
        return out

    # ---- the loop -----------------------------------------------------------------------------

    def out_of_time(self) -> bool:
        c = self.config
        return c.max_minutes > 0 and wall_clock() - self.started >= 60 * c.max_minutes

    def out_of_cpu(self) -> bool:
        c = self.config
        return c.max_cpu_minutes > 0 and cpu_clock() - self.cpu_started >= 60 * c.max_cpu_minutes

    def stop_reason(self, signals: StopSignals, max_steps: int | None, steps_done: int) -> str:
        """Why the loop stops before its next step ("" to go on), the same on every rank.

        The image and step counts are the same on all ranks; a signal and the time budgets are per
        process (one rank's clock can cross a budget a step before another's), so under torchrun
        they are agreed in one all-reduce: the run stops when any rank says so, at the same step on
        all of them, and every rank then takes part in the same final log and checkpoint."""
        c = self.config
        local = [signals.received is not None, self.out_of_time(), self.out_of_cpu()]
        if self.world > 1:
            agreed = distributed.all_reduce_mean(torch.tensor([float(f) for f in local], device=self.device))
            local = [bool(v > 0) for v in agreed.tolist()]
        signal_stop, time_stop, cpu_stop = local
        if signal_stop:
            return "signal"
        if self.state.images >= c.total_images:
            return "total_images"
        if max_steps is not None and steps_done >= max_steps:
            return "max_steps"
        if time_stop:
            return "max_minutes"
        if cpu_stop:
            return "max_cpu_minutes"
        return ""

    def _record_run(self, result: TrainResult, images0: int, train_seconds: float, flops: float) -> None:
        """Append this run's facts to runs.jsonl (rank 0): what the model card is filled from."""
        if not distributed.is_main():
            return
        record = {"command": self.command, "device": str(self.device), "gpu": device_name(self.device),
                  "world_size": self.world, "torch": torch.__version__,
                  "precision": "bf16 autocast" if self.network_dtype == torch.bfloat16 else "fp32",
                  "compiled": self.config.compile, "start_images": images0,
                  "images": self.state.images, "steps": self.state.step, "stop": result.stop,
                  "wall_seconds": round(wall_clock() - self.started, 3), "train_seconds": round(train_seconds, 3),
                  "cpu_seconds": round(cpu_clock() - self.cpu_started, 3),
                  "train_flops": flops, "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "runs.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def run(self, max_steps: int | None = None) -> TrainResult:
        """Train until total_images, `max_steps` more steps, `max_minutes` since the trainer
        started or `max_cpu_minutes` of CPU time in this call, whichever comes first; checkpoint at
        intervals and at the end."""
        c = self.config
        self.cpu_started = cpu_clock()
        writer = monitor.ScalarWriter(self.out_dir, enabled=distributed.is_main())
        bar = tqdm(total=c.total_images, initial=self.state.images, unit="img", unit_scale=True,
                   disable=not distributed.is_main() or not sys.stderr.isatty(), dynamic_ncols=True)
        result = TrainResult()
        saved_at = None
        busy, images0, flops, log_losses = 0.0, self.state.images, 0.0, []
        first_images, total_busy, total_flops = self.state.images, 0.0, 0.0

        def crossed(every: int) -> bool:
            return every > 0 and self.state.images // every > (self.state.images - c.batch_size) // every

        signals = StopSignals()
        try:
            signals.__enter__()
            result.stop = self.stop_reason(signals, max_steps, 0)
            while not result.stop:
                started = time.perf_counter()
                loss = self.train_step()  # ends in a host sync (.item of the loss), so the time is real
                step_seconds = time.perf_counter() - started
                busy += step_seconds
                total_busy += step_seconds
                result.losses.append(loss)
                log_losses.append(loss)
                step_flops = self.flops_per_image.get(self.last_stage, 0) * c.batch_size
                flops += step_flops
                total_flops += step_flops
                bar.update(c.batch_size)
                bar.set_postfix(loss=f"{loss:.4f}", stage=self.last_stage)
                result.stop = self.stop_reason(signals, max_steps, len(result.losses))
                if crossed(c.log_images) or result.stop not in ("", "max_steps"):
                    writer.write(self.state.images, self.state.step,
                                 self._scalars(log_losses, self.state.images - images0, busy, flops))
                    busy, images0, flops, log_losses = 0.0, self.state.images, 0.0, []
                if crossed(c.sample_images):
                    self.sample_grid()
                if crossed(c.checkpoint_images):
                    result.checkpoint, saved_at = self.save(), self.state.images
            if saved_at != self.state.images and result.losses:
                result.checkpoint = self.save()
        finally:
            signals.__exit__()
            bar.close()
            writer.close()
        if result.stop == "signal":
            distributed.print0(f"stopped by {signals.received or 'a signal on another rank'} at "
                               f"{self.state.images} images: checkpoint {result.checkpoint}")
        if result.stop == "max_minutes":
            distributed.print0(f"max_minutes={c.max_minutes:g} reached at {self.state.images} images: "
                               f"checkpoint {result.checkpoint}")
        if result.stop == "max_cpu_minutes":
            distributed.print0(f"max_cpu_minutes={c.max_cpu_minutes:g} reached at {self.state.images} images: "
                               f"checkpoint {result.checkpoint}")
        self._record_run(result, first_images, total_busy, total_flops)
        result.step, result.images = self.state.step, self.state.images
        result.nonfinite_total = self.state.nonfinite_total
        return result


def trained_stages(config: TrainConfig) -> tuple[int, ...]:
    """Every stage whose noise range reaches below max_sigma (all of them without one)."""
    from edify.core.precond import stage_sigma_ranges

    ranges = stage_sigma_ranges(LaplacianProcess(config.levels, config.switch_sigmas), config.expert_ranges)
    return tuple(j for j, (low, _) in ranges.items() if not config.max_sigma or low < config.max_sigma)


def resume_or_record(t: Trainer, resume: bool, run_file: str, record: dict, conflict) -> None:
    """For trainers rebuilt around a frozen base (ControlNets, finetunes): with `resume` and a
    checkpoint in the run folder, check that it trains the same thing (`conflict()` returns an error
    message, or None) and continue from it; else record what the run trains in `run_file` (atomic)."""
    loaded = None
    if resume and checkpoint.latest_checkpoint(t.out_dir) is not None:
        message = conflict()
        if message:
            raise EdifyError(message)
        loaded = checkpoint.load_latest(t.out_dir, t.config, t.model, t.optimizer, t.ema)
    if loaded is not None:
        t.state = loaded
        t.stream.load_state_dict(loaded.data)
        distributed.print0(f"resumed from {checkpoint.latest_checkpoint(t.out_dir)} at {loaded.images} images")
    elif distributed.is_main():
        t.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = t.out_dir / f".{run_file}.tmp"
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(t.out_dir / run_file)


def train(config: TrainConfig, out_dir: str | Path, resume: bool = False, **kwargs) -> TrainResult:
    """Build a Trainer and run it to the end."""
    return Trainer(config, out_dir, resume=resume, **kwargs).run()
