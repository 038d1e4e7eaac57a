"""Celery workers and the job contract.

`tasks.contract`, `tasks.joblog`, `tasks.workers` and `tasks.celery_app` import no torch and
are what the API uses; the engine, runner and worker bootstep load model code lazily.
"""
