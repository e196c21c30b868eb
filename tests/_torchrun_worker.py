"""Worker for the multi-process training tests, launched by
`python -m torch.distributed.run --nproc_per_node 2 --standalone tests/_torchrun_worker.py MODE OUT`.

Trains the tiny config for two steps (two accumulated micro-batches each) with data-parallel
mode MODE (ddp or fsdp) and writes the
per-step losses (mean over ranks) to OUT/result.json on rank 0.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _training_helpers import WordHashEncoder, tiny_config  # noqa: E402

from edify.training import distributed  # noqa: E402
from edify.training.loop import Trainer  # noqa: E402


def main(mode: str, out: str) -> None:
    # 8 images per step = 2 ranks x 2 accumulated micro-batches of 2 (exercises the no-sync path)
    config = tiny_config(dist=mode, batch_size=8, grad_accum=2, total_images=16, checkpoint_images=16,
                         log_images=8)
    trainer = Trainer(config, out, text_encoder=WordHashEncoder())
    result = trainer.run()
    if distributed.is_main():
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump({"losses": result.losses, "images": result.images, "world": distributed.world_size(),
                       "checkpoint": str(result.checkpoint)}, f)
    distributed.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
