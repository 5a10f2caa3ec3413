"""Server counters, rendered in the Prometheus text exposition format (version 0.0.4)."""

import threading
from collections import defaultdict

from .engine import trunk_passes

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PREFIX = "mlx_step35"


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = defaultdict(int)  # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.cached_tokens = 0  # of those, taken from the prompt cache (not prefilled)
        self.generation_tokens = 0
        self.trunk_passes = 0
        self.cancelled = 0
        self.ttft_buckets = [0] * len(TTFT_BUCKETS)
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.decode_tokens = 0  # tokens after the first of each request, and their time
        self.decode_seconds = 0.0
        self.last_decode_tps = 0.0
        self.drafted = []
        self.accepted = []

    def request(self, endpoint: str, status: int):
        with self.lock:
            self.requests[(endpoint, status)] += 1

    def first_token(self, seconds: float):
        with self.lock:
            self.ttft_sum += seconds
            self.ttft_count += 1
            for i, b in enumerate(TTFT_BUCKETS):
                if seconds <= b:
                    self.ttft_buckets[i] += 1

    def finished(self, done):
        s = done.stats
        with self.lock:
            self.prompt_tokens += done.prompt_tokens
            self.cached_tokens += done.cached_tokens
            self.generation_tokens += done.completion_tokens
            self.cancelled += done.finish_reason == "cancelled"
            self.trunk_passes += trunk_passes(s, done.completion_tokens)
            if done.completion_tokens > 1 and done.decode_s > 0:
                self.decode_tokens += done.completion_tokens - 1
                self.decode_seconds += done.decode_s
                self.last_decode_tps = (done.completion_tokens - 1) / done.decode_s
            for d, (n, a) in enumerate(zip(s.drafted, s.accepted)):
                while len(self.drafted) <= d:
                    self.drafted.append(0)
                    self.accepted.append(0)
                self.drafted[d] += n
                self.accepted[d] += a

    def render(self, queue_depth: int, running: int, batch_sizes=None) -> str:
        out = []

        def metric(name, kind, help_, samples):
            out.append(f"# HELP {PREFIX}_{name} {help_}")
            out.append(f"# TYPE {PREFIX}_{name} {kind}")
            for labels, value in samples:
                lab = "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else ""
                out.append(f"{PREFIX}_{name}{lab} {value}")

        with self.lock:
            metric(
                "requests_total",
                "counter",
                "HTTP requests answered, by endpoint and status.",
                [((("endpoint", e), ("status", s)), n) for (e, s), n in sorted(self.requests.items())],
            )
            metric("prompt_tokens_total", "counter", "Prompt tokens processed.", [((), self.prompt_tokens)])
            metric(
                "prompt_tokens_cached_total",
                "counter",
                "Prompt tokens taken from the prompt cache instead of prefilled.",
                [((), self.cached_tokens)],
            )
            metric("generation_tokens_total", "counter", "Tokens generated.", [((), self.generation_tokens)])
            metric(
                "trunk_passes_total",
                "counter",
                "Trunk forward passes while decoding.",
                [((), self.trunk_passes)],
            )
            metric(
                "cancelled_total", "counter", "Generations cancelled by a disconnect.", [((), self.cancelled)]
            )
            cum = [((("le", str(b)),), c) for b, c in zip(TTFT_BUCKETS, self.ttft_buckets)]
            metric(
                "time_to_first_token_seconds",
                "histogram",
                "From the start of a job (after queueing) to its first token.",
                cum + [((("le", "+Inf"),), self.ttft_count)],
            )
            out.append(f"{PREFIX}_time_to_first_token_seconds_sum {self.ttft_sum}")
            out.append(f"{PREFIX}_time_to_first_token_seconds_count {self.ttft_count}")
            metric(
                "decode_tokens_total",
                "counter",
                "Tokens after each request's first.",
                [((), self.decode_tokens)],
            )
            metric(
                "decode_seconds_total", "counter", "Time spent producing them.", [((), self.decode_seconds)]
            )
            metric(
                "decode_tokens_per_second",
                "gauge",
                "Decode speed of the last finished request.",
                [((), self.last_decode_tps)],
            )
            depth = [((("depth", str(d + 1)),), n) for d, n in enumerate(self.drafted)]
            metric("mtp_drafted_total", "counter", "MTP draft tokens proposed, by depth.", depth)
            depth = [((("depth", str(d + 1)),), n) for d, n in enumerate(self.accepted)]
            metric("mtp_accepted_total", "counter", "MTP draft tokens accepted, by depth.", depth)
        metric("queue_depth", "gauge", "Requests waiting for the generation thread.", [((), queue_depth)])
        metric("requests_running", "gauge", "Requests being generated (rows of the batch).", [((), running)])
        sizes = sorted((batch_sizes or {}).items())
        metric(
            "batch_passes_total",
            "counter",
            "Trunk passes of the batch engine, by the rows (requests) each carried.",
            [((("rows", str(k)),), n) for k, n in sizes],
        )
        return "\n".join(out) + "\n"
