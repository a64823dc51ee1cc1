"""diffusers model families served by the scheduler (adapters in engines/diffusers_engine.py)."""
