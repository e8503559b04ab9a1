"""Subcommands of the ``polysae`` command line, one module per subcommand.

Each module ``polysae/cli/<name>.py`` defines:

- ``HELP``: a one-line description shown by ``polysae --help``;
- ``add_arguments(parser: argparse.ArgumentParser) -> None``: its flags;
- ``main(args: argparse.Namespace) -> int``: the work (exit code), importing heavy modules lazily.

``COMMANDS`` lists them in the order ``--help`` shows them. Every listed module must import:
``polysae.__main__`` raises, naming the module, when one is missing or broken (no subcommand
silently disappears). Only these modules (and ``polysae.__main__``) read argv; library functions
take config objects and paths.
"""

from __future__ import annotations

COMMANDS = (
    "run",
    "replicate",
    "harvest",
    "hooks",
    "train",
    "eval",
    "browse",
    "list",
    "download",
    "export",
)


class CLIError(Exception):
    """A user error the CLI reports as one line on stderr with exit code 2 (no traceback)."""
