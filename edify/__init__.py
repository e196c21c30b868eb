"""edify: pixel-space Laplacian diffusion models for text-to-image generation.

    import edify
    pipe = edify.TextToImagePipeline.from_pretrained("weights/emoji-64").to("cpu")
    image = pipe("red apple", style="twemoji", seed=0).images[0]
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["TextToImagePipeline", "__version__"]


def __getattr__(name: str):
    # Loaded on first use, so that `import edify` (and the CLI's start-up) does not import torch.
    if name == "TextToImagePipeline":
        from edify.pipelines.text2image import TextToImagePipeline

        return TextToImagePipeline
    raise AttributeError(f"module 'edify' has no attribute {name!r}")
