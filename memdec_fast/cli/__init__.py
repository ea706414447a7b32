"""The ``memdec-fast`` command line; :mod:`memdec_fast.cli.args` holds what its subcommands share."""

from memdec_fast.cli.commands import build_parser, main

__all__ = ["build_parser", "main"]
