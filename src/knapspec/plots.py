"""Figures (matplotlib, Agg backend): latency profile fits. No decoding logic."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .latency import LatencyModel


def plot_latency(lm: LatencyModel, out: str | Path) -> None:
    """Measured points and fits: attention vs context (a few layers), MLP per layer, lm_head."""
    p = lm.profile
    assert p is not None, "the latency model carries no raw profile to plot"
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    layers = sorted({0, lm.n_layers // 2, lm.n_layers - 1})
    xs = list(range(0, max(p.contexts) + 1, max(1, max(p.contexts) // 100)))
    for wi, w in enumerate(p.widths):
        for i in layers:
            if wi not in (0, len(p.widths) - 1):
                continue
            (ln,) = ax[0].plot(xs, [1e3 * lm.attn_time(i, x, w) for x in xs], "-", lw=1,
                               label=f"layer {i}, {w} token{'s' if w > 1 else ''}")
            ax[0].plot(p.contexts, [1e3 * v for v in p.attn[i][wi]], "o", ms=4, color=ln.get_color())
    ax[0].set(title="attention sublayer", xlabel="context length (tokens)", ylabel="ms")
    ax[0].legend(fontsize=7)
    for wi, w in enumerate(p.widths):
        ax[1].plot(range(lm.n_layers), [1e3 * lm.mlp[i][wi] for i in range(lm.n_layers)], "o-", ms=3,
                   label=f"{w} tokens")
    ax[1].set(title="MLP sublayer (median over contexts)", xlabel="layer", ylabel="ms")
    ax[1].legend(fontsize=7)
    for ci, c in enumerate(p.contexts):
        ax[2].plot(p.widths, [1e3 * p.head[wi][ci] for wi in range(len(p.widths))], "o", ms=3,
                   label=f"ctx {c}" if ci in (0, len(p.contexts) - 1) else None)
    ax[2].plot(p.widths, [1e3 * lm.head[wi] for wi in range(len(p.widths))], "k-", lw=1, label="fit")
    ax[2].set(title="final norm + lm_head", xlabel="tokens", ylabel="ms")
    ax[2].legend(fontsize=7)
    fig.suptitle(f"latency profile: {lm.key['device']} {lm.key['dtype']} {lm.key['threads']} threads; "
                 f"attention fit MAPE {100 * lm.fit_error.get('attention_mape', 0):.1f}%")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
