"""Model families. Each folder is flat, so that it travels as remote code (transformers copies same-folder imports only)."""

__all__: list[str] = []  # nothing of its own: import the modules
