"""``nvidia-nri-plugin``: run the NRI plugin, dry-run a container, show the host driver, install.

One module per subcommand (``run``, ``inspect``, ``info``, ``install``), each declaring ``NAME``,
``HELP``, ``DESCRIPTION``, ``add_arguments(parser)`` and ``run(args, environ, out) -> exit code``;
``common`` holds what they share. The parser and the dispatch are built from :data:`COMMANDS`.

Start-up time counts against NRI's 5 s registration timeout, so these modules import only the
standard library at the top; each command imports what it needs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import TextIO

from nri_plugin.cli import doctor, info, inspect, install, run
from nri_plugin.cli.common import (
    CAPABILITIES,
    EXIT_BROKEN_PIPE,
    EXIT_CODES_HELP,
    EXIT_USAGE,
    UsageError,
    formatter,
)

__all__ = ["CAPABILITIES", "COMMANDS", "build_parser", "main"]

COMMANDS: tuple[ModuleType, ...] = (run, inspect, info, install, doctor)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nvidia-nri-plugin",
        formatter_class=formatter,
        epilog=EXIT_CODES_HELP,
        description="containerd NRI plugin that gives containers NVIDIA GPUs (nvidia-container-runtime-hook "
        "semantics, as spec-visible adjustments).",
    )
    from nri_plugin import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        p = sub.add_parser(
            command.NAME,
            help=command.HELP,
            formatter_class=formatter,
            epilog=EXIT_CODES_HELP,
            description=command.DESCRIPTION,
        )
        command.add_arguments(p)
    return parser


def main(
    argv: Sequence[str] | None = None, *, environ: Mapping[str, str] | None = None, out: TextIO | None = None
) -> int:
    from nri_plugin.errors import ConfigError

    env = os.environ if environ is None else environ
    stdout = sys.stdout if out is None else out
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    commands = {command.NAME: command for command in COMMANDS}
    try:
        return int(commands[args.command].run(args, env, stdout))
    except (UsageError, ConfigError) as e:
        print(f"nvidia-nri-plugin {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `... | head`: stop quietly, as shell tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
