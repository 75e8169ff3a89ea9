"""Benchmarks: commands, not tests. Everything is measured side by side in one process,
interleaved, after warm-up, and reported as medians and ratios.

* ``timing``     synchronised timers, bandwidth, decode rates, lockstep rounds, a frozen collector
* ``components`` ``bench ar | verify | latency | tpt``: the engine's parts against references
* ``harness``    ``bench run``: strategies side by side on real prompts, outputs checked
* ``report``     tables and headline figures from the per-run records
* ``plots``      the figures

No decoding logic lives here.
"""

from .components import (
    alpha_from_mean_accepted,
    bench_ar,
    bench_latency,
    bench_prefill,
    bench_tpt,
    bench_verify,
    context_ids,
)
from .harness import (
    INTERLEAVE,
    classify_mismatch,
    expand_datasets,
    near_tie_tolerance,
    parse_variant,
    repeat_share,
    run_record,
    run_side_by_side,
)
from .report import category_table, geomean, headline, ints, markdown_table, pearson, summarize, table
from .timing import balanced_orders, decode_rate, frozen_gc, lockstep, measure_bandwidth, sync, timed, turn_orders

__all__ = [
    "INTERLEAVE",
    "alpha_from_mean_accepted",
    "balanced_orders",
    "bench_ar",
    "bench_latency",
    "bench_prefill",
    "bench_tpt",
    "bench_verify",
    "category_table",
    "classify_mismatch",
    "context_ids",
    "decode_rate",
    "expand_datasets",
    "frozen_gc",
    "geomean",
    "headline",
    "ints",
    "lockstep",
    "markdown_table",
    "measure_bandwidth",
    "near_tie_tolerance",
    "parse_variant",
    "pearson",
    "repeat_share",
    "run_record",
    "run_side_by_side",
    "summarize",
    "sync",
    "table",
    "timed",
    "turn_orders",
]
