"""The Celery worker: app and task, the bootstep that loads the model once per process, the
guard around each job (lease, deadline) and the runner that turns engine steps into events."""
