"""Command line: ``knapspec generate | serve | profile | calibrate | bench {run,peers,serve,ar,verify,latency,tpt}``.

Wiring only: parse arguments, set up logging, call the library, print. User errors
(ValueError, FileNotFoundError) become one line on stderr and exit code 2, no traceback.
Each subcommand's arguments and handler live in its module (``generate.py``, ``serve.py``, ``bench.py``); the
options they share in ``options.py``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import bench, generate, serve
from .options import Parser

log = logging.getLogger("knapspec")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="knapspec", description="Lossless self-speculative decoding.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    generate.add_parsers(sub)
    serve.add_parsers(sub)
    bench.add_parsers(sub)
    return p


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "urllib3", "filelock", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    _setup_logging(a.verbose)
    try:
        return int(a.func(a))
    except (ValueError, FileNotFoundError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        sys.stderr.write(f"knapspec: error: {msg}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("knapspec: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
