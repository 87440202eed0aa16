"""`promptq`: the command line. Each group lives in a module of its own."""

import sys

from promptq.cli.green import patch_if_green

# Before any other import: see promptq.cli.green.
patch_if_green(sys.argv)

from promptq.cli.main import main  # noqa: E402

__all__ = ["main"]
