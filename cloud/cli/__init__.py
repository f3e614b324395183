"""The operator CLI: one module per command group, shared options and helpers in ``common``."""
