"""``/metrics`` (Prometheus text format, a registry of its own) and the live figures of ``nak api``."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import Engine


class Metrics:
    """Counters for ``/metrics`` (prometheus_client registry of its own) and the dashboard."""

    def __init__(self, engine: Engine) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("nak_requests", "HTTP API requests", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("nak_prompt_tokens", "Prompt tokens received", registry=r)
        self.reused_tokens = Counter("nak_prompt_tokens_reused", "Prompt tokens whose KV cache was reused", registry=r)
        self.completion_tokens = Counter("nak_completion_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("nak_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.decode_tps = Gauge("nak_decode_tokens_per_second", "Decode speed of the last generation", registry=r)
        self.sessions = Gauge("nak_sessions_active", "Generations in progress", registry=r)
        self.errors = Counter("nak_stage_errors", "Errors by stage", ["stage"], registry=r)
        stage_g = {k: Gauge(f"nak_stage_{k}", d, ["stage", "layers"], registry=r) for k, d in (
            ("up", "1 when the stage answers"), ("sessions", "Sessions open on the stage"),
            ("queue_depth", "Requests waiting at the stage"), ("kv_tokens_used", "KV cells in use"),
            ("rss_bytes", "Resident memory of the stage process, bytes"),
            ("rss_anon_bytes", "Memory only the stage holds (weight copies, KV, buffers), bytes"),
            ("rss_file_bytes", "File-backed resident memory of the stage (its mmap'd slice; reclaimable), bytes"))}
        self.stage_gauges = stage_g
        self.engine = engine

    def scrape(self) -> bytes:
        from prometheus_client import generate_latest

        for s in self.engine.cluster()["stages"]:
            lab = (s["address"], s.get("layers", ""))
            h = s.get("health") or {}
            self.stage_gauges["up"].labels(*lab).set(1 if s["up"] else 0)
            if h:
                self.stage_gauges["sessions"].labels(*lab).set(h["sessions_active"])
                self.stage_gauges["queue_depth"].labels(*lab).set(h["queue_depth"])
                self.stage_gauges["kv_tokens_used"].labels(*lab).set(h["kv_tokens_used"])
                self.stage_gauges["rss_bytes"].labels(*lab).set(h["rss_bytes"])
                self.stage_gauges["rss_anon_bytes"].labels(*lab).set(h.get("rss_anon_bytes", 0))
                self.stage_gauges["rss_file_bytes"].labels(*lab).set(h.get("rss_file_bytes", 0))
        return generate_latest(self.registry)
