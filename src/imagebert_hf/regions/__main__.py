"""`python -m imagebert_hf.regions ...` is `imagebert-extract-regions ...`; with a launcher,
`torchrun --nproc_per_node 8 -m imagebert_hf.regions ...` puts one process on each GPU.

(`-m imagebert_hf.regions.cli` runs the same `main`.)
"""

import sys

from .cli import main


if __name__ == "__main__":
    sys.exit(main())
