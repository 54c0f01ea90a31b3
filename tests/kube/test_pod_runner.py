"""The pod runner (pod_runner.py) against a real control plane: environment, exit codes, volumes, deletion
with SIGTERM, cluster-DNS-like names and persistent claims, as the operator tests will rely on them."""

import base64
import json
import os
import re
import shutil
import signal
import tempfile
import time
import unittest

import kube_fixture
from pod_runner import PodRunner

NS = "default"
PODS = f"/api/v1/namespaces/{NS}/pods"
SECRETS = f"/api/v1/namespaces/{NS}/secrets"
CONFIGMAPS = f"/api/v1/namespaces/{NS}/configmaps"
TIMEOUT = 30


def pod_manifest(name, command, args=None, **spec):
    container = {"name": "main", "image": "tandem/test:none", "command": command}
    if args is not None:
        container["args"] = args
    for field in ("env", "volumeMounts", "workingDir"):
        if field in spec:
            container[field] = spec.pop(field)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS},
            "spec": {"restartPolicy": "Never", "containers": [container], **spec}}


class PodRunnerTest(kube_fixture.KubeTestCase):
    controller_manager = True  # pods need the default ServiceAccount and its token

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        bin_dir = os.environ.get("TANDEM_BIN_DIR")
        cls.runner = PodRunner(cls.kube, bin_dirs=[bin_dir] if bin_dir else []).start()

    @classmethod
    def tearDownClass(cls):
        cls.runner.stop()
        super().tearDownClass()

    def tearDown(self):
        self.runner.check()

    # --- helpers -----------------------------------------------------------------------------------------

    def create(self, path, manifest):
        status, body = self.kube.request("POST", path, manifest)
        self.assertEqual(status, 201, f"POST {path}: {body}")
        return body

    def temporary_directory(self, prefix):
        path = tempfile.mkdtemp(prefix=prefix)
        self.addCleanup(shutil.rmtree, path, True)
        return path

    def get_pod(self, name):
        status, body = self.kube.request("GET", f"{PODS}/{name}")
        return body if status == 200 else None

    def wait_phase(self, name, phases, timeout=TIMEOUT):
        def reached():
            pod = self.get_pod(name)
            return pod if pod and pod.get("status", {}).get("phase") in phases else None
        return self.wait_for(reached, timeout,
                             f"pod {name} not in phase {phases}; runner log:\n{kube_fixture.tail(self.runner.runner_log)}"
                             f"pod log:\n{self.runner.log_of(NS, name)}")

    def wait_gone(self, name, timeout=TIMEOUT):
        self.wait_for(lambda: self.get_pod(name) is None, timeout, f"pod {name} still exists")

    def delete_pod(self, name, grace):
        status, body = self.kube.request("DELETE", f"{PODS}/{name}", {"gracePeriodSeconds": grace})
        self.assertIn(status, (200, 202), body)

    # --- tests -------------------------------------------------------------------------------------------

    def test_env_exit_code_secret_and_config_map_volume(self):
        self.create(f"/api/v1/namespaces/{NS}/secrets", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "env-secret"},
            "data": {"token": base64.b64encode(b"s3cret").decode()}})
        self.create(CONFIGMAPS, {
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "env-config"},
            "data": {"job.yaml": "workers: 2\n", "other": "x"}})
        mount = os.path.join(self.temporary_directory("tandem-runner-test-"), "config")
        # /proc/self/environ: the environment as exec'd, before Python's own locale coercion adds LC_CTYPE.
        script = ("import json, os, sys\n"
                  "env = dict(e.split('=', 1) for e in open('/proc/self/environ').read().split('\\0') if e)\n"
                  "print('ENV=' + json.dumps(env, sort_keys=True))\n"
                  f"print('FILE=' + open({mount!r} + '/job.yaml').read().strip())\n"
                  "print('CWD=' + os.getcwd())\n"
                  "print('ARGS=' + json.dumps(sys.argv[1:]))\n"
                  "print('UNAME=' + os.uname().nodename)\n"
                  "sys.exit(3)\n")
        self.create(PODS, pod_manifest(
            "env-printer", ["python3", "-c"], [script, "$(MY_NAME)"], workingDir="/tmp",
            env=[{"name": "TANDEM_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                 {"name": "MY_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                 {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "env-secret", "key": "token"}}},
                 {"name": "GREETING", "value": "hi-$(MY_NAME)-$(UNKNOWN)"}],
            volumeMounts=[{"name": "config", "mountPath": mount, "readOnly": True}],
            volumes=[{"name": "config", "configMap": {"name": "env-config"}}]))

        pod = self.wait_phase("env-printer", ("Failed", "Succeeded"))
        self.assertEqual(pod["status"]["phase"], "Failed")
        state = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        self.assertEqual((state["exitCode"], state["reason"]), (3, "Error"))
        self.assertEqual(pod["spec"]["nodeName"], "tandem-runner")
        ip = pod["status"]["podIP"]
        self.assertRegex(ip, r"^127\.0\.0\.\d+$")

        log = self.runner.log_of(NS, "env-printer")
        env = json.loads(re.search(r"^ENV=(.*)$", log, re.M).group(1))
        self.assertEqual(sorted(env), ["GREETING", "HOME", "HOSTNAME", "MY_NAME", "PATH", "TANDEM_POD_IP", "TOKEN"])
        self.assertEqual(env["TANDEM_POD_IP"], ip)
        self.assertEqual(env["TOKEN"], "s3cret")
        self.assertEqual(env["HOSTNAME"], "env-printer")
        self.assertEqual(env["GREETING"], "hi-env-printer-$(UNKNOWN)")
        self.assertIn("FILE=workers: 2", log)
        self.assertIn("CWD=/tmp", log)
        self.assertIn('ARGS=["env-printer"]', log)  # $(VAR) expansion in args
        self.assertIn("UNAME=env-printer", log)  # its own UTS namespace
        # The mount lived only in the pod's private mount namespace.
        self.assertEqual(os.listdir(mount), [])

    def wait_waiting(self, name, reason):
        """The pod, once Pending with its container waiting for `reason`; asserts it is still so after a retry."""
        def waiting():
            pod = self.get_pod(name) or {}
            states = [s["state"].get("waiting", {}) for s in pod.get("status", {}).get("containerStatuses", [])]
            return pod if states and states[0].get("reason") == reason else None
        pod = self.wait_for(waiting, TIMEOUT, f"pod {name} never waited in {reason}")
        self.assertEqual(pod["status"]["phase"], "Pending")
        time.sleep(1.5)  # tried again at least once: still waiting, not failed
        self.assertEqual(self.get_pod(name)["status"]["phase"], "Pending")
        return pod

    def test_a_missing_secret_key_keeps_the_pod_waiting_until_it_is_added(self):
        self.create(SECRETS, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "keyless", "namespace": NS},
                              "stringData": {"other": "x"}})
        self.create(PODS, pod_manifest(
            "bad-ref", ["/bin/sh", "-c", 'echo "X=$X"'],
            env=[{"name": "X", "valueFrom": {"secretKeyRef": {"name": "keyless", "key": "k"}}}]))
        pod = self.wait_waiting("bad-ref", "CreateContainerConfigError")
        self.assertEqual(pod["status"]["containerStatuses"][0]["state"]["waiting"]["message"],
                         "couldn't find key k in Secret default/keyless")
        status, body = self.kube.request("PATCH", f"{SECRETS}/keyless", {"stringData": {"k": "added"}},
                                         content_type="application/merge-patch+json")
        self.assertEqual(status, 200, body)
        self.wait_phase("bad-ref", ("Succeeded",))
        self.assertIn("X=added", self.runner.log_of(NS, "bad-ref"))

    def test_a_missing_config_map_volume_keeps_the_pod_creating_until_it_is_created(self):
        # The kubelet's volume manager retries the mount: ContainerCreating, not a config error.
        self.create(PODS, pod_manifest(
            "unmounted", ["/bin/sh", "-c", "cat /etc/late/job.yaml"],
            volumes=[{"name": "config", "configMap": {"name": "late-config"}}],
            volumeMounts=[{"name": "config", "mountPath": "/etc/late"}]))
        pod = self.wait_waiting("unmounted", "ContainerCreating")
        self.assertNotIn("message", pod["status"]["containerStatuses"][0]["state"]["waiting"])  # as the kubelet's
        status, events = self.kube.request("GET", f"/api/v1/namespaces/{NS}/events?fieldSelector="
                                                  f"involvedObject.uid%3D{pod['metadata']['uid']}")
        self.assertEqual(status, 200, events)
        self.assertIn(("FailedMount", 'MountVolume.SetUp failed for volume "config" : configmap "late-config" not found'),
                      [(event["reason"], event["message"]) for event in events["items"]])
        self.create(CONFIGMAPS, {"apiVersion": "v1", "kind": "ConfigMap",
                                 "metadata": {"name": "late-config", "namespace": NS},
                                 "data": {"job.yaml": "arrived: true"}})
        self.wait_phase("unmounted", ("Succeeded",))
        self.assertIn("arrived: true", self.runner.log_of(NS, "unmounted"))

    def test_a_changed_wait_is_reported_again(self):
        # Waiting for its volume's ConfigMap, then (it arrived) for its environment's Secret: the status
        # follows, as the operator reads the Secret's wait from it.
        self.create(PODS, pod_manifest(
            "two-waits", ["/bin/sh", "-c", 'echo "X=$X"'],
            env=[{"name": "X", "valueFrom": {"secretKeyRef": {"name": "second-secret", "key": "k"}}}],
            volumes=[{"name": "config", "configMap": {"name": "first-config"}}],
            volumeMounts=[{"name": "config", "mountPath": "/etc/first"}]))
        self.wait_waiting("two-waits", "ContainerCreating")
        self.create(CONFIGMAPS, {"apiVersion": "v1", "kind": "ConfigMap",
                                 "metadata": {"name": "first-config", "namespace": NS}, "data": {"a": "b"}})
        pod = self.wait_waiting("two-waits", "CreateContainerConfigError")
        self.assertEqual(pod["status"]["containerStatuses"][0]["state"]["waiting"]["message"],
                         'secret "second-secret" not found')
        self.create(SECRETS, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "second-secret", "namespace": NS},
                              "stringData": {"k": "v"}})
        self.wait_phase("two-waits", ("Succeeded",))

    def test_a_restarted_runner_fails_the_pods_it_ran_but_starts_those_that_only_waited(self):
        # A node's kubelet restarted: the worker it ran is gone (Failed, 137), a pod that was waiting for its
        # Secret never ran and still starts once the Secret is there.
        bin_dir = os.environ.get("TANDEM_BIN_DIR")
        node = "restarting-node"
        first = PodRunner(self.kube, bin_dirs=[bin_dir] if bin_dir else [], node_name=node).start()
        self.addCleanup(first.stop)
        self.create(PODS, pod_manifest("ran", ["sleep", "600"], nodeName=node))
        self.create(PODS, pod_manifest(
            "waited", ["/bin/sh", "-c", 'echo "X=$X"'], nodeName=node,
            env=[{"name": "X", "valueFrom": {"secretKeyRef": {"name": "after-restart", "key": "k"}}}]))
        self.wait_phase("ran", ("Running",))
        self.wait_waiting("waited", "CreateContainerConfigError")
        first.stop()
        second = PodRunner(self.kube, bin_dirs=[bin_dir] if bin_dir else [], node_name=node).start()
        self.addCleanup(second.stop)
        pod = self.wait_phase("ran", ("Failed",))
        self.assertEqual(pod["status"]["containerStatuses"][0]["state"]["terminated"]["reason"], "ContainerStatusUnknown")
        self.assertEqual(self.get_pod("waited")["status"]["phase"], "Pending")
        self.create(SECRETS, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "after-restart", "namespace": NS},
                              "stringData": {"k": "v"}})
        self.wait_phase("waited", ("Succeeded",))
        self.assertIn("X=v", second.log_of(NS, "waited"))

    def test_a_missing_secret_keeps_the_pod_waiting_until_it_is_created(self):
        # As the kubelet does: Pending, the container waiting with the kubelet's words; then it starts.
        self.create(PODS, pod_manifest(
            "early", ["/bin/sh", "-c", 'echo "X=$X"'],
            env=[{"name": "X", "valueFrom": {"secretKeyRef": {"name": "late-secret", "key": "k"}}}]))
        pod = self.wait_waiting("early", "CreateContainerConfigError")
        self.assertEqual(pod["status"]["containerStatuses"][0]["state"]["waiting"]["message"],
                         'secret "late-secret" not found')
        self.create(SECRETS, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "late-secret", "namespace": NS},
                              "stringData": {"k": "arrived"}})
        self.wait_phase("early", ("Succeeded",))
        self.assertIn("X=arrived", self.runner.log_of(NS, "early"))

    def test_delete_sends_sigterm_then_pod_disappears(self):
        marker_dir = self.temporary_directory("tandem-runner-marker-")
        self.create(PODS, pod_manifest(
            "sleeper", ["/bin/sh", "-c"],
            ['trap "echo term > /mnt/marker/got-sigterm; exit 143" TERM; while :; do sleep 0.1; done'],
            volumeMounts=[{"name": "marker", "mountPath": "/mnt/marker"}],
            volumes=[{"name": "marker", "hostPath": {"path": marker_dir}}]))
        pod = self.wait_phase("sleeper", ("Running",))
        self.assertRegex(pod["status"]["podIP"], r"^127\.0\.0\.\d+$")
        self.assertEqual(pod["status"]["containerStatuses"][0]["state"].keys(), {"running"})
        ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
        self.assertEqual(ready["Ready"], "True")
        pid = self.runner.pid_of(NS, "sleeper")
        self.assertIsNotNone(pid)

        self.delete_pod("sleeper", grace=20)
        self.wait_gone("sleeper")
        with open(os.path.join(marker_dir, "got-sigterm")) as f:
            self.assertEqual(f.read().strip(), "term")
        self.wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 5, f"process {pid} of pod sleeper still alive")

    def test_grace_period_ends_in_sigkill(self):
        self.create(PODS, pod_manifest("stubborn", ["/bin/sh", "-c"], ["trap '' TERM; while :; do sleep 0.1; done"]))
        self.wait_phase("stubborn", ("Running",))
        pid = self.runner.pid_of(NS, "stubborn")
        started = time.monotonic()
        self.delete_pod("stubborn", grace=1)
        self.wait_gone("stubborn", timeout=15)
        self.assertGreaterEqual(time.monotonic() - started, 0.9)
        self.wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 5, f"process {pid} of pod stubborn still alive")

    def test_kill_process_reports_a_crash(self):
        self.create(PODS, pod_manifest("victim", ["sleep", "300"]))
        self.wait_phase("victim", ("Running",))
        self.runner.kill_process(NS, "victim", signal.SIGKILL)
        pod = self.wait_phase("victim", ("Failed",))
        state = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        self.assertEqual((state["exitCode"], state["reason"]), (128 + signal.SIGKILL, "Error"))
        self.assertIsNone(self.runner.pid_of(NS, "victim"))

    def test_force_delete_kills_at_once(self):
        self.create(PODS, pod_manifest("forced", ["sleep", "300"]))
        self.wait_phase("forced", ("Running",))
        pid = self.runner.pid_of(NS, "forced")
        self.delete_pod("forced", grace=0)
        self.wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 5, f"process {pid} of force-deleted pod still alive")

    def test_hostname_subdomain_names_resolve_to_pod_ips(self):
        # dns-a looks up dns-b, which starts after it: the hosts file changes in place under its bind mount.
        self.create(PODS, pod_manifest(
            "dns-a", ["/bin/sh", "-c"],
            ["until getent hosts worker-1.job.default.svc; do sleep 0.1; done; exec sleep 300"],
            hostname="worker-0", subdomain="job"))
        a = self.wait_phase("dns-a", ("Running",))
        self.create(PODS, pod_manifest(
            "dns-b", ["/bin/sh", "-c"],
            ["getent hosts worker-0.job.default.svc; getent hosts worker-0.job.default.svc.cluster.local; "
             "getent hosts dns-a; getent hosts worker-1.job.default.svc; echo HOSTNAME=$HOSTNAME"],
            hostname="worker-1", subdomain="job"))
        b = self.wait_phase("dns-b", ("Succeeded", "Failed"))
        self.assertEqual(b["status"]["phase"], "Succeeded", self.runner.log_of(NS, "dns-b"))
        self.assertNotEqual(a["status"]["podIP"], b["status"]["podIP"])
        log = self.runner.log_of(NS, "dns-b")
        resolved = {}
        for line in log.splitlines():
            fields = line.split()
            if fields and re.match(r"^127\.", fields[0]):
                for name in fields[1:]:
                    resolved.setdefault(name, fields[0])
        self.assertEqual(resolved.get("worker-0.job.default.svc"), a["status"]["podIP"], log)
        self.assertEqual(resolved.get("worker-0.job.default.svc.cluster.local"), a["status"]["podIP"], log)
        self.assertEqual(resolved.get("worker-1.job.default.svc"), b["status"]["podIP"], log)
        self.assertEqual(resolved.get("dns-a"), a["status"]["podIP"], log)
        self.assertIn("HOSTNAME=worker-1", log)
        self.wait_for(lambda: b["status"]["podIP"] in self.runner.log_of(NS, "dns-a"), 10,
                      "dns-a, started first, never resolved dns-b's name")
        self.delete_pod("dns-a", grace=0)
        self.wait_gone("dns-a")

    def test_grpc_resolves_pod_names(self):
        # Two tandem-worker ranks in two pods: rank 1 dials rank 0's rendezvous by its cluster-DNS-like name
        # through gRPC's default (c-ares) resolver, which reads the pods' /etc/hosts.
        bin_dir = os.environ.get("TANDEM_BIN_DIR")
        if not bin_dir or not os.access(os.path.join(bin_dir, "tandem-worker"), os.X_OK):
            self.skipTest("no tandem-worker in TANDEM_BIN_DIR")
        self.create(CONFIGMAPS, {
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "pair-config"},
            "data": {"job.yaml": "apiVersion: tandem.dev/v1alpha1\nkind: DistributedTrainingJob\n"
                                 "metadata: {name: pair}\nspec:\n  workers: 2\n"
                                 "  model: {kind: mlp, mlp: {hidden: [16], activation: relu}}\n"
                                 "  data: {kind: synthetic, samples: 1024}\n  optimizer: {kind: adamw, lr: 0.001}\n"
                                 "  training: {globalBatchSize: 64, epochs: 1, seed: 1}\n"}})
        self.create(f"/api/v1/namespaces/{NS}/secrets", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pair-token"},
            "data": {"token": base64.b64encode(b"pair-secret-token").decode()}})
        endpoint = f"pair-worker-0.pair.{NS}.svc:{kube_fixture.free_port()}"
        for rank in (0, 1):
            env = [{"name": "TANDEM_RANK", "value": str(rank)}, {"name": "TANDEM_WORLD_SIZE", "value": "2"},
                   {"name": "TANDEM_GENERATION", "value": "0"}, {"name": "TANDEM_RDZV_ENDPOINT", "value": endpoint},
                   {"name": "TANDEM_RDZV_TOKEN", "valueFrom": {"secretKeyRef": {"name": "pair-token", "key": "token"}}},
                   {"name": "TANDEM_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                   {"name": "TANDEM_CONFIG", "value": "/etc/tandem/job.yaml"}]
            self.create(PODS, pod_manifest(
                f"pair-{rank}", ["tandem-worker", "--max-steps", "2", "--metrics-port", "0", "--rendezvous-timeout", "30"],
                hostname=f"pair-worker-{rank}", subdomain="pair", env=env,
                volumeMounts=[{"name": "config", "mountPath": "/etc/tandem", "readOnly": True}],
                volumes=[{"name": "config", "configMap": {"name": "pair-config"}}]))
        for rank in (0, 1):
            pod = self.wait_phase(f"pair-{rank}", ("Succeeded", "Failed"), timeout=90)
            self.assertEqual(pod["status"]["phase"], "Succeeded", self.runner.log_of(NS, f"pair-{rank}"))

    def test_claim_directory_survives_pods(self):
        claim = [{"name": "ckpt", "persistentVolumeClaim": {"claimName": "checkpoints"}}]
        mounts = [{"name": "ckpt", "mountPath": "/mnt/checkpoints"}]
        self.create(PODS, pod_manifest("writer", ["/bin/sh", "-c"], ["echo step=7 > /mnt/checkpoints/latest"],
                                       volumeMounts=mounts, volumes=claim))
        writer = self.wait_phase("writer", ("Succeeded", "Failed"))
        self.assertEqual(writer["status"]["phase"], "Succeeded", self.runner.log_of(NS, "writer"))
        self.assertEqual(writer["status"]["containerStatuses"][0]["state"]["terminated"]["reason"], "Completed")
        self.create(PODS, pod_manifest("reader", ["cat", "/mnt/checkpoints/latest"], volumeMounts=mounts,
                                       volumes=claim))
        reader = self.wait_phase("reader", ("Succeeded", "Failed"))
        self.assertEqual(reader["status"]["phase"], "Succeeded", self.runner.log_of(NS, "reader"))
        self.assertEqual(self.runner.log_of(NS, "reader").strip(), "step=7")


if __name__ == "__main__":
    unittest.main()
