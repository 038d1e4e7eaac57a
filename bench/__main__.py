"""`python -m bench`: benchmark the pipeline on our engine, or with `--backend vllm` Dawet's
vllm backend against vLLM's own server (bench/backends.py)."""
import sys

if "--backend" in sys.argv[1:]:
    from bench.backends import main
else:
    from bench.pipeline import main

sys.exit(main())
