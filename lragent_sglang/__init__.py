"""LRAgent KV-cache sharing for multi-LoRA agents, as an SGLang 0.5.17 plugin.

Subpackages by role: `server` runs inside SGLang's processes, `agents` in a user's
script (frontend endpoint, role helpers, the embedded model), `adapters` makes and
checks LoRA adapters, `eval` measures what sharing costs in output quality; `radix` and
`kernels` are the prefix tree and the Triton kernels, free of SGLang.
"""

from importlib import resources
from pathlib import Path

__version__ = "0.1.0"


def data_path(*parts: str) -> Path:
    """A file shipped in the package's `data/` folder (role training data, the example
    agent's documents); found through the installed package, editable or not."""
    return Path(str(resources.files(__name__).joinpath("data", *parts)))
