"""KNN-SSD (arXiv 2505.16162): a skip set per input domain, picked by the nearest cluster.

Offline (``calibrate``): every calibration prompt is embedded as the mean of the full model's last
hidden state (after the final norm) over its tokens, L2-normalised; scikit-learn's k-means groups
the embeddings; for each cluster a skip set with a fixed skip ratio is searched (random search
alternating with optuna's Bayesian optimisation, as in SWIFT) to maximise the mean matchness on the
cluster's prompts. Centroids and skip sets are saved to a JSON file.

Online (:class:`KNNSSDStrategy`): the engine hands the strategy the same embedding of the new
prompt, computed during prefill at no extra forward; the nearest centroid's skip set drafts every
round (SWIFT-style drafting: confidence early stop 0.8, up to ``d_max`` drafts).

Differences from the paper: the paper assigns each *generation step* by its last hidden state to a
cluster (a k-NN over token-level samples); here the assignment is per prompt, as the method's
overview describes it, which keeps a single plan per generation.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import numpy as np
import torch

from ..model import Model, rms_norm
from ..plan import Plan
from . import search as _search
from .base import REGISTRY, Draft, RoundState, Strategy
from .search import SkipSearch, load_calibration, prompt_scorer, skippable


def prompt_embedding(model: Model, ids: list[int], chunk: int = 512) -> np.ndarray:
    """Mean final-norm hidden state over the prompt (what the engine computes during prefill)."""
    from ..engine import prefill
    cache = model.new_cache(len(ids) + 1)
    parts: list[torch.Tensor] = []

    def add(out) -> None:
        parts.append(rms_norm(out.last_hidden[0], model.final_norm, model.cfg.rms_norm_eps).float().sum(0))
    with torch.inference_mode():
        prefill(model, ids, cache, chunk=chunk, logits=False, on_chunk=add)
    return (torch.stack(parts).sum(0) / len(ids)).cpu().numpy()


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class KNNSSDStrategy(Strategy):
    name = "knn-ssd"
    wants_prompt_embedding = True

    def __init__(self, centroids: np.ndarray, plans: list[Plan], *, d_max: int = 25,
                 threshold: float | None = 0.8) -> None:
        centroids = np.asarray(centroids, dtype=np.float64)
        if centroids.ndim != 2 or len(centroids) != len(plans) or not plans:
            raise ValueError("KNN-SSD needs one skip set per centroid")
        if d_max < 1:
            raise ValueError(f"max draft length must be >= 1, got {d_max}")
        self.centroids, self.plans = _normalise(centroids), plans
        self.d_max, self.threshold = d_max, threshold
        self.cluster: int | None = None
        self.used: Counter[int] = Counter()

    def nearest(self, embedding: np.ndarray | torch.Tensor) -> int:
        from sklearn.metrics import pairwise_distances_argmin
        e = embedding.detach().float().cpu().numpy() if isinstance(embedding, torch.Tensor) else embedding
        if e.shape[-1] != self.centroids.shape[1]:
            raise ValueError(f"prompt embedding has {e.shape[-1]} dimensions, the centroids "
                             f"{self.centroids.shape[1]}: the calibration is for another model")
        return int(pairwise_distances_argmin(_normalise(e)[None], self.centroids)[0])

    def start(self, state: RoundState) -> None:
        if state.prompt_embedding is None:
            raise RuntimeError("the engine did not compute the prompt embedding KNN-SSD asks for")
        self.cluster = self.nearest(state.prompt_embedding)
        self.used[self.cluster] += 1

    def propose(self, state: RoundState) -> Draft:
        assert self.cluster is not None
        plan = self.plans[self.cluster]
        return Draft(plan=plan, max_len=self.d_max, threshold=self.threshold, source=f"cluster{self.cluster}")

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "cluster": self.cluster,
                "plan": None if self.cluster is None else str(self.plans[self.cluster]),
                "clusters_used": dict(self.used)}


def calibrate(llm, prompts: list[tuple[str, list[int]]], *, clusters: int = 4, trials: int = 48,
              skip_ratio: float = 0.45, window: int = 32, batch: int = 8, per_cluster: int = 8, seed: int = 0,
              out=None, progress: bool = True) -> dict[str, Any]:
    """Cluster the (label, token ids) prompts and search a skip set per cluster; save and return
    the record (see the module docstring)."""
    from sklearn.cluster import KMeans
    from tqdm.auto import tqdm
    if len(prompts) < 2:
        raise ValueError("knn-ssd calibration needs at least two prompts")
    if clusters < 1:
        raise ValueError(f"clusters must be >= 1, got {clusters}")
    if not 0.0 < skip_ratio < 1.0:
        raise ValueError(f"skip ratio must be in (0, 1), got {skip_ratio}")
    model: Model = llm.model
    n = model.cfg.n_layers
    t0 = time.perf_counter()
    emb = np.stack([prompt_embedding(model, ids)
                    for _, ids in tqdm(prompts, desc="embedding prompts", disable=not progress, leave=False)])
    k = min(clusters, len(prompts))
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(_normalise(emb))
    skip_count = max(1, min(len(skippable(n)), round(skip_ratio * 2 * n)))
    rows = []
    for c in range(k):
        members = [i for i, lab in enumerate(km.labels_) if lab == c]
        scorers = [prompt_scorer(model, prompts[i][1], window) for i in members[:per_cluster]]

        def objective(plans: list[Plan], scorers=scorers) -> list[float]:
            return np.mean([s.score(plans) for s in scorers], axis=0).tolist()

        search = SkipSearch(n, skip_count=skip_count, bo_every=2, seed=seed + c)
        best = search.run(objective, trials, batch=batch, progress=f"cluster {c + 1}/{k}" if progress else None)
        rows.append({"skip": str(best), "matchness": round(search.best_value, 4), "size": len(members),
                     "labels": dict(Counter(prompts[i][0] for i in members))})
    record = {"centroids": km.cluster_centers_.round(6).tolist(), "clusters": rows, "skip_ratio": skip_ratio,
              "window": window, "trials": trials, "n_prompts": len(prompts),
              "seconds": round(time.perf_counter() - t0, 1)}
    path = _search.save_calibration(out or _search.default_calibration_path("knn-ssd", model), "knn-ssd",
                                    model, record)
    record["path"] = str(path)
    return record


@REGISTRY.register("knn-ssd", options=("calibration",))
def _knn_ssd(model: Model, *, calibration: str | None = None, max_draft: int | None = None,
             threshold: float | None = None, **_: Any) -> Strategy:
    doc, path = load_calibration(calibration, "knn-ssd", model)
    try:
        plans = [Plan.parse(str(c["skip"]), model.cfg.n_layers) for c in doc["clusters"]]
        centroids = np.asarray(doc["centroids"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"calibration file {path} is malformed ({e}); re-run knapspec calibrate") from None
    return KNNSSDStrategy(centroids, plans, d_max=max_draft or 25, threshold=0.8 if threshold is None else threshold)
