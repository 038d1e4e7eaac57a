"""The inference engine. `interface` is what a job sees (submit, steps, cancel); `process` and
`host` run an engine in a child process over a typed pipe (`protocol`); `factory` builds the
backend a model asks for: `batching` (ours), `sequential` (one at a time) or `vllm`."""
