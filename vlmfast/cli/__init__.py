"""The ``vlmfast`` command: the app layer. The library never imports this package.

    vlmfast info [--json] [--backend B]     what this installation can run (backends, build, GPU)
    vlmfast calibration LOGITS [...]        calibration metrics of saved logits: a table, JSON and a PNG
    vlmfast demo [--out DIR]                the offline demo audit (``make demo``)
    vlmfast finetune --method M [--dor]     prompt tuning (base-to-new) or robust fine-tuning (ID / shifts)
    vlmfast audit rationality --models ...  PT / IR of explanation heatmaps against the digit masks
    vlmfast audit spurious --model M        RaVL discovery (clusters, Precision@10, gallery)
    vlmfast audit --manifest M --db F       every model x audit x split of a fleet into SQLite, resumable
    vlmfast finetune --plan P --out DIR     every run of a fine-tuning plan, resumable, then the fleet manifest
    vlmfast report DB --out DIR             static HTML report (and CSV / Parquet) of a fleet's SQLite store

Options are parsed once, here; each command module (``info``, ``calibration``, ``demo``, ``finetune``, ...) adds its
subparser and a ``run(args) -> int``. Every user error — bad options, unreadable files, invalid input, a forced backend
that cannot run, a missing extra — is one line on stderr, ``vlmfast <command>: error: ...``, and exit status 2.
A closed stdout (``vlmfast calibration run.npz | head -1``) ends the command quietly with status 0.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import NoReturn

from vlmfast.cli import audit as _audit
from vlmfast.cli import calibration as _calibration
from vlmfast.cli import demo as _demo
from vlmfast.cli import finetune as _finetune
from vlmfast.cli import info as _info
from vlmfast.cli import report as _report

#: What counts as a user error (one line, exit 2); anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, KeyError, OSError, ImportError)

BACKEND_HINT = "(run `vlmfast info` for every backend's reasons)"


class UsageError(Exception):
    """A command-line usage error, raised instead of argparse's print-usage-and-exit; ``prog`` is the (sub)command."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error()`` raises :class:`UsageError` instead of printing the usage."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self.prog, f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="vlmfast", description="Fast fine-tuning and auditing of CLIP-style vision-language models.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="{info,calibration,demo,finetune,audit,report}")
    _info.add_parser(sub)
    _calibration.add_parser(sub)
    _demo.add_parser(sub)
    _finetune.add_parser(sub)
    _audit.add_parser(sub)
    _report.add_parser(sub)
    return ap


def one_line(exc: BaseException) -> str:
    """A user error as one line. A :class:`~vlmfast.BackendError` keeps its first line (plus the forced backend's
    own reasons when the message lists them) and points at ``vlmfast info`` for the rest."""
    from vlmfast import BackendError

    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = exc.args[0]  # str(KeyError) would add quotes
    else:
        text = str(exc) or type(exc).__name__
    if isinstance(exc, BackendError):
        lines = text.splitlines() or [type(exc).__name__]
        head = re.sub(r"\s*Every backend:\s*$", "", lines[0]).rstrip(" .:")
        m = re.search(r"forced backend '([^']+)'", head)
        if m:
            own = [ln.strip()[len(m.group(1)) + 1:].strip() for ln in lines[1:]
                   if ln.strip().startswith(m.group(1) + ":")]
            if own:
                head += f": {own[0]}"
        return f"{head} {BACKEND_HINT}"
    return " ".join(text.split())


def _silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so that the interpreter's final flush stays quiet."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by a non-file object (tests)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    from vlmfast import BackendError

    argv = sys.argv[1:] if argv is None else list(argv)
    prog = "vlmfast"
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help / --version: argparse printed and exits
            sys.stdout.flush()
            return int(exc.code or 0)
        prog = f"vlmfast {args.command}"
        rc = int(args.run(args))
        sys.stdout.flush()
        return rc
    except BrokenPipeError:
        _silence_stdout()
        return 0
    except UsageError as exc:
        print(f"{exc.prog}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (BackendError, *USER_ERRORS) as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return 2


__all__ = ["USER_ERRORS", "build_parser", "main", "one_line"]
