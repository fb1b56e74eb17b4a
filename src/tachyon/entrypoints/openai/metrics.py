"""GET /metrics: Prometheus text, names shaped like vLLM's (``tachyon:`` for ``vllm:``).

Gauges and token counters are read at scrape time from the core's last ``CoreStats`` (every
step message carries one); latency histograms are fed on the event loop after every step the
API process sees. Each server has its own registry (no global state).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tachyon.engine.async_llm import AsyncLLM
from tachyon.engine.output_processor import IterationStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets: fine below 100 ms where GPU serving lives, coarse up to minutes for CPU.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
               1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class _EngineCollector(Collector):
    def __init__(self, llm: AsyncLLM) -> None:
        self.llm = llm

    def collect(self) -> Iterator[Metric]:
        s = self.llm.core_stats
        hit_rate = s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0
        for name, doc, value in (
            ("num_requests_running", "Sequences in the running batch.", s.num_running),
            ("num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting),
            ("kv_cache_usage_perc", "Fraction of KV blocks in use (1 = full).", s.kv_cache_usage),
            ("kv_cache_free_blocks", "KV blocks not held by any request.", s.num_free_blocks),
            ("kv_cache_total_blocks", "KV blocks in the pool.", s.num_blocks),
            ("prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / looked up.",
             hit_rate),
        ):
            yield GaugeMetricFamily(f"tachyon:{name}", doc, value=value)
        for name, doc, value in (
            ("prompt_tokens", "Prompt tokens received (times n).", self.llm.prompt_tokens),
            ("generation_tokens", "Tokens generated.", s.generation_tokens),
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             s.prefix_cache_queries),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.",
             s.prefix_cache_hits),
            ("num_preemptions", "Requests preempted for lack of KV blocks.", s.num_preemptions),
            ("engine_steps", "Steps the engine core ran.", s.num_steps),
            ("engine_step_seconds", "Wall time the engine core spent inside its steps.",
             s.step_seconds),
            ("engine_wait_seconds", "Of the step time: blocked on the device's results.",
             s.wait_seconds),
            ("engine_loop_seconds", "Wall time of the core loop's iterations that had work.",
             s.loop_seconds),
            ("engine_send_seconds", "Core loop time encoding and sending step outputs.",
             s.send_seconds),
            # Speculative decoding (0 without it); rendered with the _total suffix.
            ("spec_decode_num_draft_tokens", "Draft tokens proposed.", s.spec_draft_tokens),
            ("spec_decode_num_accepted_tokens", "Draft tokens the target accepted.",
             s.spec_accepted_tokens),
            ("spec_decode_num_drafts", "Verify passes (one per request and step).",
             s.spec_verifies),
        ):
            yield CounterMetricFamily(f"tachyon:{name}", doc, value=value)


class ServerMetrics:
    def __init__(self, llm: AsyncLLM) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(llm))
        self.ttft = Histogram("tachyon:time_to_first_token_seconds",
                              "Time from arrival to the first token.", buckets=TTFT_BUCKETS,
                              registry=self.registry)
        self.itl = Histogram("tachyon:inter_token_latency_seconds",
                             "Time between two tokens of one sequence.", buckets=ITL_BUCKETS,
                             registry=self.registry)
        self.e2e = Histogram("tachyon:e2e_request_latency_seconds",
                             "Time from arrival to the last token.", buckets=E2E_BUCKETS,
                             registry=self.registry)
        self.finished = Counter("tachyon:request_success", "Requests finished, per reason.",
                                ["finished_reason"], registry=self.registry)
        for reason in ("stop", "length", "abort"):
            self.finished.labels(reason)
        llm.add_stat_listener(self.observe)

    def observe(self, stats: IterationStats) -> None:
        """On the event loop, after a step."""
        for v in stats.time_to_first_token:
            self.ttft.observe(v)
        for v in stats.inter_token_latency:
            self.itl.observe(v)
        for v in stats.e2e_latency:
            self.e2e.observe(v)
        for reason in stats.finish_reasons:
            self.finished.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
