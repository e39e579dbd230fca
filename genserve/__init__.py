"""GenServe: step-level co-serving of diffusion models."""

__version__ = "0.1.0"
