"""Real Prometheus (Debian's `prometheus`) scrapes a `tandem run` of the example, then every PromQL
expression of the Grafana dashboard is evaluated through Prometheus' HTTP API and must return data; a
dashboard expression naming a metric the workers do not export returns nothing and fails the test."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import unittest
import urllib.parse
import urllib.request

from tandem_testlib import TANDEM, TempDirTest, wait_for

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
DASHBOARD = os.path.join(ROOT, "charts", "tandem", "dashboards", "tandem-training.json")
DESIGN_WORKER_METRICS = {
    "tandem_step_seconds", "tandem_samples_total", "tandem_tokens_total", "tandem_loss", "tandem_eval_accuracy",
    "tandem_learning_rate", "tandem_allreduce_seconds", "tandem_allreduce_bytes_total", "tandem_pipeline_bubble_ratio",
    "tandem_checkpoint_seconds", "tandem_checkpoint_bytes_total", "tandem_restarts_total", "tandem_gpu_memory_bytes"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def dashboard_expressions():
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


class DashboardAgainstPrometheus(TempDirTest):
    def test_every_dashboard_expression_returns_data(self):
        prometheus = shutil.which("prometheus")
        self.assertIsNotNone(prometheus, "Debian's prometheus package is installed by scripts/setup")
        with open(os.path.join(ROOT, "manifests", "examples", "fashion-mnist.yaml")) as f:
            example = f.read()
        config = self.write("job.yaml", example.replace("  runPolicy:", f"  checkpoint: {{dir: {self.tmp}/ckpt, everySteps: 100, keep: 2}}\n  runPolicy:"))
        run = subprocess.Popen([TANDEM, "run", config, "--max-steps", "2400", "--quiet"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.addCleanup(lambda: run.poll() is None and os.killpg(run.pid, signal.SIGKILL))
        ports = []
        while len(ports) < 2:
            line = run.stderr.readline()
            self.assertTrue(line, "tandem run ended before printing its metrics ports")
            match = re.search(r"rank \d+ metrics at http://127\.0\.0\.1:(\d+)/metrics", line)
            if match:
                ports.append(int(match.group(1)))

        web = free_port()
        scrape_config = self.write("prometheus.yml", f"""global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: tandem-workers
    honor_labels: true
    static_configs: [{{targets: [{", ".join(f"'127.0.0.1:{p}'" for p in ports)}]}}]
""")
        log = open(os.path.join(self.tmp, "prometheus.log"), "w")
        self.addCleanup(log.close)
        server = subprocess.Popen([prometheus, f"--config.file={scrape_config}", f"--storage.tsdb.path={self.tmp}/tsdb",
                                   f"--web.listen-address=127.0.0.1:{web}"], stdout=subprocess.DEVNULL, stderr=log,
                                  start_new_session=True)
        self.addCleanup(lambda: (server.poll() is None and os.killpg(server.pid, signal.SIGTERM), server.wait()))
        base = f"http://127.0.0.1:{web}"

        def ready():
            try:
                return urllib.request.urlopen(base + "/-/ready", timeout=1).status == 200
            except OSError:
                return False
        self.assertTrue(wait_for(ready, 30), "prometheus did not become ready")
        out, err = run.communicate(timeout=300)
        self.assertEqual(run.returncode, 0, err[-3000:])
        time.sleep(1.5)  # one more scrape interval

        # The newest scrape of the run: query a moment before the workers exited.
        targets = get_json(base + "/api/v1/targets")["data"]["activeTargets"]
        self.assertEqual(len(targets), 2)
        now = time.time()
        series = get_json(base + "/api/v1/query_range?" + urllib.parse.urlencode(
            {"query": "tandem_step_seconds_count", "start": now - 300, "end": now, "step": 1}))["data"]["result"]
        self.assertTrue(series, "prometheus never scraped the workers")
        at = min(float(s["values"][-1][0]) for s in series) - 1.0

        exported = set()
        for name in get_json(base + "/api/v1/label/__name__/values")["data"]:
            exported.add(re.sub(r"_(bucket|sum|count)$", "", name))
        checked = 0
        for title, expression in dashboard_expressions():
            for name in re.findall(r"\btandem_[a-z_]+", expression):
                base_name = re.sub(r"_(bucket|sum|count)$", "", name)
                self.assertIn(base_name, DESIGN_WORKER_METRICS, f"{title}: {name} is not a DESIGN.md §8 worker metric")
                self.assertIn(base_name, exported, f"{title}: {name} is not exported by the workers")
            query = (expression.replace("$__rate_interval", "5s").replace('"$job"', '"default/fmnist"')
                     .replace('"$rank"', '".*"'))
            answer = get_json(base + "/api/v1/query?" + urllib.parse.urlencode({"query": query, "time": at}))
            self.assertEqual(answer["status"], "success", f"{title}: {query}")
            self.assertTrue(answer["data"]["result"], f"{title}: no data for {query}")
            checked += 1
        print(f"{checked} dashboard expressions returned data")
        self.assertGreaterEqual(checked, 14)


if __name__ == "__main__":
    unittest.main()
