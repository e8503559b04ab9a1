"""The ``polysae`` command line: ``polysae <subcommand> [flags]``; see ``polysae --help``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from polysae.cli import COMMANDS, CLIError
from polysae.version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polysae",
        description="Sparse autoencoders with polynomial decoders: harvest, train, evaluate, "
                    "share.",
    )
    parser.add_argument("--version", action="version", version=f"polysae {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        # Every listed subcommand must import: a broken or missing module is an error here, never
        # a subcommand that silently disappears from --help.
        try:
            mod = importlib.import_module(f"polysae.cli.{name}")
        except Exception as e:
            raise ImportError(f"polysae: subcommand {name!r} is listed in polysae.cli.COMMANDS but "
                              f"its module polysae.cli.{name} failed to import "
                              f"({type(e).__name__}: {e})") from e
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


INTERRUPT_HINTS = {"harvest": "rerun the same command to resume (finished shards are kept)",
                   "run": "rerun the same command to resume",
                   "train": "resume with --resume (from the last checkpoint)"}
"""What a Ctrl-C'd command prints after "interrupted" when the command says nothing more."""


def _check_device_flag(args: argparse.Namespace) -> None:
    """A ``--device`` this machine does not have is a usage error before anything loads."""
    device = getattr(args, "device", None)
    if device:
        from polysae.device import check_device

        try:
            check_device(device)
        except ValueError as e:
            raise CLIError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    from polysae.outlock import command_lock

    try:
        _check_device_flag(args)
        with command_lock(args.command, args._module, args,
                          sys.argv[1:] if argv is None else argv):
            return int(args._module.main(args) or 0)
    except KeyboardInterrupt as e:  # Ctrl-C: one line, no traceback (resume hint where known)
        hint = INTERRUPT_HINTS.get(args.command)
        msg = str(e) or ("interrupted; " + hint if hint else "interrupted")
        print(f"polysae {args.command}: {msg}", file=sys.stderr)
        return 130
    except CLIError as e:
        print(f"polysae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # bad data, or a file that is missing/unreadable/full
        print(f"polysae {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
