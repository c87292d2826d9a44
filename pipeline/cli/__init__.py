"""The `efrap` command line: the top layer, which wires the library's parts together."""
