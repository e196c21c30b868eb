"""Worker for the multi-process training tests, launched by
`python -m torch.distributed.run --nproc_per_node 2 --standalone tests/_torchrun_worker.py MODE OUT [skew]`.

Trains the tiny config for two steps (two accumulated micro-batches each) with data-parallel
mode MODE (ddp or fsdp) and writes the
per-step losses (mean over ranks) to OUT/result.json on rank 0.

With `skew`, the run has a one-minute `max_minutes` budget and room for four steps, and rank 1's
clock jumps past the budget after its first step while rank 0's does not: the ranks must agree
to stop together after that step (else rank 0 waits in the next step's all-reduce forever).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _training_helpers import WordHashEncoder, tiny_config  # noqa: E402

from edify.training import distributed  # noqa: E402
from edify.training import loop  # noqa: E402
from edify.training.loop import Trainer  # noqa: E402


def main(mode: str, out: str, skew: bool = False) -> None:
    # 8 images per step = 2 ranks x 2 accumulated micro-batches of 2 (exercises the no-sync path)
    config = tiny_config(dist=mode, batch_size=8, grad_accum=2, total_images=32 if skew else 16,
                         checkpoint_images=16, log_images=8, max_minutes=1.0 if skew else 0.0)
    trainer = Trainer(config, out, text_encoder=WordHashEncoder())
    if skew and distributed.rank() == 1:
        clock = loop.wall_clock
        loop.wall_clock = lambda: clock() + (3600.0 if trainer.state.step >= 1 else 0.0)
    result = trainer.run()
    if distributed.is_main():
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump({"losses": result.losses, "images": result.images, "world": distributed.world_size(),
                       "checkpoint": str(result.checkpoint), "stop": result.stop}, f)
    distributed.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], skew=sys.argv[3:] == ["skew"])
