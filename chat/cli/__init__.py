"""Command-line entry points (thin: they build a config and call the library)."""
