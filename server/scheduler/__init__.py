"""Step-level continuous batching: a synchronous core driven by one thread."""
