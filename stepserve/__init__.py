"""stepserve: an inference server for few-step and quantized diffusion models."""

__version__ = "0.1.0"
