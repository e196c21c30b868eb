"""Training-step throughput and MFU of the edify U-Net against the diffusers UNet2DConditionModel anchor.

Both networks train on the same problem (docs/benchmarks.md): a 256 px image, i.e. the Haar
48 x 64 x 64 grid, with 77 text tokens for cross-attention, bf16 autocast and AdamW. Ours takes the
3 x 256 x 256 pixels (its Haar transform is inside the network); the anchor takes the 48 x 64 x 64
Haar coefficients directly, with the same widths. Each model runs eager and under torch.compile.

MFU = FLOPs of one training step (forward + backward, counted by FlopCounterMode) / step time / peak.

GPU:        python bench/train_step.py --batch 128 --steps 20
CPU smoke:  python bench/train_step.py --device cpu --preset tiny --batch 2 --steps 2
Graph-break check (CPU is fine):  python bench/train_step.py --device cpu --preset tiny --explain
FLOP count without compute:       python bench/train_step.py --flops-only --batch 1
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import shlex
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from edify.conditioning import DOF_NAMES, PITCH_NAMES, Cond
from edify.networks.presets import PRESETS, build_network, count_parameters


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="base-256", choices=list(PRESETS))
    p.add_argument("--resolution", type=int, default=None, help="image side (default: the preset's reference)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--text-len", type=int, default=77)
    p.add_argument("--compile", choices=["off", "on", "both"], default=None,
                   help="eager, compiled or both (default: both on cuda, off on cpu)")
    p.add_argument("--amp", choices=["bf16", "none"], default=None, help="default: bf16 on cuda, none on cpu")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing in our U-Net")
    p.add_argument("--skip-anchor", action="store_true")
    p.add_argument("--forward", action="store_true", help="also time an inference forward (img/s)")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="peak for MFU (H100 bf16 matmul, measured)")
    p.add_argument("--explain", action="store_true", help="print torch._dynamo.explain graph breaks and exit")
    p.add_argument("--flops-only", action="store_true",
                   help="count params and training-step FLOPs on the meta device (no compute) and exit")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.compile = args.compile or ("both" if cuda else "off")
    args.amp = args.amp or ("bf16" if cuda else "none")
    return args


def image_batch(args, *shape) -> torch.Tensor:
    """A random image batch, channels-last on CUDA (the layout the convolutions run fastest in)."""
    x = torch.randn(*shape, device=args.device)
    return x.contiguous(memory_format=torch.channels_last) if args.device.startswith("cuda") else x


def make_ours(args):
    cfg = PRESETS[args.preset]
    if args.checkpointing:
        cfg = type(cfg).from_dict({**cfg.to_dict(), "checkpointing": True})
    model = build_network(cfg)
    res = args.resolution or cfg.reference_resolution
    b, dev = args.batch, args.device
    x = image_batch(args, b, cfg.in_channels, res, res)
    cond = Cond(text=torch.randn(b, args.text_len, cfg.text_dim, device=dev),
                text_mask=torch.ones(b, args.text_len, dtype=torch.bool, device=dev),
                media=torch.randint(-1, cfg.num_media_types, (b,), device=dev),
                pitch=torch.randint(-1, len(PITCH_NAMES), (b,), device=dev),
                dof=torch.randint(-1, len(DOF_NAMES), (b,), device=dev))
    c_noise = torch.randn(b, device=dev)
    stage = torch.randint(0, cfg.num_stages, (b,), device=dev)
    target = torch.randn_like(x)
    return model, (lambda m: m(x, c_noise, cond, stage)), target


def make_anchor(args):
    from diffusers import UNet2DConditionModel

    cfg = PRESETS[args.preset]
    n = len(cfg.widths)
    grid = (args.resolution or cfg.reference_resolution) // 4
    model = UNet2DConditionModel(
        sample_size=grid, in_channels=16 * cfg.in_channels, out_channels=16 * cfg.out_channels,
        block_out_channels=cfg.widths, layers_per_block=cfg.num_res_blocks,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cfg.text_dim, norm_num_groups=cfg.norm_groups)
    b, dev = args.batch, args.device
    x = image_batch(args, b, 16 * cfg.in_channels, grid, grid)
    t = torch.rand(b, device=dev) * 1000
    text = torch.randn(b, args.text_len, cfg.text_dim, device=dev)
    return model, (lambda m: m(x, t, encoder_hidden_states=text).sample), torch.randn_like(x)


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def train_step_fn(model, forward, target, opt, amp):
    def step():
        with amp():
            out = forward(model)
        loss = F.mse_loss(out.float(), target)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss
    return step


def count_step_flops(model, forward, target, amp) -> int:
    """FLOPs of one forward + backward, counted on the eager model."""
    with FlopCounterMode(display=False) as counter:
        train_step_fn(model, forward, target, None, amp)()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def timed(fn, args) -> float:
    """Seconds per call of fn after args.warmup untimed calls (compilation happens there)."""
    for _ in range(args.warmup):
        fn()
    sync(args.device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        fn()
    sync(args.device)
    return (time.perf_counter() - t0) / args.steps


def bench_one(name, make, args, amp, results):
    model, forward, target = make(args)
    params = count_parameters(model)
    cuda = args.device.startswith("cuda")
    model = model.to(args.device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    flops = count_step_flops(model, forward, target, amp)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    for compiled in modes:
        row = dict(config=name, mode="compile" if compiled else "eager", params=params, batch=args.batch,
                   gflop_img=flops / args.batch / 1e9)
        torch._dynamo.reset()
        # Ours must compile as one graph (fullgraph=True fails on any graph break); the anchor may break.
        net = torch.compile(model, fullgraph=name.startswith("edify")) if compiled else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
        try:
            dt = timed(train_step_fn(net, forward, target, opt, amp), args)
            row.update(step_ms=dt * 1e3, img_s=args.batch / dt, mfu=flops / dt / (args.peak_tflops * 1e12))
            if args.forward:
                def infer(m=net):
                    with torch.inference_mode(), amp():
                        forward(m)
                row["fwd_img_s"] = args.batch / timed(infer, args)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:  # report and go on with the next run
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        results.append(row)
        del opt, net
        model.zero_grad(set_to_none=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def explain(args):
    model, forward, _ = make_ours(args)
    model = model.to(args.device)
    out = torch._dynamo.explain(forward)(model)
    print(f"torch._dynamo.explain: graphs={out.graph_count} graph_breaks={out.graph_break_count}")
    for reason in out.break_reasons:
        print("  break:", reason)


def flops_only(args):
    args.device, amp = "meta", contextlib.nullcontext
    makers = [(f"edify {args.preset}", make_ours)] + ([] if args.skip_anchor else [("diffusers anchor", make_anchor)])
    for name, make in makers:
        with torch.device("meta"):
            model, forward, target = make(args)
        flops = count_step_flops(model, forward, target, amp)
        print(f"{name:22s} {count_parameters(model) / 1e6:7.1f}M params "
              f"{flops / args.batch / 1e9:7.1f} GFLOP/img per training step (forward + backward)")


def main(argv=None):
    args = parse_args(argv)
    print("command: python " + " ".join(shlex.quote(a) for a in sys.argv))
    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    if args.explain:
        explain(args)
        return
    if args.flops_only:
        flops_only(args)
        return
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    def amp():
        if args.amp == "bf16":
            return torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16)
        return contextlib.nullcontext()

    results = []
    bench_one(f"edify {args.preset}", make_ours, args, amp, results)
    if not args.skip_anchor:
        bench_one("diffusers anchor", make_anchor, args, amp, results)

    anchors = {r["mode"]: r for r in results if r["config"] == "diffusers anchor"}
    anchors = {m: r for m, r in anchors.items() if "error" not in r}
    ref = anchors.get("compile", anchors.get("eager"))  # the ratio is against the compiled anchor when run
    res = args.resolution or PRESETS[args.preset].reference_resolution
    print(f"\ntraining step, {res}px (Haar {res // 4}x{res // 4}), text {args.text_len} tokens, amp {args.amp}, "
          f"{args.warmup} warmup + {args.steps} timed steps, peak {args.peak_tflops:g} TFLOP/s")
    print(f"{'config':22s} {'mode':8s} {'params':>8s} {'batch':>5s} {'step ms':>9s} {'img/s':>9s} "
          f"{'GFLOP/img':>9s} {'MFU':>6s} {'vs anchor':>9s}" + (f" {'fwd img/s':>10s}" if args.forward else ""))
    for r in results:
        head = f"{r['config']:22s} {r['mode']:8s} {r['params'] / 1e6:7.1f}M {r['batch']:5d}"
        if "error" in r:
            print(f"{head} failed: {r['error']}")
            continue
        ratio = f"{r['img_s'] / ref['img_s']:.2f}x" if ref else "-"
        print(f"{head} {r['step_ms']:9.1f} {r['img_s']:9.1f} {r['gflop_img']:9.1f} {100 * r['mfu']:5.1f}% "
              f"{ratio:>9s}" + (f" {r['fwd_img_s']:10.1f}" if args.forward else ""))
    if ref:
        print(f"'vs anchor' = img/s / img/s of the {ref['mode']} diffusers anchor")


if __name__ == "__main__":
    main()
