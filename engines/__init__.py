"""Engines run one batched denoiser forward; the scheduler decides what goes in it."""
