"""A real Kubernetes control plane on loopback for the kube tier (DESIGN.md §10).

Debian's etcd and a kube-apiserver 1.20.2 built from Debian's `kubernetes` source package by
scripts/kube-apiserver (cached outside the checkout; the first call builds it, which takes minutes) run as
child processes on 127.0.0.1 with ports chosen free: TLS with a self-signed serving certificate (openssl CLI,
SAN IP:127.0.0.1), a static admin token in group system:masters, RBAC authorization and service-account keys.
A kubeconfig for kubectl 1.20.2 (built from the same tree) is written next to them. With
`controller_manager=True` a kube-controller-manager 1.20.2 from the same tree runs too, with only the controllers
the tests need: owner-reference garbage collection, namespace deletion, service accounts and their tokens.

Use it as a unittest base class, one control plane per test file:

    class MyTest(kube_fixture.KubeTestCase):
        def test_something(self):
            self.kube.kubectl("get", "namespaces", check=True)

or by hand: `python3 tests/kube/kube_fixture.py [--controller-manager]` starts one and prints how to reach it until Ctrl-C.
Every wait has a deadline; a failure to start raises with the tail of the servers' logs. The servers
run in their own process groups, are killed as groups on stop, and die with this process (PR_SET_PDEATHSIG)
even when it is killed without a chance to clean up.
"""

import ctypes
import json
import os
import platform
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.error
import urllib.request

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(REPO_ROOT, "tests", "integration"))
from tandem_testlib import free_port  # noqa: E402  (ports below the ephemeral range, as tandem run picks)
KUBE_APISERVER_SCRIPT = os.path.join(REPO_ROOT, "scripts", "kube-apiserver")
ETCD = shutil.which("etcd", path="/usr/bin:/usr/sbin") or "/usr/bin/etcd"
OPERATOR_NAMESPACE, OPERATOR_ACCOUNT_NAME = "tandem-system", "tandem-operator"  # manifests/rbac
BUILD_TIMEOUT = 3600  # the first build of kube-apiserver on 2 loaded cores
START_TIMEOUT = 90
STOP_TIMEOUT = 15

_binaries = None


def kube_binaries():
    """(kube-apiserver, kubectl, kube-controller-manager) paths, building them first when the cache is empty
    (stderr shows progress)."""
    global _binaries
    if _binaries is None:
        paths = []
        for flag in ([], ["--kubectl"], ["--controller-manager"]):
            result = subprocess.run([KUBE_APISERVER_SCRIPT, *flag], stdout=subprocess.PIPE, stderr=None, text=True,
                                    timeout=BUILD_TIMEOUT)
            if result.returncode != 0:
                raise RuntimeError(f"scripts/kube-apiserver {' '.join(flag)} failed with exit code {result.returncode}")
            paths.append(result.stdout.strip().splitlines()[-1])
        _binaries = tuple(paths)
    return _binaries


def die_with_parent():
    """preexec_fn: own process group, and SIGKILL when the thread that started us goes away (Linux ties
    PR_SET_PDEATHSIG to the forking thread: the pod runner's processes die with its poll thread)."""
    os.setsid()
    signal.pthread_sigmask(signal.SIG_SETMASK, [])  # main() below blocks SIGINT/SIGTERM for sigwait
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def tail(path, lines=40):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as error:
        return f"({error})\n"


class ControlPlaneError(RuntimeError):
    pass


