"""The generate task: a thin shell around the worker's JobRunner."""
from __future__ import annotations

from tasks.worker.app import GENERATE_TASK, app
from tasks.jobs.contract import Job
from tasks.worker.bootstep import current_runtime


@app.task(name=GENERATE_TASK)
def generate(job_data: dict) -> None:
    """Run one generation job (if it is this worker's and in time) and publish its events."""
    current_runtime().guard.run(Job.model_validate(job_data))
