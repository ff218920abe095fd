"""The ``deltakit`` command. ``deltakit demo`` runs the main job: LoRA on the embedded MiniLM model."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``deltakit`` console script; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="deltakit", description="Delta tuning for PyTorch / transformers models.")
    parser.add_argument("--version", action="version", version=f"deltakit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser(
        "demo",
        help="fine-tune LoRA on the embedded all-MiniLM-L6-v2 (a generated task); --tiny for a seconds-long run",
        add_help=False,
    )
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    parser.error(f"unknown command {args.command!r}")  # exits with code 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
