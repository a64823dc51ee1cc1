"""Step and block caches that reuse denoiser work across steps, with per-request state."""
