"""The gateway's own Prometheus metrics (``GET /metrics``): requests, tokens, latency.

One registry per gateway (no module-level state), so tests and several apps in a process
do not share counters.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# Per-token latencies of a small model on a CPU are milliseconds; a volunteer swarm over a
# WAN can take seconds.
TOKEN_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class GatewayMetrics:
    def __init__(self) -> None:
        disable_created_metrics()  # as the nodes' and the coordinator's: no ``_created`` series
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "nanoshard_api_requests",
            "HTTP requests answered, by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "nanoshard_api_prompt_tokens", "prompt tokens sent to the swarm", registry=r
        )
        self.completion_tokens = Counter(
            "nanoshard_api_completion_tokens", "tokens the swarm generated", registry=r
        )
        self.first_token = Histogram(
            "nanoshard_api_time_to_first_token_seconds",
            "from the request to its first token (route, session, prefill)",
            buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0),
            registry=r,
        )
        self.token = Histogram(
            "nanoshard_api_token_seconds",
            "time between two tokens of one generation",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.active = Gauge(
            "nanoshard_api_generations_active", "generations running on the swarm", registry=r
        )
        self.recoveries = Counter(
            "nanoshard_api_recoveries",
            "failures generations survived (repair, reroute, retry)",
            ["kind"],
            registry=r,
        )
        self.failures = Counter(
            "nanoshard_api_generations_failed",
            "generations that ended in an error, by its kind (a stream's after its 200)",
            ["error"],
            registry=r,
        )
        self.disconnects = Counter(
            "nanoshard_api_disconnects",
            "streams whose client left before the end (their sessions closed)",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
