"""``chatray serve status``: one screen per application, read from chatray's series on Ray's metrics system.

Replicas come from Serve (``serve.status()``); running/waiting, tokens/s and p50/p99 TTFT and ITL come from the
series of :mod:`chatray.serve.metrics`, from one of two sources:

* **Prometheus** (``--prometheus URL`` or ``CHATRAY_PROMETHEUS_URL``), when it answers: PromQL ``rate`` and
  ``histogram_quantile`` over the window (default 60 s);
* **two scrapes** of every node's Ray metrics endpoint, ``--window`` seconds apart (default 10 s, one Ray metrics
  report interval): counters and histogram buckets as differences between the two, quantiles interpolated inside
  the buckets as PromQL's ``histogram_quantile`` does (:func:`histogram_quantile`).

The screen says which source it used. Ray's agents refresh their values every ``metrics_report_interval_ms``
(10 s by default), so a window shorter than that mostly reads as no traffic.
"""

from __future__ import annotations

import math
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from chatray.errors import ChatrayError
from chatray.serve.metrics import SPECS

__all__ = ["AppStatus", "Sample", "StatusReport", "format_status", "histogram_quantile", "parse_metrics",
           "prometheus_window", "scrape_window", "serve_status"]

_TTFT, _ITL = SPECS["time_to_first_token_seconds"].exported, SPECS["inter_token_latency_seconds"].exported
_TOKENS = SPECS["generation_tokens"].exported
_RUNNING, _WAITING = SPECS["num_requests_running"].exported, SPECS["num_requests_waiting"].exported
_QUANTILES = (0.5, 0.99)


@dataclass(frozen=True)
class Sample:
    """One line of Prometheus' text format."""

    name: str
    labels: tuple[tuple[str, str], ...]
    value: float

    def label(self, key: str) -> str:
        return dict(self.labels).get(key, "")


@dataclass
class AppStatus:
    """One application: its Generator replicas and what its series say about the window."""

    application: str
    model: str = ""
    replicas: dict[str, int] = field(default_factory=dict)  # replica state -> count (Serve's)
    running: float | None = None
    waiting: float | None = None
    tokens_per_s: float | None = None
    ttft: tuple[float | None, float | None] = (None, None)  # p50, p99 seconds
    itl: tuple[float | None, float | None] = (None, None)


@dataclass
class StatusReport:
    """What ``chatray serve status`` prints: the source of the numbers, the window, one row per application."""

    source: str
    window_s: float
    apps: list[AppStatus]


