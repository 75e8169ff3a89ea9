"""Figures (matplotlib, Agg backend): latency profile fits. No decoding logic."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ..latency import LatencyModel


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


def _by_strategy(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r["strategy"], []).append(r)
    return out


def plot_speedup_vs_context(records: list[dict], out: str | Path) -> None:
    """Speedup over autoregressive vs prompt length, per strategy (median per context length)."""
    import numpy as np
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for s, rs in _by_strategy(records).items():
        if s == "autoregressive":
            continue
        ctxs = sorted({r["context"] for r in rs if r["speedup"]})
        ys = [float(np.median([r["speedup"] for r in rs if r["context"] == c and r["speedup"]])) for c in ctxs]
        ax.plot(ctxs, ys, "o-", label=s)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set(xscale="log", xlabel="prompt length (tokens)", ylabel="speedup over autoregressive (median)",
           title="speedup vs context length")
    ax.legend(fontsize=8)
    _save(fig, out)


def plot_skip_share(records: list[dict], out: str | Path, strategy: str = "knapspec") -> None:
    """Share of attention sublayers skipped and windowed, and of MLP sublayers skipped, by the
    plans used (rounds that drafted), vs prompt length."""
    import numpy as np
    rs = [r for r in records if r["strategy"] == strategy and r.get("attn_skip_share") is not None]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ctxs = sorted({r["context"] for r in rs})
    for key, label in (("attn_skip_share", "attention sublayers skipped"),
                       ("attn_window_share", "attention sublayers windowed"),
                       ("mlp_skip_share", "MLP sublayers skipped")):
        ax.plot(ctxs, [float(np.mean([r.get(key) or 0.0 for r in rs if r["context"] == c])) for c in ctxs], "o-",
                label=label)
    ax.set(xscale="log", xlabel="prompt length (tokens)", ylabel="share (drafting rounds)",
           title=f"{strategy}: what the plans skip and window", ylim=(0, 1))
    ax.legend(fontsize=8)
    _save(fig, out)


def plot_tpt(records: list[dict], out: str | Path, r_value: float | None = None) -> None:
    """Predicted tokens-per-time vs measured tokens/s, one point per run that predicts."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for s, rs in _by_strategy(records).items():
        pts = [(r["predicted_tps"], r["tokens_per_s"]) for r in rs if r.get("predicted_tps")]
        if pts:
            ax.plot([p for p, _ in pts], [m for _, m in pts], "o", label=s)
    lim = ax.get_xlim()
    ax.plot(lim, lim, "k--", lw=0.8, label="y = x")
    title = "predicted TPT vs measured"
    if r_value is not None:
        title += f" (Pearson r = {r_value:.3f})"
    ax.set(xlabel="predicted tokens/s", ylabel="measured tokens/s", title=title)
    ax.legend(fontsize=8)
    _save(fig, out)


def _save(fig, out: str | Path) -> None:
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
