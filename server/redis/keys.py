"""Redis key names, in one place (prefix `stepserve:`)."""

PREFIX = "stepserve"
GROUP = "workers"


def queue(model: str) -> str:
    """The model's job stream (Redis Streams, one consumer group of workers)."""
    return f"{PREFIX}:queue:{model}"


def job(job_id: str) -> str:
    """Hash: status, model, step, steps, error, entry (stream id), cancelled."""
    return f"{PREFIX}:job:{job_id}"


def events(job_id: str) -> str:
    """Pub/sub channel of a job's previews and final event."""
    return f"{PREFIX}:events:{job_id}"


def encoded(job_id: str) -> str:
    """The job's result as the API returns it (JSON `data`), encoded once for every
    replica (TTL like the result)."""
    return f"{PREFIX}:encoded:{job_id}"


def result(job_id: str) -> str:
    """The finished images (raw bytes, TTL)."""
    return f"{PREFIX}:result:{job_id}"


def load(model: str) -> str:
    """Hash: worker (consumer) name -> its core's load report (JSON, scheduler/
    load_report.py), refreshed every 0.25 s; the API forecasts deadlines from it."""
    return f"{PREFIX}:load:{model}"


CANCEL = f"{PREFIX}:cancel"  # pub/sub: job ids to cancel
MODELS = f"{PREFIX}:models"  # hash: model name -> metadata JSON published by workers
