"""File formats and file I/O every stage shares: the jsonl manifest, atomic writes and the PNG figures.

The bottom of the package: these modules import nothing from the rest of it, so every stage (regions, data,
evaluation, training, curation, the app) may read and write through them.
"""

__all__: list[str] = []  # nothing of its own: import the modules