class ControlPlane:
    """etcd + kube-apiserver (+ kube-controller-manager when asked) on 127.0.0.1; start() and stop(), then
    kubectl() and request()."""

    def __init__(self, controller_manager=False, apiserver_args=()):
        self.apiserver_bin, self.kubectl_bin, self.controller_manager_bin = kube_binaries()
        self.with_controller_manager = controller_manager
        self.apiserver_args = list(apiserver_args)  # extra kube-apiserver flags (e.g. --watch-cache=false)
        self.tmp = tempfile.mkdtemp(prefix="tandem-kube-")
        self.token = "tandem-admin-" + os.urandom(12).hex()
        self.kubeconfig = os.path.join(self.tmp, "kubeconfig")
        # The operator's ServiceAccount (manifests/rbac), as a static token: an operator started with
        # operator_kubeconfig has exactly the RBAC we ship, once that is applied.
        self.operator_token = "tandem-operator-" + os.urandom(12).hex()
        self.operator_kubeconfig = os.path.join(self.tmp, "operator-kubeconfig")
        self.ca_file = os.path.join(self.tmp, "serving.crt")
        self.etcd_log = os.path.join(self.tmp, "etcd.log")
        self.apiserver_log = os.path.join(self.tmp, "kube-apiserver.log")
        self.controller_manager_log = os.path.join(self.tmp, "kube-controller-manager.log")
        self.etcd = None
        self.apiserver = None
        self.controller_manager = None
        self.server = None
        self._ssl = None

    # --- lifecycle ---------------------------------------------------------------------------------------

    def start(self):
        self._make_credentials()
        for attempt in range(3):  # a port chosen free can be taken before the server binds it
            try:
                self._start_etcd()
                self._start_apiserver()
                break
            except ControlPlaneError as error:
                in_use = "address already in use" in (tail(self.etcd_log, 200) + tail(self.apiserver_log, 200))
                self._stop_processes()
                if not in_use or attempt == 2:
                    raise ControlPlaneError(f"{error}\n{self.logs()}") from None
        self._write_kubeconfig()
        self._write_kubeconfig(self.operator_kubeconfig, self.operator_token)
        if self.with_controller_manager:
            try:
                self._start_controller_manager()
            except ControlPlaneError as error:
                self._stop_processes()
                raise ControlPlaneError(f"{error}\n{self.logs()}") from None
        return self

    def stop(self):
        self._stop_processes()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _stop_processes(self):
        for proc in (self.controller_manager, self.apiserver, self.etcd):
            if proc is None or proc.poll() is not None:
                continue
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=STOP_TIMEOUT)
        self.controller_manager = self.apiserver = self.etcd = None

    def logs(self, lines=40):
        text = (f"--- tail of {self.etcd_log}\n{tail(self.etcd_log, lines)}"
                f"--- tail of {self.apiserver_log}\n{tail(self.apiserver_log, lines)}")
        if self.with_controller_manager:
            text += f"--- tail of {self.controller_manager_log}\n{tail(self.controller_manager_log, lines)}"
        return text

    # --- setup steps -------------------------------------------------------------------------------------

    def _openssl(self, *args):
        result = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise ControlPlaneError(f"openssl {' '.join(args)} failed: {result.stderr}")

    def _make_credentials(self):
        key = os.path.join(self.tmp, "serving.key")
        self._openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                      "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", key, "-out", self.ca_file)
        self._openssl("genrsa", "-out", os.path.join(self.tmp, "sa.key"), "2048")
        self._openssl("rsa", "-in", os.path.join(self.tmp, "sa.key"), "-pubout", "-out", os.path.join(self.tmp, "sa.pub"))
        with open(os.path.join(self.tmp, "tokens.csv"), "w") as f:
            f.write(f'{self.token},tandem-admin,tandem-admin-uid,"system:masters"\n')
            f.write(f'{self.operator_token},system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_ACCOUNT_NAME},'
                    f'tandem-operator-uid,"system:serviceaccounts,system:serviceaccounts:{OPERATOR_NAMESPACE}"\n')
        self._ssl = ssl.create_default_context(cafile=self.ca_file)

    def _spawn(self, argv, log_path, env=None):
        log = open(log_path, "ab")
        try:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=env, preexec_fn=die_with_parent)
        finally:
            log.close()

    def _wait(self, what, proc, probe, timeout=START_TIMEOUT):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ControlPlaneError(f"{what} exited with code {proc.returncode} before it was ready")
            try:
                if probe():
                    return
            except (OSError, ValueError) as error:
                last = error
            time.sleep(0.2)
        raise ControlPlaneError(f"{what} not ready within {timeout} s (last probe error: {last})")

    def _start_etcd(self):
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        data_dir = tempfile.mkdtemp(prefix="etcd-", dir=self.tmp)
        env = dict(os.environ)
        if platform.machine() not in ("x86_64", "AMD64"):
            env["ETCD_UNSUPPORTED_ARCH"] = {"aarch64": "arm64"}.get(platform.machine(), platform.machine())
        self.etcd = self._spawn([
            ETCD, "--name", "tandem", "--data-dir", data_dir, "--logger", "zap",
            "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
            "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"tandem=http://127.0.0.1:{peer}",
        ], self.etcd_log, env)

        def healthy():
            with urllib.request.urlopen(self.etcd_url + "/health", timeout=2) as response:
                return json.load(response).get("health") == "true"
        self._wait("etcd", self.etcd, healthy)

    def _start_apiserver(self):
        port = free_port()
        self.server = f"https://127.0.0.1:{port}"
        p = lambda name: os.path.join(self.tmp, name)  # noqa: E731
        self.apiserver = self._spawn([
            self.apiserver_bin,
            f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1", f"--secure-port={port}", "--advertise-address=127.0.0.1", "--insecure-port=0",
            f"--cert-dir={p('certs')}", f"--tls-cert-file={self.ca_file}", f"--tls-private-key-file={p('serving.key')}",
            f"--token-auth-file={p('tokens.csv')}", "--authorization-mode=RBAC",
            f"--service-account-key-file={p('sa.pub')}", f"--service-account-signing-key-file={p('sa.key')}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range=10.96.0.0/16", "--allow-privileged=true", "--profiling=false",
            *self.apiserver_args,
        ], self.apiserver_log)

        def ready():
            status, body = self.request("GET", "/readyz", timeout=3, raw=True)
            return status == 200 and body.strip() == b"ok"
        self._wait("kube-apiserver", self.apiserver, ready)

    def _start_controller_manager(self):
        # Its own kubeconfig: the admin token, so it needs no RBAC bootstrap (and no per-controller
        # credentials). No ports of its own: nothing scrapes it, and port 0 keeps parallel planes apart.
        kubeconfig = os.path.join(self.tmp, "controller-manager.kubeconfig")
        self._write_kubeconfig(kubeconfig)
        self.controller_manager = self._spawn([
            self.controller_manager_bin, f"--kubeconfig={kubeconfig}",
            "--controllers=garbagecollector,namespace,serviceaccount,serviceaccount-token",
            f"--service-account-private-key-file={os.path.join(self.tmp, 'sa.key')}",
            f"--root-ca-file={self.ca_file}", "--leader-elect=false", "--use-service-account-credentials=false",
            "--bind-address=127.0.0.1", "--port=0", "--secure-port=0",
        ], self.controller_manager_log)

        # Ready when the serviceaccount controller made `default` in namespace default and the token controller
        # gave it its token Secret: 1.20's ServiceAccount admission refuses pods that would mount a missing token.
        def default_service_account():
            status, account = self.request("GET", "/api/v1/namespaces/default/serviceaccounts/default", timeout=3)
            return status == 200 and bool(account.get("secrets"))
        self._wait("kube-controller-manager", self.controller_manager, default_service_account)

    def _write_kubeconfig(self, path=None, token=None):
        # JSON is YAML: kubectl reads it as a kubeconfig.
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "tandem",
            "clusters": [{"name": "tandem", "cluster": {"server": self.server, "certificate-authority": self.ca_file}}],
            "users": [{"name": "tandem-admin", "user": {"token": token or self.token}}],
            "contexts": [{"name": "tandem", "context": {"cluster": "tandem", "user": "tandem-admin", "namespace": "default"}}],
        }
        with open(path or self.kubeconfig, "w") as f:
            json.dump(config, f, indent=2)

    # --- clients -----------------------------------------------------------------------------------------

    def kubectl(self, *args, input=None, timeout=60, check=False):
        """Runs kubectl 1.20.2 against this control plane; returns CompletedProcess (text)."""
        env = dict(os.environ, KUBECONFIG=self.kubeconfig, HOME=self.tmp)
        result = subprocess.run([self.kubectl_bin, f"--cache-dir={os.path.join(self.tmp, 'kubectl-cache')}", *args],
                                input=input, capture_output=True, text=True, timeout=timeout, env=env)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
        return result

    def request(self, method, path, body=None, content_type="application/json", timeout=30, raw=False):
        """One authenticated REST call; returns (HTTP status, parsed JSON body, or bytes when raw)."""
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self._ssl) as response:
                status, payload = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, payload = error.code, error.read()
        if raw:
            return status, payload
        return status, (json.loads(payload) if payload else None)


