"""Everything behind the API: the job library, the Celery worker and the inference engine.

- `tasks.jobs`: the job contract and what the API and workers share through Redis (event log,
  feed, leases, worker liveness). No torch, no model code: the API imports only this and
  `tasks.worker.app`.
- `tasks.worker`: the Celery app, the worker bootstep that starts the engine once per process,
  and the runner that turns a job into engine steps and events.
- `tasks.engine`: the inference engine behind one interface (`tasks.engine.interface`), hosted
  in a process of its own, with its backends: `batching` (ours), `sequential` and `vllm`.
"""
