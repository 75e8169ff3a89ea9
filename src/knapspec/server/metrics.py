"""Prometheus metrics under the names users already scrape from vLLM, prefixed ``knapspec:``.

Every series carries the label ``model_name``. Definitions follow vLLM's:

* ``request_success_total{finished_reason}``: finished requests, ``stop`` | ``length`` | ``abort``
  (the client went away, or the server shut down before the request ran);
* ``prompt_tokens_total``, ``generation_tokens_total``: tokens of the requests that ran (the
  generated ones as counted in ``usage.completion_tokens``);
* histograms ``time_to_first_token_seconds`` (arrival to the first token), ``inter_token_latency_seconds``
  (one observation per decoding round after the first token: a round commits every accepted draft
  at once), ``e2e_request_latency_seconds`` (arrival to the last token), ``request_queue_time_seconds``
  (arrival to the start of decoding);
* gauges ``num_requests_running``, ``num_requests_waiting``;
* speculative decoding: ``spec_decode_num_drafts_total`` (rounds that verified a draft),
  ``spec_decode_num_draft_tokens_total``, ``spec_decode_num_accepted_tokens_total`` and
  ``spec_decode_num_accepted_tokens_per_pos_total{position}`` (drafts whose token at ``position``,
  from 0, was accepted).

Each server has its own registry (several may live in one process, as in the tests).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_P = "knapspec:"
# vLLM's buckets, with finer steps at the bottom where a CPU decoding round lands
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
               1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISH_REASONS = ("stop", "length", "abort")


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        m = ["model_name"]
        self._success = Counter(_P + "request_success", "Finished requests by finish reason.",
                                m + ["finished_reason"], registry=r)
        self.success = {f: self._success.labels(model_name, f) for f in FINISH_REASONS}
        self.prompt_tokens = Counter(_P + "prompt_tokens", "Prompt tokens processed.", m, registry=r).labels(model_name)
        self.generation_tokens = Counter(_P + "generation_tokens", "Tokens generated.", m,
                                         registry=r).labels(model_name)
        self.ttft = Histogram(_P + "time_to_first_token_seconds", "Arrival to the first token.", m,
                              buckets=TTFT_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram(_P + "inter_token_latency_seconds",
                             "Time between decoding rounds' outputs (a round commits its accepted drafts at once).",
                             m, buckets=ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram(_P + "e2e_request_latency_seconds", "Arrival to the last token.", m,
                             buckets=LATENCY_BUCKETS, registry=r).labels(model_name)
        self.queue_time = Histogram(_P + "request_queue_time_seconds", "Arrival to the start of decoding.", m,
                                    buckets=LATENCY_BUCKETS, registry=r).labels(model_name)
        self.running = Gauge(_P + "num_requests_running", "Requests decoding now.", m, registry=r).labels(model_name)
        self.waiting = Gauge(_P + "num_requests_waiting", "Requests waiting in the queue.", m,
                             registry=r).labels(model_name)
        self.drafts = Counter(_P + "spec_decode_num_drafts", "Decoding rounds that verified a draft.", m,
                              registry=r).labels(model_name)
        self.draft_tokens = Counter(_P + "spec_decode_num_draft_tokens", "Draft tokens verified.", m,
                                    registry=r).labels(model_name)
        self.accepted = Counter(_P + "spec_decode_num_accepted_tokens", "Draft tokens accepted.", m,
                                registry=r).labels(model_name)
        self._per_pos = Counter(_P + "spec_decode_num_accepted_tokens_per_pos",
                                "Drafts whose token at this position (from 0) was accepted.",
                                m + ["position"], registry=r)
        self._model = model_name
        self._pos: list = []

    def on_round(self, drafted: int, accepted: int) -> None:
        if drafted:
            self.drafts.inc()
            self.draft_tokens.inc(drafted)
        if accepted:
            self.accepted.inc(accepted)
            while len(self._pos) < accepted:
                self._pos.append(self._per_pos.labels(self._model, str(len(self._pos))))
            for c in self._pos[:accepted]:
                c.inc()

    def on_finish(self, reason: str, *, prompt_tokens: int = 0, generation_tokens: int = 0,
                  e2e: float | None = None) -> None:
        self.success[reason].inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generation_tokens)
        if e2e is not None:
            self.e2e.observe(e2e)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
