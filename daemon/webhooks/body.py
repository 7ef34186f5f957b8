"""A delivery's body: the event and the job as the API shows it (`GET /v1/jobs/{id}`,
`vigil show --json`), without its input: the input can be large (up to
queue.max_input_bytes) and is the client's own; a receiver that needs it asks the API.

`job` is null when the job is gone (retention deleted it before the delivery went
out, after a receiver was down that long): the event still goes out with its id."""

from __future__ import annotations

import msgspec

from daemon.control.results import job_view
from daemon.jobs import Job
from daemon.store.outbox import Delivery

_encoder = msgspec.json.Encoder()


def render(delivery: Delivery, job: Job | None) -> bytes:
    """`{"id", "event", "created_at", "job_id", "job"}` as JSON bytes."""
    return _encoder.encode(
        {
            "id": delivery.id,
            "event": delivery.event,
            "created_at": delivery.created_at,
            "job_id": delivery.job_id,
            "job": None if job is None else job_view(job),
        }
    )
