"""Model families. Each folder is flat, so that it travels as remote code (transformers copies same-folder imports only)."""
