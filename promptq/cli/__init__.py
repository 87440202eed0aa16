"""`promptq`: the command line. Each group lives in a module of its own."""

from promptq.cli.main import main

__all__ = ["main"]
