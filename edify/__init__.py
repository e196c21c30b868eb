"""edify: pixel-space Laplacian diffusion models for text-to-image generation."""

__version__ = "0.1.0"