class KubeTestCase(unittest.TestCase):
    """A test class sharing one control plane (self.kube / cls.kube) across its tests; a class that sets
    controller_manager = True gets kube-controller-manager too (garbage collection, service accounts), and
    apiserver_args extra kube-apiserver flags."""

    kube = None
    controller_manager = False
    apiserver_args = ()

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        plane = ControlPlane(controller_manager=cls.controller_manager, apiserver_args=cls.apiserver_args)
        try:
            plane.start()
        except BaseException:
            plane.stop()
            raise
        cls.kube = plane

    @classmethod
    def tearDownClass(cls):
        if cls.kube is not None:
            cls.kube.stop()
            cls.kube = None
        super().tearDownClass()

    @classmethod
    def wait_for(cls, predicate, timeout, message, interval=0.2):
        """Polls predicate() until it returns a true value (returned); fails with the servers' logs after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                logs = cls.kube.logs(20) if cls.kube else ""
                raise cls.failureException(f"{message} (not within {timeout} s)\n{logs}")
            time.sleep(interval)


def main():
    plane = ControlPlane(controller_manager="--controller-manager" in sys.argv[1:])
    try:
        plane.start()
        print(f"kube-apiserver {plane.server} ready\nexport KUBECONFIG={plane.kubeconfig}\n"
              f"kubectl: {plane.kubectl_bin}\nlogs: {plane.etcd_log} {plane.apiserver_log}"
              f"{' ' + plane.controller_manager_log if plane.with_controller_manager else ''}\nCtrl-C stops it.", flush=True)
        signal.sigwait([signal.SIGINT, signal.SIGTERM])
    finally:
        plane.stop()


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT, signal.SIGTERM])
    sys.exit(main())
