"""Helpers for the integration tier: where the binaries are, manifests written to temp dirs, running
`tandem` and `tandem-worker` as real processes with deadlines, and reading dumped parameters."""

import array
import math
import os
import random
import signal
import socket
import subprocess
import tempfile
import time
import unittest

BIN_DIR = os.environ.get("TANDEM_BIN_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "build", "bin"))
TANDEM = os.path.join(BIN_DIR, "tandem")
WORKER = os.path.join(BIN_DIR, "tandem-worker")
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

_ports_handed_out = set()


def free_port():
    """A TCP port free on every IPv4 address, for a server (etcd, kube-apiserver, Prometheus) started moments
    later. Drawn below the kernel's ephemeral range, as `tandem run` draws its workers' ports: a port bind(0)
    picks comes from that range and any outgoing connection (etcd's clients, Gloo, another test) may take it
    before the server binds."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            below = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        below = 32768
    candidates = [random.randrange(10000, below) for _ in range(200)] if below >= 11000 else []
    for port in candidates + [0]:
        if port in _ports_handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            port = s.getsockname()[1]
        _ports_handed_out.add(port)
        return port
    raise OSError("no free TCP port")


def manifest(name="itest", workers=1, hidden=(256, 128), data_kind="fashion-mnist",
             data_path=FASHION_MNIST, samples=None, global_batch=256, epochs=1, seed=1, lr=1e-3,
             optimizer="adamw", extra_spec="", eval_every=0):
    """A DistributedTrainingJob manifest as YAML text."""
    data = f"kind: {data_kind}, path: {data_path}"
    if samples is not None:
        data += f", samples: {samples}"
    return f"""apiVersion: tandem.dev/v1alpha1
kind: DistributedTrainingJob
metadata:
  name: {name}
spec:
  workers: {workers}
  model:
    kind: mlp
    mlp: {{hidden: [{", ".join(str(h) for h in hidden)}], activation: relu}}
  data: {{{data}}}
  optimizer: {{kind: {optimizer}, lr: {lr}}}
  training: {{globalBatchSize: {global_batch}, epochs: {epochs}, seed: {seed}, evalEvery: {eval_every}}}
{extra_spec}"""


class TempDirTest(unittest.TestCase):
    """A test with its own temporary directory, removed afterwards."""

    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="tandem-itest-")
        self.tmp = self._tmp.name

    def tearDown(self):
        self._tmp.cleanup()

    def write(self, name, text):
        path = os.path.join(self.tmp, name)
        with open(path, "w") as f:
            f.write(text)
        return path


def custom_manifest(script, workers=2, restart_policy="Never"):
    """Custom mode: every worker runs `python3 -c script`."""
    return f"""apiVersion: tandem.dev/v1alpha1
kind: DistributedTrainingJob
metadata: {{name: custom}}
spec:
  workers: {workers}
  runPolicy: {{restartPolicy: {restart_policy}}}
  template:
    spec:
      containers:
        - name: worker
          command: [/usr/bin/python3, -c]
          args: [{script!r}]
"""


def run(args, timeout=300, env=None, **kwargs):
    """Runs a command to completion; returns CompletedProcess with text stdout/stderr."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=full_env, **kwargs)


def tandem(*args, timeout=600, env=None):
    return run([TANDEM, *args], timeout=timeout, env=env)


def read_floats(path):
    values = array.array("f")
    with open(path, "rb") as f:
        values.frombytes(f.read())
    return values


def relative_error(a, b):
    """||a - b||_2 / ||b||_2 and the largest element-wise |a - b|."""
    assert len(a) == len(b), (len(a), len(b))
    diff = math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))
    norm = math.sqrt(sum(y * y for y in b))
    return diff / norm, max(abs(x - y) for x, y in zip(a, b))


def worker_pids():
    """PIDs of every running tandem-worker process on this machine."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0")[0]
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if argv0.endswith(b"tandem-worker") and state != "Z":
            pids.append(int(entry))
    return pids


def children_of(pid):
    """Direct child PIDs of pid."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def rank_of(pid):
    """TANDEM_RANK of a running worker, read from its environment (-1 if it has none)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for entry in f.read().split(b"\0"):
                if entry.startswith(b"TANDEM_RANK="):
                    return int(entry.split(b"=", 1)[1])
    except OSError:
        pass
    return -1


def wait_for(predicate, timeout, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def kill_quietly(pid, sig=signal.SIGKILL):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
