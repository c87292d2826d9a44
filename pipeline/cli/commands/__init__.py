"""Sub-commands of the `efrap` CLI, one module each (see pipeline.cli.main)."""
