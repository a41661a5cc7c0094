"""Which metric names exist, which ones a PromQL expression uses, and whether promtool parses it.

Known names come from two kinds of source:
- lists copied from references, with their source in each file's header (tests/support/data/*.txt):
  vLLM 0.33 (docs/reference/vllm.md#metrics), dcgm-exporter's counters CSVs,
  kube-state-metrics' docs;
- the real exporters, run here on loopback (Debian's prometheus-nginx-exporter,
  prometheus-redis-exporter and prometheus-node-exporter, against a real nginx with
  stub_status and a real redis-server) and scraped once.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import yaml

from tests.support.local import free_port, stop

DATA = Path(__file__).resolve().parent / "data"
REFERENCE_FILES = (
    "vllm_metrics.txt",
    "dcgm_metrics.txt",
    "kube_state_metrics.txt",
    "vision_metrics.txt",
    "gateway_metrics.txt",
)
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
STARTUP_SECONDS = 10.0

# PromQL words that are neither metric names nor followed by "(" when used.
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})
# Clauses whose parenthesised argument is a list of label names, not an expression.
_LABEL_LISTS = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def reference_names(file_name: str) -> set[str]:
    """Exposed names listed in a data file (`<name> <type>` lines; histograms expanded)."""
    names: set[str] = set()
    for line in (DATA / file_name).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, kind = line.split()
        suffixes = HISTOGRAM_SUFFIXES if kind == "histogram" else ("",)
        names |= {name + s for s in suffixes}
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords and label names excluded)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery durations
    text = _LABEL_LISTS.sub(" ", text)
    found: set[str] = set()
    # Not preceded by a digit or dot: "5m" in `offset 5m` is a duration, not a name.
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group()
        is_call = text[match.end() :].lstrip().startswith("(")
        if not is_call and word.lower() not in _KEYWORDS:
            found.add(word)
    return found


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *map(str, args)], check=False, capture_output=True, text=True, timeout=60
    )


def check_queries(queries: Sequence[str], directory: Path) -> subprocess.CompletedProcess[str]:
    """`promtool check rules` on the queries as recording rules: Prometheus' own parser."""
    rules = [{"record": f"query:{i}", "expr": q} for i, q in enumerate(queries)]
    path = directory / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    return promtool("check", "rules", path)


def scrape(port: int, path: str = "/metrics") -> str:
    """GET a loopback endpoint, retrying while the server starts (bounded in time)."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                return r.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def exposed_names(text: str) -> set[str]:
    """Metric names in a Prometheus text exposition."""
    return {
        re.split(r"[{\s]", line, maxsplit=1)[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def declared_names(text: str) -> set[str]:
    """Metric names a Prometheus text exposition has samples or a `# TYPE` line for."""
    typed = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    return typed | exposed_names(text)


def wait_tcp(port: int) -> None:
    """Wait until something accepts connections on a loopback port (bounded in time)."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextmanager
def process(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[None]:
    """Run a server as a foreground child until the block ends; always stop and reap it."""
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield
    finally:
        stop(proc, timeout=5)


def _nginx_conf(tmp: Path, port: int) -> Path:
    temp = " ".join(
        f"{kind}_temp_path {tmp / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"daemon off; worker_processes 1; pid {tmp / 'nginx.pid'}; error_log {tmp / 'error.log'};\n"
        "events { worker_connections 64; }\n"
        f"http {{ access_log off; {temp}\n"
        f"  server {{ listen 127.0.0.1:{port}; location = /stub_status {{ stub_status; }} }} }}\n"
    )
    return conf


def exporter_names(tmp: Path) -> dict[str, set[str]]:
    """Start nginx + nginx exporter, redis + redis exporter and node exporter; scrape each once."""
    ports = {
        key: free_port()
        for key in ("nginx", "nginx-exporter", "redis", "redis-exporter", "node-exporter")
    }
    servers = {
        "nginx": ["nginx", "-c", str(_nginx_conf(tmp, ports["nginx"])), "-p", str(tmp)],
        "redis": [
            "redis-server", "--bind", "127.0.0.1", "--port", str(ports["redis"]), "--save", "",
            "--appendonly", "no", "--maxmemory", "1mb", "--dir", str(tmp),
        ],
    }  # fmt: skip
    exporters = {
        "nginx-exporter": [
            "prometheus-nginx-exporter",
            f"-nginx.scrape-uri=http://127.0.0.1:{ports['nginx']}/stub_status",
            f"-web.listen-address=127.0.0.1:{ports['nginx-exporter']}",
        ],
        "redis-exporter": [
            "prometheus-redis-exporter",
            f"-redis.addr=redis://127.0.0.1:{ports['redis']}",
            f"-web.listen-address=127.0.0.1:{ports['redis-exporter']}",
        ],
        "node-exporter": [
            "prometheus-node-exporter", "--collector.disable-defaults", "--collector.timex",
            f"--web.listen-address=127.0.0.1:{ports['node-exporter']}",
        ],
    }  # fmt: skip
    with ExitStack() as stack:
        for key, args in servers.items():
            stack.enter_context(process(args, tmp / f"{key}.log"))
        # The nginx exporter exits when nginx does not answer at start; the Redis exporter
        # reports only redis_up 0 while Redis is down.
        scrape(ports["nginx"], "/stub_status")
        wait_tcp(ports["redis"])
        for key, args in exporters.items():
            stack.enter_context(process(args, tmp / f"{key}.log"))
        return {
            key: exposed_names(scrape(ports[key]))
            for key in ("nginx-exporter", "redis-exporter", "node-exporter")
        }
