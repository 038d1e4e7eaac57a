"""Run the demo model builder: python -m model_store.demo --out DIR [--force]."""

from .build import main

raise SystemExit(main())
