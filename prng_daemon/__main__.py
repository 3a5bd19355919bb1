"""`python -m prng_daemon` is the `prng-llm-daemon` command."""

import sys

from .cli import main

sys.exit(main())
