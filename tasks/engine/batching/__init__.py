"""Our continuous-batching backend: `scheduler` decides what runs each step, `model_runner`
builds inputs and runs the forward passes over the `kv_cache`, with prompts `packed` into decode
steps; `engine` is the loop that ties them to sampling and the requests' sinks."""
