"""`python -m imagebert_hf.regions ...` is `imagebert-extract-regions ...`; with a launcher,
`torchrun --nproc_per_node 8 -m imagebert_hf.regions ...` puts one process on each GPU.

(`-m imagebert_hf.regions.feature_cache` runs the same `main`, but Python warns first that the package had already
imported that module.)
"""

import sys

from .feature_cache import main


if __name__ == "__main__":
    sys.exit(main())
