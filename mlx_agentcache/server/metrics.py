"""Prometheus text for `GET /metrics`: requests, TTFT, tokens, cache hits by
tier, bytes restored, restore time and how much of it was hidden behind other
agents' decoding, hot bytes against the budget.

"Hidden" restore time is the part of a warm agent's cache read during which
at least one other turn was generating tokens: the engine was busy with
useful work instead of waiting for the disk.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TIERS = ("hot", "warm", "cold")


def _union_overlap(a: float, b: float, spans: list[tuple[float, float]]) -> float:
    """Length of [a, b] covered by the union of `spans`."""
    covered, cursor = 0.0, a
    for s, e in sorted(spans):
        s, e = max(s, cursor), min(e, b)
        if e > s:
            covered += e - s
            cursor = e
    return covered


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter = Counter()  # (route, status) -> n
        self.turns: Counter = Counter()  # tier -> n
        self.cancelled = 0
        self.failed = 0
        self.tokens: Counter = Counter()  # prompt, cached, prefilled, generated
        self.ttft: dict[str, list[int]] = {t: [0] * (len(TTFT_BUCKETS) + 1) for t in TIERS}
        self.ttft_sum: Counter = Counter()
        self.bytes_restored = 0
        self.restore_s = 0.0
        self.restore_hidden_s = 0.0
        self.rate_limited = 0
        self.save_failures = 0  # saves that failed: at the end of a turn, or when retried
        self.save_retries = 0  # rounds of writing unsaved agents again
        self.connections_refused = 0  # over max_connections (connections.py)
        self.connections_timed_out = 0  # no complete request head in time
        self._decoding: deque[tuple[float, float]] = deque(maxlen=512)  # finished turns' decode spans

    def request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] += 1

    def turn(self, stats, t_submit: float, bytes_read: int, live_spans: list[tuple[float, float]]) -> None:
        """Account one finished turn. Times are perf_counter seconds; `live_spans`
        are the decode spans of turns still running."""
        with self._lock:
            tier = stats.tier if stats.tier in TIERS else "cold"
            self.turns[tier] += 1
            self.cancelled += bool(stats.cancelled)
            self.tokens["prompt"] += stats.restored_tokens + stats.prefilled_tokens
            self.tokens["cached"] += stats.restored_tokens
            self.tokens["prefilled"] += stats.prefilled_tokens
            self.tokens["generated"] += stats.generated_tokens
            if stats.generated_tokens:
                ttft = stats.ttft_ms / 1000
                i = next((i for i, b in enumerate(TTFT_BUCKETS) if ttft <= b), len(TTFT_BUCKETS))
                self.ttft[tier][i] += 1
                self.ttft_sum[tier] += ttft
                first = t_submit + ttft
                self._decoding.append((first, t_submit + stats.total_ms / 1000))
            if tier == "warm":
                self.bytes_restored += bytes_read
                load = stats.load_ms / 1000
                admitted = t_submit + stats.queue_ms / 1000
                self.restore_s += load
                self.restore_hidden_s += _union_overlap(admitted - load, admitted, list(self._decoding)[:-1] + live_spans)

    def render(self, memory: dict | None, inflight: int, loaded: bool, unsaved: int = 0) -> str:
        out = []

        def metric(name, kind, help_, samples):
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            for labels, v in samples:
                lab = "{" + ",".join(f'{k}="{val}"' for k, val in labels.items()) + "}" if labels else ""
                out.append(f"{name}{lab} {v}")

        with self._lock:
            metric("agentcache_requests_total", "counter", "HTTP requests by route and status.",
                   [({"route": r, "status": str(s)}, n) for (r, s), n in sorted(self.requests.items())])
            metric("agentcache_turns_total", "counter", "Model turns by the tier their cache came from.", [({"tier": t}, self.turns[t]) for t in TIERS])
            metric("agentcache_turns_cancelled_total", "counter", "Turns cancelled (client gone or stop sequence).", [({}, self.cancelled)])
            metric("agentcache_cache_hits_total", "counter", "Turns that reused a cache, by tier (cold: nothing cached).", [({"tier": t}, self.turns[t]) for t in TIERS])
            metric("agentcache_tokens_total", "counter", "Tokens: prompt (cached + prefilled), cached, prefilled, generated.",
                   [({"kind": k}, self.tokens[k]) for k in ("prompt", "cached", "prefilled", "generated")])
            samples = []
            for t in TIERS:
                acc = 0
                for b, n in zip(TTFT_BUCKETS, self.ttft[t]):
                    acc += n
                    samples.append(({"tier": t, "le": str(b)}, acc))
                acc += self.ttft[t][-1]
                samples.append(({"tier": t, "le": "+Inf"}, acc))
            out.append("# HELP agentcache_ttft_seconds Submit to first token, by cache tier.")
            out.append("# TYPE agentcache_ttft_seconds histogram")
            for labels, v in samples:
                out.append(f'agentcache_ttft_seconds_bucket{{tier="{labels["tier"]}",le="{labels["le"]}"}} {v}')
            for t in TIERS:
                out.append(f'agentcache_ttft_seconds_sum{{tier="{t}"}} {self.ttft_sum[t]:.6f}')
                out.append(f'agentcache_ttft_seconds_count{{tier="{t}"}} {sum(self.ttft[t])}')
            metric("agentcache_bytes_restored_total", "counter", "Cache file bytes read to restore warm agents.", [({}, self.bytes_restored)])
            metric("agentcache_restore_seconds_total", "counter", "Time spent reading warm caches.", [({}, f"{self.restore_s:.6f}")])
            metric("agentcache_restore_hidden_seconds_total", "counter", "Part of the restore time during which other turns were decoding.",
                   [({}, f"{self.restore_hidden_s:.6f}")])
            metric("agentcache_rate_limited_total", "counter", "Requests answered 429.", [({}, self.rate_limited)])
        metric("agentcache_inflight_requests", "gauge", "Model requests being served now.", [({}, inflight)])
        metric("agentcache_model_loaded", "gauge", "1 once the model is loaded.", [({}, int(loaded))])
        metric("agentcache_save_failures_total", "counter", "Saves that failed (at the end of a turn or when retried).", [({}, self.save_failures)])
        metric("agentcache_save_retries_total", "counter", "Rounds of writing unsaved agents again.", [({}, self.save_retries)])
        metric("agentcache_connections_refused_total", "counter", "Connections answered 503 and closed: over --max-connections.", [({}, self.connections_refused)])
        metric("agentcache_connections_timed_out_total", "counter", "Connections closed for not sending a request head within --header-timeout.",
               [({}, self.connections_timed_out)])
        metric("agentcache_unsaved_agents", "gauge", "Agents whose memory is newer than their files (retried until saved).", [({}, unsaved)])
        if memory:
            metric("agentcache_hot_bytes", "gauge", "Memory held by hot agent caches.", [({}, memory["hot_bytes"])])
            metric("agentcache_budget_bytes", "gauge", "Memory budget for hot caches.", [({}, memory["budget_bytes"] or 0)])
            metric("agentcache_hot_bytes_peak", "gauge", "Most memory the pool ever accounted for.", [({}, memory["peak_hot_bytes"])])
            metric("agentcache_over_budget_total", "counter", "Times the budget could not be kept (nothing evictable; warned).", [({}, memory["over_budget"])])
            metric("agentcache_hot_agents", "gauge", "Agents whose cache is in memory.", [({}, memory["hot_agents"])])
            metric("agentcache_pinned_agents", "gauge", "Agents pinned in memory.", [({}, len(memory["pinned"]))])
            metric("agentcache_evictions_total", "counter", "Caches written out and dropped from memory.", [({}, memory["evictions"])])
            metric("agentcache_pool_bytes_read_total", "counter", "Bytes read by the pool (files and shared prefixes).", [({}, memory["bytes_read"])])
            metric("agentcache_pool_bytes_written_total", "counter", "Bytes written by the pool.", [({}, memory["bytes_written"])])
        return "\n".join(out) + "\n"


def now() -> float:
    return time.perf_counter()
