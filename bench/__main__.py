"""`python -m bench`: run the pipeline benchmark."""
import sys

from bench.pipeline import main

sys.exit(main())
