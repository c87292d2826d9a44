"""Sub-commands of the `efrap` CLI, one module each (see cli.main)."""
