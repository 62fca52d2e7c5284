"""A real Prometheus server for tests: Debian's `prometheus` binary on 127.0.0.1, its own
temp storage, stopped by PID. Used from inside a PID namespace scenario (see
tests/test_prometheus.py), so the kernel also ends it if the scenario dies.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = os.path.join(ROOT, "examples", "prometheus", "memwatchd.rules.yml")
RULE_TESTS = os.path.join(ROOT, "examples", "prometheus", "memwatchd.rules.test.yml")
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rules_with_short_for(path: str, duration: str) -> str:
    """The shipped rules with every `for:` replaced by `duration`: the same expressions,
    thresholds and labels, but pending alerts fire within a test's seconds."""
    with open(RULES) as f:
        text, n = re.subn(r"^(\s+for:) \S+$", r"\1 " + duration, f.read(), flags=re.M)
    assert n, "no for: in the rules?"
    with open(path, "w") as f:
        f.write(text)
    return path


def start_prometheus(workdir: str, scrape: str, rules: str, labels: dict = None,
                     interval: str = "1s"):
    """Prometheus scraping `scrape` (host:port) as job "memwatchd" every `interval`,
    evaluating `rules` as often. Returns (Popen, port); its log is workdir/prometheus.log."""
    port = free_port()
    config = os.path.join(workdir, "prometheus.yml")
    with open(config, "w") as f:
        f.write(f"""global:
  scrape_interval: {interval}
  scrape_timeout: {interval}
  evaluation_interval: {interval}
rule_files: ["{rules}"]
scrape_configs:
  - job_name: memwatchd
    static_configs:
      - targets: ["{scrape}"]
        labels: {json.dumps(labels or {})}
""")
    log = open(os.path.join(workdir, "prometheus.log"), "w")
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
         f"--storage.tsdb.path={os.path.join(workdir, 'tsdb')}", "--log.level=warn"],
        stdout=log, stderr=log, cwd=workdir)
    return proc, port


def stop_prometheus(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def api(port: int, path: str, **params):
    """GET /api/v1/<path> from the server's own HTTP API; its "data", or None if not up."""
    url = f"http://127.0.0.1:{port}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
    except (OSError, ValueError):
        return None
    return body.get("data") if body.get("status") == "success" else None


def alerts(port: int, name: str, state: str = "firing") -> list:
    """Active alerts called `name` in `state` (pending or firing), per /api/v1/alerts."""
    data = api(port, "alerts") or {}
    return [a for a in data.get("alerts", ()) if a["labels"].get("alertname") == name
            and a["state"] == state]

