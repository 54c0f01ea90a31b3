"""Real Prometheus (Debian's `prometheus`) scrapes a `tandem run` of the example, then every PromQL
expression of the Grafana dashboard is evaluated through Prometheus' HTTP API. Worker panels must return data;
a worker expression naming a metric the workers do not export returns nothing and fails the test. The
Operator row's expressions may name only DESIGN.md §8 operator metrics and must parse and evaluate in this
Prometheus; with no operator scraped here their result is empty, which is accepted."""

import json
import os
import re
import shutil
import signal
import subprocess
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request

from tandem_testlib import TANDEM, TempDirTest, free_port, wait_for

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
DASHBOARD = os.path.join(ROOT, "charts", "tandem", "dashboards", "tandem-training.json")
DESIGN_WORKER_METRICS = {
    "tandem_step_seconds", "tandem_samples_total", "tandem_tokens_total", "tandem_loss", "tandem_eval_accuracy",
    "tandem_learning_rate", "tandem_allreduce_seconds", "tandem_allreduce_bytes_total", "tandem_pipeline_bubble_ratio",
    "tandem_checkpoint_seconds", "tandem_checkpoint_bytes_total", "tandem_restarts_total", "tandem_gpu_memory_bytes"}
DESIGN_OPERATOR_METRICS = {
    "tandem_operator_reconcile_seconds", "tandem_operator_jobs", "tandem_operator_pods_created_total",
    "tandem_operator_job_restarts_total", "tandem_operator_workqueue_depth"}
OPERATOR_ROW = "Operator"


def get_json(url, timeout=10):
    """The JSON body, also of an error answer (Prometheus explains a bad query in a 400's body)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        return json.loads(error.read())


def metric_names(expression):
    """The metric names an expression uses, histogram and summary suffixes removed."""
    return {re.sub(r"_(bucket|sum|count)$", "", name) for name in re.findall(r"\btandem_[a-z_]+", expression)}


def dashboard_expressions():
    """(row title, panel title, expression) of every target; a row holds the panels that follow it."""
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    row = None
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
        for target in panel.get("targets", []):
            yield row, panel["title"], target["expr"]


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
        self.assertTrue(series, f"prometheus never scraped the workers: {targets}")
        at = min(float(s["values"][-1][0]) for s in series) - 1.0

        exported = set()
        for name in get_json(base + "/api/v1/label/__name__/values")["data"]:
            exported.add(re.sub(r"_(bucket|sum|count)$", "", name))
        checked = {"worker": 0, "operator": 0}
        for row, title, expression in dashboard_expressions():
            names = metric_names(expression)
            self.assertTrue(names, f"{title}: names no tandem metric")
            query = (expression.replace("$__rate_interval", "5s").replace('"$job"', '"default/fmnist"')
                     .replace('"$rank"', '".*"'))
            answer = get_json(base + "/api/v1/query?" + urllib.parse.urlencode({"query": query, "time": at}))
            self.assertEqual(answer["status"], "success", f"{title}: {query}: {answer.get('error')}")
            if row == OPERATOR_ROW:
                # No operator runs here: the query must parse and evaluate; an empty result is expected.
                self.assertLessEqual(names, DESIGN_OPERATOR_METRICS, f"{title}: not DESIGN.md §8 operator metrics")
                checked["operator"] += 1
                continue
            for name in names:
                self.assertIn(name, DESIGN_WORKER_METRICS, f"{title}: {name} is not a DESIGN.md §8 worker metric")
                self.assertIn(name, exported, f"{title}: {name} is not exported by the workers")
            self.assertTrue(answer["data"]["result"], f"{title}: no data for {query}")
            checked["worker"] += 1
        print(f"{checked['worker']} worker dashboard expressions returned data, "
              f"{checked['operator']} operator expressions parsed")
        self.assertGreaterEqual(checked["worker"], 14)
        self.assertGreaterEqual(checked["operator"], 6)

    def test_operator_row_covers_every_operator_metric(self):
        used = set()
        for row, _, expression in dashboard_expressions():
            if row == OPERATOR_ROW:
                used |= metric_names(expression)
        self.assertEqual(used, DESIGN_OPERATOR_METRICS)


if __name__ == "__main__":
    unittest.main()
