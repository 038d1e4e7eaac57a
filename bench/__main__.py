"""`python -m bench`: benchmark the pipeline on our engine; with `--backend vllm` Dawet's vllm
backend against vLLM's own server (bench/backends.py); with `--keyspace` the API's latency as
Redis fills with history (bench/keyspace.py); with `--responsive` short requests' TTFT while
huge prompts arrive (bench/responsive.py); with `--batch-lane` short requests' TTFT beside a
running batch (bench/batch_lane.py); with `--engine` our engine's new defaults against its old
ones on a 135M-shaped model (bench/engine_forward.py); with `--prefix` a conversation's next
turn with and without the prefix cache (bench/prefix.py); with `--adapters` a batch mixing
LoRA adapters against the bare base (bench/adapters.py); with `--job-path` a job's TTFT by the
job API, the multiplexed job socket and the OpenAI SSE path (bench/job_path.py); with
`--kv-memory` the KV cache's memory on a mixed batch, pool against padded window
(bench/kv_memory.py)."""
import sys

if "--backend" in sys.argv[1:]:
    from bench.backends import main
elif "--keyspace" in sys.argv[1:]:
    from bench.keyspace import main
elif "--responsive" in sys.argv[1:]:
    from bench.responsive import main
elif "--engine" in sys.argv[1:]:
    from bench.engine_forward import main
elif "--prefix" in sys.argv[1:]:
    from bench.prefix import main
elif "--adapters" in sys.argv[1:]:
    from bench.adapters import main
elif "--batch-lane" in sys.argv[1:]:
    from bench.batch_lane import main
elif "--job-path" in sys.argv[1:]:
    from bench.job_path import main
elif "--kv-memory" in sys.argv[1:]:
    from bench.kv_memory import main
else:
    from bench.pipeline import main

sys.exit(main())
