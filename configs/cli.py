"""The command-line shape every module shares: `--config FILE key.sub=value ...`.

`run(main, description)` parses that, loads the config and calls `main(config)`. A `UserError`
(bad config, missing file, mismatched cache, ...), a full disk or a path fault (PATH_FAULTS)
ends with one line on stderr and exit code 2; Ctrl-C ends with exit code 130 after `main` has
kept what was complete. Before anything is computed, the CPU's matrix library is asked for
reproducible rounding (see `reproducible_cpu_math`).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path
from typing import Callable, Iterator

from configs import CONFIG_DIR, Config, UserError, load_config

DEFAULT_CONFIG = CONFIG_DIR / "demo.yaml"
PATH_FAULTS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ELOOP,
               errno.ENAMETOOLONG}
"""OSErrors a path the user gave or owns can cause (no permission, read-only, a file where a
folder belongs or the reverse, a symlink loop): one `error:` line naming the path, exit 2.
Other OSErrors stay tracebacks: they are bugs until shown otherwise."""


def parse(description: str, argv: list[str] | None = None,
          extra: Callable[[argparse.ArgumentParser], None] | None = None):
    """Parse `--config FILE` plus dotted overrides; returns (config, parsed args)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help=f"experiment YAML (default: {DEFAULT_CONFIG.name})")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="override config keys, e.g. student.lr=3e-4 run_dir=/tmp/x")
    if extra:
        extra(parser)
    args = parser.parse_args(argv)
    return load_config(Path(args.config), args.overrides), args


def run(main: Callable[..., object], description: str, argv: list[str] | None = None,
        extra: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """Entry point of a `python -m` module: parse, run, and turn user errors into exit code 2."""
    reproducible_cpu_math()

    def body():
        config, args = parse(description, argv, extra)
        return main(config, args) if extra else main(config)
    exit_on_user_error(body)


def teacher_option(parser: argparse.ArgumentParser) -> None:
    """`--teacher NAME` of the modules that make or cache teachers (`make ... TEACHER=NAME`)."""
    parser.add_argument("--teacher", default="", metavar="NAME",
                        help="only the teacher NAME of the config's `teachers:` (default: all)")


def chosen_teachers(cfg: Config, args: argparse.Namespace) -> Iterator[Config]:
    """The views of `cfg` for `--teacher` (or every teacher in turn), each announced with a
    line when the config has several."""
    for view in cfg.each_teacher(args.teacher):
        if len(cfg.teachers) > 1:
            print(f"--- teacher {view.teacher.name}", flush=True)
        yield view


def reproducible_cpu_math() -> None:
    """Ask MKL, torch's CPU BLAS, for strict conditional numerical reproducibility, unless the
    user set MKL_CBWR: without it a matmul may round differently with its operands' memory
    alignment or the threads MKL picks, so a resumed or two-rank logits job (or a resumed student)
    could differ in last bits from an uninterrupted one. MKL reads the setting at its first call,
    so this must run before any computation. It changes no bit of a logit cache and costs no
    speed, but it does round some training matmuls differently (a teacher trained with it
    differs in its last bits; docs/log.md). On a GPU it does nothing."""
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


def exit_on_user_error(body: Callable[[], object]) -> None:
    try:
        body()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            where = f" {exc.filename}" if exc.filename else ""
            print(f"error: disk full while writing{where}: free space and rerun the same "
                  "command; finished work is kept", file=sys.stderr)
        elif exc.errno in PATH_FAULTS and exc.filename:
            print(f"error: {exc.filename}: {exc.strerror}: fix it and rerun the same command; "
                  "finished work is kept", file=sys.stderr)
        else:
            raise
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: finished work is kept; rerun the same command to resume",
              file=sys.stderr)
        sys.exit(130)


__all__ = ["Config", "parse", "run", "exit_on_user_error", "reproducible_cpu_math"]
