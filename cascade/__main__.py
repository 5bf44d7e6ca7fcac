"""Command line: ``python -m cascade <command> ...`` (a thin skin over the library).

Each command lives in its own module, which exposes ``add_parser(subparsers)``; that function registers the
command's parser (its one line of ``--help`` comes from :data:`COMMANDS`) and sets ``func`` (called with the parsed
arguments, returning an exit code). Only the module of the command being run is imported, so that ``--help`` and
the light commands (eval, convert, demo) do not wait for scikit-learn and the router (about a second); a module
must not import Jittor or torch at import time.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import warnings

from .io import STDOUT, os_problem

PACKAGE = os.path.dirname(os.path.abspath(__file__))

# each command: the module that defines it and its line in --help, in the order of --help
COMMANDS = {
    "train": ("cascade.pipeline", "fit the cascade on the few-shot split and report validation accuracy"),
    "test": ("cascade.pipeline", "write the submission file for a folder of test images"),
    "eval": ("cascade.evaluate", "accuracy of a result file against labels"),
    "bench": ("cascade.bench", "score zero-shot, InMaP, LP++ and the cascade on feature task files"),
    "convert": ("cascade.convert", "convert a released checkpoint to Jittor weights"),
    "demo": ("cascade.demo", "write a small synthetic workspace to try train, test and eval"),
}


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


class _Subcommands:
    """The subcommands as a command module's ``add_parser`` sees them: each parser it adds gets its line of
    ``--help`` from :data:`COMMANDS`, the one place that lists the commands."""

    def __init__(self, sub):
        self._sub = sub

    def add_parser(self, name: str, **kwargs):
        return self._sub.add_parser(name, help=COMMANDS[name][1], **kwargs)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the full parser of ``command`` (and of the other commands its module defines): only that
    module is imported. The others are named with their line of help, enough for ``--help`` and for argparse to
    list the choices. ``command=None``: every module is imported (every command's parser is full)."""
    parser = argparse.ArgumentParser(
        prog="python -m cascade",
        description="Few-shot image classification with a routed cascade of CLIP stages (InMaP -> LP++ -> "
                    "specialists). Run `python -m cascade COMMAND --help` for each command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = None if command is None else COMMANDS.get(command, ("", ""))[0]
    for name, (module, line) in COMMANDS.items():
        if name in sub.choices:                      # added with an earlier command of its module
            continue
        if wanted is None or module == wanted:       # every command of that module, in its order
            importlib.import_module(module).add_parser(_Subcommands(sub))
        if name not in sub.choices:
            sub.add_parser(name, help=line)
    parser.command_parsers = sub.choices     # main: an unknown option is reported with its command's usage
    return parser


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """The package's own warnings (UserWarning raised in its files) in one line, as its other messages are (Python's
    form names the source file and line of the warning call, and repeats that line); other warnings, such as
    numpy's RuntimeWarning raised under a line of the package, as Python writes them."""
    if issubclass(category, UserWarning) and os.path.abspath(filename).startswith(PACKAGE + os.sep):
        return f"[cascade] warning: {message}\n"
    return _PYTHON_FORMAT(message, category, filename, lineno, line)


_PYTHON_FORMAT = warnings.formatwarning


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _format_warning
    try:
        return _main(sys.argv[1:] if argv is None else list(argv))
    finally:
        warnings.formatwarning = _PYTHON_FORMAT


def _main(argv: list[str]) -> int:
    try:
        # only the module of the command named first is imported (none for --help): seconds on a cold disk
        parser = build_parser(next((a for a in argv if a in COMMANDS), ""))
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
    except OSError as exc:  # a filesystem fault (missing file, read-only folder, full disk): one line, the path
        if isinstance(exc, BrokenPipeError) and exc.filename == STDOUT:
            # the reader of the output went away (`| head`): stop quietly with a shell's status for it, and point
            # the output at the null device so that Python's flush at exit does not report it again
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return 128 + 13     # 128 + SIGPIPE
        print(f"cascade {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cascade {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
