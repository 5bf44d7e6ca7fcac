"""Command line: ``python -m cascade <command> ...`` (a thin skin over the library).

Each command lives in its own module, which exposes ``add_parser(subparsers)``; that function registers the
command's parser and sets ``func`` (called with the parsed arguments, returning an exit code). Modules are
imported only to build the parser, so they must stay cheap to import (no Jittor or torch at import time).
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from .io import STDOUT, os_problem

# command modules, in the order they appear in --help
COMMAND_MODULES = (
    "cascade.pipeline",   # train, test
    "cascade.evaluate",   # eval
    "cascade.bench",      # bench (real-feature tasks)
    "cascade.convert",    # convert (same as python -m cascade.convert)
    "cascade.demo",       # demo (a synthetic workspace to try the others)
)


class CascadeError(Exception):
    """An expected failure (bad input, missing file): reported as one line, exit status 2."""


# what to do about the filesystem faults a user can fix
_OS_HINTS = {
    errno.ENOSPC: "free some space and rerun (outputs written before are unchanged)",
    errno.EDQUOT: "free some space and rerun (outputs written before are unchanged)",
    errno.EROFS: "choose a writable folder",
    errno.EACCES: "check the permissions, or choose another folder",
    errno.EPERM: "check the permissions, or choose another folder",
}


def describe_os_error(exc: OSError) -> str:
    """One line for an OSError: ``<path>: <problem> (errno N NAME); <what to do>``. Errors raised with a
    message of their own (no errno) keep it."""
    text = os_problem(exc)
    if exc.errno is None or not exc.strerror:
        return text
    if exc.filename is not None:
        where = str(exc.filename) + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
        text = f"{where}: {text}"
    hint = _OS_HINTS.get(exc.errno)
    return f"{text}; {hint}" if hint else text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cascade",
        description="Few-shot image classification with a routed cascade of CLIP stages (InMaP -> LP++ -> "
                    "specialists). Run `python -m cascade COMMAND --help` for each command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a command whose module is not there yet is simply absent
            if exc.name == name:
                continue
            raise
        module.add_parser(sub)
    parser.command_parsers = sub.choices     # main: an unknown option is reported with its command's usage
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser()         # imports every command's module: seconds on a cold disk
    except KeyboardInterrupt:
        named = argv[0] if argv and not argv[0].startswith("-") else ""
        print(f"cascade{' ' + named if named else ''}: interrupted", file=sys.stderr)
        return 130
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = parser.command_parsers.get(getattr(args, "command", None) or "", parser)
        if command is parser:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        # positionals after options (`bench a.npz --json b.npz`): the command's own parser reads them intermixed,
        # and reports anything else it does not know with its own usage
        rest = argv[argv.index(args.command) + 1:]
        args = command.parse_intermixed_args(rest, namespace=argparse.Namespace(command=args.command))
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except (CascadeError, ValueError) as exc:
        print(f"cascade {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError as exc:
        if exc.filename != STDOUT:
            print(f"cascade {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
            return 2
        # the reader of the output went away (`| head`): stop quietly with a shell's status for it, and point the
        # output at the null device so that Python's flush at exit does not report it again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + 13     # 128 + SIGPIPE
    except OSError as exc:  # a filesystem fault (missing file, read-only folder, full disk): one line, the path
        print(f"cascade {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cascade {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
