"""The serving side: HTTP API, scheduler, settings, metrics."""
