"""diffsr: real-world image super-resolution with diffusion priors and an offline default model."""

__version__ = "0.1.0"

from diffsr.pipelines.feedforward import Upscaler  # noqa: E402

__all__ = ["Upscaler", "__version__"]
