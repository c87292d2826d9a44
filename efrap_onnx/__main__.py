"""`python -m efrap_onnx`: the `efrap` command line."""

import sys

from efrap_onnx.cli import main

sys.exit(main())
