"""`python -m lragent_sglang.adapters` is `lragent-adapters`."""

import sys

from lragent_sglang.adapters.cli import main

sys.exit(main())
