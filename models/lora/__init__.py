"""LoRA adapters applied per row inside one batched denoiser forward."""