_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str, prefix: str = "") -> list[Sample]:
    """The samples of a Prometheus text exposition whose names start with ``prefix``.

    Args:
        text: what a ``/metrics`` endpoint returned.
        prefix: keep only these names (parsing all of Ray's series is wasted work).

    Returns:
        The samples, label values unescaped.
    """
    out = []
    for line in text.splitlines():
        if not line.startswith(prefix) or line.startswith("#"):
            continue
        m = _LINE.match(line.strip())
        if m is None:
            continue
        labels = tuple(sorted((k, v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\"))
                              for k, v in _LABEL.findall(m.group(2) or "")))
        out.append(Sample(m.group(1), labels, float(m.group(3))))
    return out


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of a histogram, as PromQL's ``histogram_quantile`` computes it.

    Args:
        q: in [0, 1].
        buckets: (upper bound ``le``, cumulative count) pairs, ``+Inf`` included, in any order.

    Returns:
        Linear interpolation inside the bucket holding rank ``q * count`` (the first bucket starts at 0; a rank in
        the ``+Inf`` bucket gives the highest finite bound); None when the histogram holds no observation.
    """
    ordered = sorted(buckets)
    if not ordered or not math.isinf(ordered[-1][0]):
        return None
    # Cumulative counts summed from several series can dip by rounding: make them monotonic, as Prometheus does.
    counts, top = [], 0.0
    for _, c in ordered:
        top = max(top, c)
        counts.append(top)
    total = counts[-1]
    if total <= 0:
        return None
    rank = q * total
    i = next(i for i, c in enumerate(counts) if c >= rank)
    if math.isinf(ordered[i][0]):
        return ordered[-2][0] if len(ordered) > 1 else None
    upper = ordered[i][0]
    if i == 0 and upper <= 0:
        return upper
    lower, below = (ordered[i - 1][0], counts[i - 1]) if i > 0 else (0.0, 0.0)
    in_bucket = counts[i] - below
    return upper if in_bucket <= 0 else lower + (upper - lower) * (rank - below) / in_bucket


def _deltas(before: Sequence[Sample], after: Sequence[Sample]) -> list[Sample]:
    """``after - before`` per series; a series that is new, or whose count fell (a restarted replica), counts from 0."""
    old = {(s.name, s.labels): s.value for s in before}
    out = []
    for s in after:
        prev = old.get((s.name, s.labels))
        out.append(Sample(s.name, s.labels, s.value - prev if prev is not None and s.value >= prev else s.value))
    return out


def _quantiles(samples: Iterable[Sample], name: str) -> dict[str, tuple[float | None, float | None]]:
    buckets: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for s in samples:
        if s.name == name + "_bucket":
            buckets[s.label("application")][float(s.label("le"))] += s.value
    return {app: tuple(histogram_quantile(q, b.items()) for q in _QUANTILES) for app, b in buckets.items()}


def scrape_window(before: Sequence[Sample], after: Sequence[Sample], seconds: float) -> dict[str, AppStatus]:
    """Per application: the gauges of ``after`` and the counters' and histograms' change since ``before``.

    Args:
        before, after: chatray's samples from every node, ``seconds`` apart.
        seconds: the time between the scrapes.

    Returns:
        application -> its numbers (replicas left empty: they come from Serve).
    """
    apps: dict[str, AppStatus] = {}

    def app(s: Sample) -> AppStatus:
        name = s.label("application")
        status = apps.setdefault(name, AppStatus(name))
        status.model = status.model or s.label("model_name")
        return status

    for s in after:
        if s.name in (_RUNNING, _WAITING):
            a = app(s)
            attr = "running" if s.name == _RUNNING else "waiting"
            setattr(a, attr, (getattr(a, attr) or 0.0) + s.value)
    delta = _deltas(before, after)
    for s in delta:
        if s.name == _TOKENS:
            a = app(s)
            a.tokens_per_s = (a.tokens_per_s or 0.0) + s.value / seconds
    for attr, name in (("ttft", _TTFT), ("itl", _ITL)):
        for application, pair in _quantiles(delta, name).items():
            setattr(apps.setdefault(application, AppStatus(application)), attr, pair)
    return apps


def prometheus_window(url: str, seconds: float, timeout: float = 10.0) -> dict[str, AppStatus]:
    """Per application, the same numbers as :func:`scrape_window`, from PromQL over ``[seconds]``.

    Raises:
        ChatrayError: Prometheus did not answer or refused a query.
    """
    import httpx

    w = f"{max(1, round(seconds))}s"
    by = "sum by (application, model_name)"
    # (attribute, index in a (p50, p99) pair or None, PromQL)
    queries: list[tuple[str, int | None, str]] = [
        ("running", None, f"{by} ({_RUNNING})"),
        ("waiting", None, f"{by} ({_WAITING})"),
        ("tokens_per_s", None, f"{by} (rate({_TOKENS}[{w}]))"),
    ]
    for attr, name in (("ttft", _TTFT), ("itl", _ITL)):
        buckets = f"sum by (application, model_name, le) (rate({name}_bucket[{w}]))"
        queries += [(attr, i, f"histogram_quantile({q}, {buckets})") for i, q in enumerate(_QUANTILES)]
    apps: dict[str, AppStatus] = {}
    with httpx.Client(base_url=url.rstrip("/"), timeout=timeout) as client:
        for attr, index, query in queries:
            try:
                r = client.get("/api/v1/query", params={"query": query})
                r.raise_for_status()
                result = r.json()["data"]["result"]
            except (httpx.HTTPError, KeyError, TypeError, ValueError) as e:
                raise ChatrayError(f"Prometheus at {url} did not answer {query!r}: {e}",
                                   hint="check --prometheus, or leave it out to scrape Ray's endpoints") from None
            for row in result:
                labels, value = row["metric"], float(row["value"][1])
                name = labels.get("application", "")
                a = apps.setdefault(name, AppStatus(name))
                a.model = a.model or labels.get("model_name", "")
                v = None if math.isnan(value) else value
                if index is None:
                    setattr(a, attr, v)
                else:
                    pair = list(getattr(a, attr))
                    pair[index] = v
                    setattr(a, attr, tuple(pair))
    return apps


# ---------------------------------------------------------------------------------------------------------------
# Where the numbers come from (needs a Ray connection)


def _endpoints() -> list[str]:
    """``host:port`` of every alive node's metrics export port; this machine's node is reached on loopback."""
    import ray

    here = ray.util.get_node_ip_address()
    return [f"{'127.0.0.1' if n['NodeManagerAddress'] == here else n['NodeManagerAddress']}:{n['MetricsExportPort']}"
            for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")]


def _scrape(endpoints: Sequence[str], timeout: float = 10.0) -> list[Sample]:
    import httpx

    from chatray.serve.metrics import EXPORT_PREFIX, PREFIX

    samples = []
    for ep in endpoints:
        try:
            r = httpx.get(f"http://{ep}/metrics", timeout=timeout)
            r.raise_for_status()
        except httpx.HTTPError as e:
            raise ChatrayError(f"cannot read Ray's metrics endpoint {ep}: {e}",
                               hint="run it where the nodes are reachable, or pass --prometheus URL") from None
        samples += parse_metrics(r.text, EXPORT_PREFIX + PREFIX)
    return samples


def _replicas() -> dict[str, dict[str, int]]:
    """application -> its Generator's replica states (Serve's), for applications with a Generator."""
    from ray import serve

    try:
        status = serve.status()
    except Exception as e:  # noqa: BLE001 - Serve's errors vary across versions; one line either way
        raise ChatrayError(f"cannot read Serve's status: {type(e).__name__}: {e}",
                           hint="is Serve running on this cluster? (serve status)") from None
    return {name: dict(app.deployments["Generator"].replica_states)
            for name, app in status.applications.items() if "Generator" in app.deployments}


def serve_status(address: str | None = None, prometheus: str | None = None, window: float | None = None,
                 endpoints: Sequence[str] | None = None) -> StatusReport:
    """Gather one :class:`StatusReport`: Serve's replicas plus the window's numbers.

    Args:
        address: the Ray cluster (default ``RAY_ADDRESS``, else the one running on this machine).
        prometheus: a Prometheus server that scrapes the cluster; when it does not answer, the endpoints are
            scraped instead (and the report says so).
        window: seconds; default 60 with Prometheus, else 10 (one Ray metrics report interval).
        endpoints: ``host:port`` metrics endpoints to scrape (default: every alive node's, from Ray).

    Returns:
        The report.

    Raises:
        ChatrayError: no Ray to connect to, Serve not running, or an endpoint that cannot be read.
    """
    import os

    from chatray.rayenv import connect

    try:
        connect(address or os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=False, quiet=True)
    except ConnectionError as e:
        raise ChatrayError(f"cannot connect to Ray: {e}", hint="pass --address, or start a cluster (chatray up)") \
            from None
    replicas = _replicas()
    source, apps = "", None
    if prometheus:
        seconds = window or 60.0
        try:
            apps, source = prometheus_window(prometheus, seconds), f"Prometheus at {prometheus}"
        except ChatrayError as e:
            source = f"Prometheus unreachable ({str(e)[:80]}); "
    if apps is None:
        seconds = window or 10.0
        eps = list(endpoints) if endpoints is not None else _endpoints()
        before = _scrape(eps)
        t0 = time.monotonic()
        time.sleep(seconds)
        after = _scrape(eps)
        apps = scrape_window(before, after, time.monotonic() - t0)
        source += f"2 scrapes of {len(eps)} Ray metrics endpoint(s) {seconds:g} s apart"
    for name, states in replicas.items():
        apps.setdefault(name, AppStatus(name)).replicas = states
    return StatusReport(source, seconds, [apps[k] for k in sorted(apps)])


# ---------------------------------------------------------------------------------------------------------------
# The screen


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"


def format_status(report: StatusReport) -> str:
    """The report as a table, one row per application ("-": nothing in the window).

    Args:
        report: what :func:`serve_status` gathered.

    Returns:
        Text, a header line naming the source and window first.
    """
    head = ("APPLICATION", "MODEL", "REPLICAS", "RUNNING", "WAITING", "TOKENS/S", "TTFT P50", "TTFT P99", "ITL P50",
            "ITL P99")
    rows = [head]
    for a in report.apps:
        replicas = ", ".join(f"{n} {state}" for state, n in sorted(a.replicas.items())) or "-"
        rows.append((a.application or "-", a.model or "-", replicas, _num(a.running, ".0f"), _num(a.waiting, ".0f"),
                     _num(a.tokens_per_s, ".1f"), _ms(a.ttft[0]), _ms(a.ttft[1]), _ms(a.itl[0]), _ms(a.itl[1])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [f"chatray serve status: the last {report.window_s:g} s, from {report.source}", ""]
    for r in rows:  # text columns left-aligned, numbers right-aligned
        lines.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    if not report.apps:
        lines.append("(no chatray application on this cluster)")
    return "\n".join(lines).rstrip()
