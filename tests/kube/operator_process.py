"""tandem-operator as a separate process against a test control plane (tests/kube).

    op = OperatorProcess(plane, "--leader-elect", name="a").start()
    op.wait_ready()          # /readyz answers ok (informers synced)
    op.log()                 # everything it wrote
    op.kill(signal.SIGKILL)  # or op.stop() for a graceful SIGTERM, returning the exit code
"""

import os
import re
import signal
import subprocess
import time
import urllib.request

from kube_fixture import die_with_parent

BIN_DIR = os.environ.get("TANDEM_BIN_DIR",
                         os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "build", "bin"))
OPERATOR = os.path.join(BIN_DIR, "tandem-operator")



class OperatorProcess:
    def __init__(self, plane, *args, name="operator", kubeconfig=None):
        self.plane = plane
        self.kubeconfig = kubeconfig or plane.kubeconfig  # the admin's unless given
        self.args = list(args)
        self.name = name
        self.log_path = os.path.join(plane.tmp, f"{name}.log")
        self.proc = None
        self._port = None

    def start(self):
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [OPERATOR, f"--kubeconfig={self.kubeconfig}", "--metrics-address=127.0.0.1", "--metrics-port=0",
                 f"--identity={self.name}", *self.args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        finally:
            log.close()
        self._port = None
        return self

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def port(self, timeout=30):
        deadline = time.monotonic() + timeout
        while self._port is None:
            found = re.findall(r"serving /metrics, /healthz, /readyz on 127\.0\.0\.1:(\d+)", self.log())
            if found:
                self._port = int(found[-1])
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not report its port:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        return self._port

    def get(self, path):
        """(HTTP status, body text) of the operator's own HTTP server."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port()}{path}", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def wait_ready(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{self.name} not ready within {timeout} s:\n{self.log()[-3000:]}")

    def metric(self, name, labels=""):
        """The value of one sample from /metrics (labels: the exact '{...}' text, or '')."""
        _, text = self.get("/metrics")
        for line in text.splitlines():
            if line.startswith(name + labels + " "):
                return float(line.split()[-1])
        raise AssertionError(f"no sample {name}{labels} in:\n{text}")

    def kill(self, sig=signal.SIGKILL):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout=30):
        """SIGTERM, then the exit code (SIGKILL after `timeout`)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def rss_bytes(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def cpu_seconds(self):
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
