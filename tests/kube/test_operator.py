"""tandem-operator end to end against a real control plane (DESIGN.md §9, §10).

etcd + kube-apiserver + kube-controller-manager (garbage collector, service accounts) from kube_fixture, the
pod runner playing scheduler and kubelet (real tandem-worker processes on their own 127.0.0.x addresses),
and tandem-operator as a separate process. Each test works in its own namespace.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import unittest
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kube_fixture  # noqa: E402
from operator_process import BIN_DIR, OperatorProcess  # noqa: E402
from pod_runner import PodRunner  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
import test_prometheus  # noqa: E402  (the dashboard's expressions and Prometheus helpers)

REPO_ROOT = kube_fixture.REPO_ROOT
EXAMPLE = os.path.join(REPO_ROOT, "manifests", "examples", "fashion-mnist.yaml")
CRD_DIR = os.path.join(REPO_ROOT, "manifests", "crd")
JOBS = "/apis/tandem.dev/v1alpha1/namespaces/{ns}/distributedtrainingjobs"
# Short leases so that takeovers happen within a test's patience.
LEASE_FLAGS = ["--leader-elect", "--lease-namespace=default", "--lease-duration=4", "--renew-deadline=3",
               "--retry-period=0.5"]
# Pods stuck terminating on an unreachable node are force-deleted 2 s after their grace period (default 60 s).
# A worker whose node stopped reporting is given 4 s (default 60) before its gang restarts.
# The end-to-end operator runs as its ServiceAccount with manifests/rbac: its Lease lives in its own namespace.
# Its renewals get 8 s (not the failover tests' 3): the workers it starts share two cores with the API server
# and etcd, which once left a renewal unanswered for 3 s, and an operator that loses its lease exits, which
# leaves the rest of the class waiting on nobody. A killed operator's successor takes over within 10 s.
E2E_FLAGS = ["--leader-elect", f"--lease-namespace={kube_fixture.OPERATOR_NAMESPACE}", "--lease-duration=10",
             "--renew-deadline=8", "--retry-period=1", "--force-delete-after=2", "--unreachable-node-wait=4"]
RBAC_DIR = os.path.join(REPO_ROOT, "manifests", "rbac")


class OperatorTestCase(kube_fixture.KubeTestCase):
    """Helpers shared by the operator test classes."""

    @classmethod
    def install_crd(cls):
        cls.kube.kubectl("apply", "-f", CRD_DIR, check=True)
        cls.wait_for(lambda: cls.kube.request("GET", JOBS.format(ns="default"), raw=True)[0] == 200, 30, "CRD established")
        # kubectl cached discovery before the CRD existed: drop it so that `dtj` resolves.
        shutil.rmtree(os.path.join(cls.kube.tmp, "kubectl-cache"), ignore_errors=True)

    def namespace(self, name):
        status, body = self.kube.request("POST", "/api/v1/namespaces",
                                         {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        self.assertIn(status, (201, 409), body)
        if self.kube.with_controller_manager:  # pods need the namespace's default ServiceAccount
            self.wait_for(lambda: self.kube.request("GET", f"/api/v1/namespaces/{name}/serviceaccounts/default")[0] == 200,
                          60, f"default ServiceAccount in {name}")
        return name

    def job(self, ns, name):
        status, body = self.kube.request("GET", JOBS.format(ns=ns) + "/" + name)
        return body if status == 200 else None

    def create_job(self, ns, manifest):
        status, body = self.kube.request("POST", JOBS.format(ns=ns), manifest)
        self.assertEqual(status, 201, body)
        return body

    def wait_phase(self, ns, name, phases, timeout, op=None):
        phases = (phases,) if isinstance(phases, str) else phases

        def reached():
            job = self.job(ns, name)
            return job if job and job.get("status", {}).get("phase") in phases else None
        try:
            return self.wait_for(reached, timeout, f"{ns}/{name} reaching {phases}", interval=0.5)
        except AssertionError as error:
            job = self.job(ns, name)
            extra = f"\nstatus: {json.dumps((job or {}).get('status'), indent=1)}"
            for pod in self.pods(ns, name):
                extra += (f"\npod {pod['metadata']['name']} uid {pod['metadata']['uid']} phase "
                          f"{pod.get('status', {}).get('phase')} deletionTimestamp {pod['metadata'].get('deletionTimestamp')}")
            if op is not None:
                if op.proc.poll() is not None:
                    extra += f"\noperator exited with {op.proc.returncode}"
                extra += f"\n--- operator log tail\n{op.log()[-4000:]}"
            runner = getattr(self, "runner", None)
            if runner is not None:
                with open(runner.runner_log, errors="replace") as f:
                    extra += "\n--- pod runner log tail\n" + "".join(f.readlines()[-40:])
            raise AssertionError(f"{error}{extra}") from None

    def pods(self, ns, job, include_terminating=True):
        status, body = self.kube.request("GET", f"/api/v1/namespaces/{ns}/pods?labelSelector=tandem.dev%2Fjob%3D{job}")
        self.assertEqual(status, 200, body)
        return [p for p in body["items"] if include_terminating or "deletionTimestamp" not in p["metadata"]]

    def children(self, ns, job):
        """Names of everything labelled with the job: pods, services, secrets, config maps."""
        found = []
        for kind in ("pods", "services", "secrets", "configmaps"):
            status, body = self.kube.request("GET", f"/api/v1/namespaces/{ns}/{kind}?labelSelector=tandem.dev%2Fjob%3D{job}")
            self.assertEqual(status, 200, body)
            found += [f"{kind}/{item['metadata']['name']}" for item in body["items"]]
        return found

    def events(self, ns, job):
        status, body = self.kube.request(
            "GET", f"/api/v1/namespaces/{ns}/events?fieldSelector=involvedObject.name%3D{job}")
        self.assertEqual(status, 200, body)
        return sorted(body["items"], key=lambda e: e["metadata"]["creationTimestamp"])

    def event_reasons(self, ns, job):
        return [event["reason"] for event in self.events(ns, job)]

    def example(self, name, **spec_changes):
        """manifests/examples/fashion-mnist.yaml as a dict (kubectl converts it), renamed, spec fields replaced."""
        result = self.kube.kubectl("create", "--dry-run=client", "-o", "json", "-f", EXAMPLE, check=True)
        manifest = json.loads(result.stdout)
        manifest["metadata"] = {"name": name}
        for key, value in spec_changes.items():
            if isinstance(value, dict) and isinstance(manifest["spec"].get(key), dict):
                manifest["spec"][key].update(value)
            else:
                manifest["spec"][key] = value
        return manifest


def synthetic_job(name, workers, epochs, samples=4096, **extra):
    spec = {"workers": workers, "model": {"kind": "mlp", "mlp": {"hidden": [64]}},
            "data": {"kind": "synthetic", "samples": samples},
            "training": {"globalBatchSize": 32 * workers, "epochs": epochs, "seed": 1}}
    spec.update(extra)
    return {"apiVersion": "tandem.dev/v1alpha1", "kind": "DistributedTrainingJob", "metadata": {"name": name}, "spec": spec}


def progress_steps(log_text):
    steps = []
    for line in log_text.splitlines():
        if line.startswith("@progress "):
            steps.append(json.loads(line[len("@progress "):])["step"])
    return steps


class OperatorEndToEnd(OperatorTestCase):
    """Training jobs through the operator and real worker processes."""

    controller_manager = True

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.install_crd()
        # Every job here is run by an operator with exactly the RBAC we ship (no Secret reads, say).
        cls.kube.kubectl("apply", "-f", RBAC_DIR, check=True)
        cls.runner = PodRunner(cls.kube, bin_dirs=[BIN_DIR]).start()
        cls.operator = cls.e2e_operator("operator-a").start()
        cls.operator.wait_ready()

    @classmethod
    def e2e_operator(cls, name):
        return OperatorProcess(cls.kube, *E2E_FLAGS, name=name, kubeconfig=cls.kube.operator_kubeconfig)

    @classmethod
    def tearDownClass(cls):
        if getattr(cls, "operator", None):
            cls.operator.stop()
        if getattr(cls, "runner", None):
            cls.runner.stop()
        super().tearDownClass()

    def tearDown(self):
        self.runner.check()  # a runner error fails the test that caused it

    def test_example_trains_to_succeeded_with_status_and_events(self):
        ns = self.namespace("train")
        self.kube.kubectl("apply", "-n", ns, "-f", EXAMPLE, check=True)
        job = self.wait_phase(ns, "fmnist", "Succeeded", 400, self.operator)
        status = job["status"]
        self.assertEqual(status["restarts"], 0)
        self.assertEqual(status["workers"]["succeeded"], 2, status)
        self.assertIn("startTime", status)
        self.assertIn("completionTime", status)
        conditions = {c["type"]: c for c in status["conditions"]}
        self.assertEqual(conditions["Succeeded"]["status"], "True")
        self.assertEqual(conditions["Succeeded"]["reason"], "AllWorkersSucceeded")
        self.assertEqual(conditions["Running"]["status"], "False")  # the previous phase's condition went False
        # The Event is written after the status that says Succeeded: give it a moment.
        expected = ("JobCreated", "CreatedWorkers", "AllWorkersRunning", "AllWorkersSucceeded")
        self.wait_for(lambda: all(reason in self.event_reasons(ns, "fmnist") for reason in expected), 30,
                      f"events {expected}", interval=0.2)
        # Real training happened: rank 0 reported every step of 10 epochs of 60000 samples in batches of 256.
        steps = progress_steps(self.runner.log_of(ns, "fmnist-worker-0"))
        self.assertTrue(steps, self.runner.log_of(ns, "fmnist-worker-0")[-2000:])
        self.assertEqual(steps[-1], 10 * (60000 // 256))
        printed = self.kube.kubectl("get", "dtj", "-n", ns, "fmnist", check=True).stdout
        self.assertIn("Succeeded", printed)
        self.assertGreaterEqual(self.operator.metric("tandem_operator_pods_created_total"), 2)
        self.assertGreaterEqual(self.operator.metric("tandem_operator_jobs", '{phase="Succeeded"}'), 1)
        # The operator that ran it could create the job's rendezvous Secret (named with the job's uid) but
        # could not have read it back, nor any other.
        self.assertIn(f"secrets/fmnist-rendezvous-{job['metadata']['uid']}", self.children(ns, "fmnist"))
        for verb, allowed in (("create", "yes"), ("get", "no"), ("list", "no"), ("watch", "no"), ("delete", "no")):
            answer = self.kube.kubectl("--kubeconfig", self.kube.operator_kubeconfig, "auth", "can-i", verb, "secrets",
                                       "-n", ns).stdout.strip()
            self.assertEqual(answer, allowed, f"the operator's identity: can-i {verb} secrets")

    def test_killed_worker_restarts_the_gang_which_resumes_from_the_checkpoint(self):
        ns = self.namespace("restart")
        manifest = self.example("fmnist-restart", checkpoint={"dir": "/checkpoints", "everySteps": 200, "keep": 2,
                                                               "claimName": "fmnist-checkpoints"})
        manifest["spec"]["training"]["epochs"] = 6  # 1404 steps
        # The surviving rank waits on its dead peer; a short grace period lets the next gang start sooner.
        manifest["spec"]["template"] = {"spec": {"terminationGracePeriodSeconds": 5}}
        self.create_job(ns, manifest)
        self.wait_phase(ns, "fmnist-restart", "Running", 120, self.operator)
        # Rank 0 reports progress; rank 1 is the one killed.
        self.wait_for(lambda: max(progress_steps(self.runner.log_of(ns, "fmnist-restart-worker-0")) or [0]) >= 450,
                      300, "the run past the checkpoint of step 400", interval=0.2)
        first_uids = {p["metadata"]["uid"] for p in self.pods(ns, "fmnist-restart")}
        self.runner.kill_process(ns, "fmnist-restart-worker-1", signal.SIGKILL)

        job = self.wait_phase(ns, "fmnist-restart", "Succeeded", 400, self.operator)
        status = job["status"]
        self.assertEqual(status["restarts"], 1, status)  # exit 137: retryable, counted
        self.assertEqual(status["generation"], 1, status)
        reasons = self.event_reasons(ns, "fmnist-restart")
        self.assertIn("WorkerFailed", reasons)
        pods = self.pods(ns, "fmnist-restart")
        self.assertTrue(pods)
        self.assertFalse(first_uids & {p["metadata"]["uid"] for p in pods}, "the whole first generation was replaced")
        self.assertTrue(all(p["metadata"]["labels"]["tandem.dev/generation"] == "1" for p in pods))
        # The second generation resumed from a checkpoint of step >= 400 and finished the run.
        log = self.runner.log_of(ns, "fmnist-restart-worker-0")
        resumed = [json.loads(line[len("@resume "):])["step"] for line in log.splitlines() if line.startswith("@resume ")]
        self.assertTrue(resumed and resumed[0] >= 400, log[-3000:])
        self.assertEqual(progress_steps(log)[-1], 6 * (60000 // 256))

    def test_a_secret_deleted_by_hand_is_created_again_for_the_next_gang(self):
        # The operator may not read Secrets: it learns of the deletion from the kubelet (here the pod runner),
        # whose next gang waits in CreateContainerConfigError, and creates the Secret again with a new token.
        ns = self.namespace("lost-secret")
        manifest = synthetic_job("lost", workers=2, epochs=1000)
        manifest["spec"]["template"] = {"spec": {"terminationGracePeriodSeconds": 5}}
        uid = self.create_job(ns, manifest)["metadata"]["uid"]
        self.wait_phase(ns, "lost", "Running", 120, self.operator)
        path = f"/api/v1/namespaces/{ns}/secrets/lost-rendezvous-{uid}"
        status, old = self.kube.request("GET", path)  # as the cluster admin
        self.assertEqual(status, 200, old)
        status, body = self.kube.request("DELETE", path)
        self.assertIn(status, (200, 202), body)
        self.runner.kill_process(ns, "lost-worker-1", signal.SIGKILL)

        def next_gang_running():
            pods = self.pods(ns, "lost", include_terminating=False)
            return len(pods) == 2 and all(p["metadata"]["labels"]["tandem.dev/generation"] == "1" and
                                          p.get("status", {}).get("phase") == "Running" for p in pods)
        self.wait_for(next_gang_running, 180, "the next gang running with the Secret created again", interval=0.5)
        self.assertIn("RendezvousSecretRecreated", self.event_reasons(ns, "lost"))
        status, new = self.kube.request("GET", path)
        self.assertEqual(status, 200, new)
        self.assertNotEqual(new["data"]["token"], old["data"]["token"])
        self.assertEqual([o["uid"] for o in new["metadata"]["ownerReferences"]], [uid])
        # Both workers read the new token (rank 0's server refuses any other) and train.
        steps = lambda: progress_steps(self.runner.log_of(ns, "lost-worker-0"))  # noqa: E731
        self.wait_for(lambda: steps() and steps()[-1] > 0, 60, "progress of the new gang", interval=0.5)
        job = self.job(ns, "lost")
        self.assertEqual(job["status"]["restarts"], 1, job["status"])  # the kill's; the wait for the Secret is free

    def test_ttl_deletes_the_finished_job_and_what_it_controls_but_not_a_users_service(self):
        # A headless Service of the job's name that a user made serves the workers (it is not created
        # again) and stays the user's: TTL clean-up deletes only what the job controls. Every delete names
        # the uid the operator saw as a precondition; a body the real API server refused would stop the
        # plan before the job's own delete, and the job would stay.
        ns = self.namespace("ttl")
        service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "brief"},
                   "spec": {"clusterIP": "None", "selector": {"tandem.dev/job": "brief"}}}
        status, body = self.kube.request("POST", f"/api/v1/namespaces/{ns}/services", service)
        self.assertEqual(status, 201, body)
        service_uid = body["metadata"]["uid"]
        self.create_job(ns, synthetic_job("brief", workers=2, epochs=1,
                                          runPolicy={"ttlSecondsAfterFinished": 4, "cleanPodPolicy": "None"}))
        self.wait_phase(ns, "brief", "Succeeded", 180, self.operator)
        self.wait_for(lambda: self.job(ns, "brief") is None, 60, "the job deleted once its TTL elapsed", interval=0.5)
        self.wait_for(lambda: not self.children(ns, "brief"), 60, "its pods, Secret and ConfigMap gone", interval=0.5)
        status, body = self.kube.request("GET", f"/api/v1/namespaces/{ns}/services/brief")
        self.assertEqual(status, 200, "the user's Service was deleted with the job")
        self.assertEqual(body["metadata"]["uid"], service_uid)
        self.assertIn("TTLExpired", self.event_reasons(ns, "brief"))

    def test_spec_edits_of_a_started_job_are_ignored_except_run_policy(self):
        ns = self.namespace("edit")
        self.create_job(ns, synthetic_job("edited", workers=2, epochs=1000))
        self.wait_phase(ns, "edited", "Running", 120, self.operator)
        uids = sorted(p["metadata"]["uid"] for p in self.pods(ns, "edited"))
        # What `kubectl apply` of an edited file does: twice the workers, another learning rate.
        edit = {"spec": {"workers": 4, "optimizer": {"kind": "adamw", "lr": 0.5}}}
        self.kube.kubectl("patch", "distributedtrainingjobs.tandem.dev", "edited", "-n", ns, "--type=merge",
                          "-p", json.dumps(edit), check=True)

        def ignored():
            return [e for e in self.events(ns, "edited") if e["reason"] == "SpecChangeIgnored"]
        event = self.wait_for(ignored, 60, "a SpecChangeIgnored Event", interval=0.5)[0]
        self.assertEqual(event["type"], "Warning")
        self.assertIn("edits of spec.optimizer, spec.workers do not apply to a job that has started", event["message"])
        self.assertEqual(sorted(p["metadata"]["uid"] for p in self.pods(ns, "edited")), uids, "the gang was left alone")
        self.assertEqual(self.job(ns, "edited")["status"]["phase"], "Running")
        # runPolicy does apply: suspending stops the gang.
        self.kube.kubectl("patch", "distributedtrainingjobs.tandem.dev", "edited", "-n", ns, "--type=merge",
                          "-p", json.dumps({"spec": {"runPolicy": {"suspend": True}}}), check=True)
        self.wait_phase(ns, "edited", "Suspended", 60, self.operator)

    def test_deleting_the_job_removes_everything_it_owned(self):
        ns = self.namespace("delete")
        self.create_job(ns, synthetic_job("doomed", workers=2, epochs=1000))
        self.wait_phase(ns, "doomed", "Running", 120, self.operator)
        pids = [self.runner.pid_of(ns, f"doomed-worker-{rank}") for rank in range(2)]
        self.assertTrue(all(pids))
        self.assertEqual(len(self.children(ns, "doomed")), 2 + 3)  # pods, Service, Secret, ConfigMap
        self.kube.kubectl("delete", "dtj", "-n", ns, "doomed", "--wait=false", check=True)
        self.wait_for(lambda: not self.children(ns, "doomed"), 90, "every child of the deleted job gone", interval=0.5)

        def exited(pid):
            try:
                os.kill(pid, 0)
                return False
            except ProcessLookupError:
                return True
        self.wait_for(lambda: all(exited(pid) for pid in pids), 60, "worker processes gone")

    def test_operator_killed_mid_job_neither_duplicates_nor_orphans_pods(self):
        ns = self.namespace("failover")
        # Long enough to still be running after two operator kills and lease takeovers (~16 s of training
        # on the 2-core dev machine; 15 epochs, 4 s since the workers' GEMMs use AVX-512, once finished first).
        self.create_job(ns, synthetic_job("steady", workers=4, epochs=60))
        # Kill the operator as soon as the first pod exists: the gang may be half created.
        self.wait_for(lambda: self.pods(ns, "steady"), 60, "first pod", interval=0.02)
        self.operator.kill(signal.SIGKILL)
        self.operator.proc.wait(timeout=10)
        half = {p["metadata"]["name"]: p["metadata"]["uid"] for p in self.pods(ns, "steady")}
        restarted = self.e2e_operator("operator-b").start()
        type(self).operator = restarted
        restarted.wait_ready()
        job = self.wait_phase(ns, "steady", "Running", 120, restarted)
        pods = self.pods(ns, "steady")
        self.assertEqual(sorted(p["metadata"]["name"] for p in pods), [f"steady-worker-{r}" for r in range(4)])
        for pod in pods:  # the pods that existed before the restart were kept, not recreated
            if pod["metadata"]["name"] in half:
                self.assertEqual(pod["metadata"]["uid"], half[pod["metadata"]["name"]])
        running_uids = {p["metadata"]["uid"] for p in pods}
        # Kill and restart once more while the gang runs: nothing is recreated, the job still succeeds.
        restarted.kill(signal.SIGKILL)
        restarted.proc.wait(timeout=10)
        again = self.e2e_operator("operator-c").start()
        type(self).operator = again
        again.wait_ready()
        job = self.wait_phase(ns, "steady", "Succeeded", 300, again)
        self.assertEqual(job["status"]["restarts"], 0)
        self.assertEqual(job["status"]["generation"], 0)
        final = self.pods(ns, "steady")
        self.assertEqual({p["metadata"]["uid"] for p in final}, running_uids)
        # Never twice (a kill between the pods and the Event may lose it: Events are best effort).
        self.assertLessEqual(self.event_reasons(ns, "steady").count("JobCreated"), 1)


    def test_pods_stuck_on_an_unreachable_node_are_force_deleted_without_consuming_retries(self):
        ns = self.namespace("nodelost")
        # A node whose kubelet stopped reporting: the node lifecycle controller would set Ready=Unknown and the
        # unreachable taint. No runner serves it, so its pods never run and never finish terminating.
        node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "lost-node"},
                "spec": {"taints": [{"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}]}}
        status, body = self.kube.request("POST", "/api/v1/nodes", node)
        self.assertIn(status, (201, 409), body)
        self.addCleanup(self.kube.request, "DELETE", "/api/v1/nodes/lost-node")
        status, body = self.kube.request("GET", "/api/v1/nodes/lost-node")
        silent_since = time.time()
        body["status"] = {"conditions": [{"type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown",
                                          "lastTransitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                              time.gmtime(silent_since))}]}
        status, body = self.kube.request("PUT", "/api/v1/nodes/lost-node/status", body)
        self.assertEqual(status, 200, body)

        manifest = synthetic_job("stranded", workers=2, epochs=1, runPolicy={"restartPolicy": "OnFailure", "backoffLimit": 0},
                                 template={"spec": {"nodeName": "lost-node", "terminationGracePeriodSeconds": 1}})
        self.create_job(ns, manifest)

        # The first gang waits out --unreachable-node-wait (4 s from the whole second the node went silent).
        def restarted():
            job = self.job(ns, "stranded")
            return job if job.get("status", {}).get("preemptions", 0) >= 1 else None
        self.wait_for(restarted, 60, "a gang restart after node loss", interval=0.2)
        self.assertGreaterEqual(time.time() - silent_since, 3.0, "restarted before the node had been silent 4 s")
        # The Event follows the status write.
        lost = self.wait_for(lambda: [e["message"] for e in self.events(ns, "stranded") if e["reason"] == "NodeLost"],
                             30, "a NodeLost Event", interval=0.2)
        self.assertIn("node lost-node stopped reporting", lost[0])

        def restarted_twice():
            job = self.job(ns, "stranded")
            return job if job.get("status", {}).get("preemptions", 0) >= 2 else None
        job = self.wait_for(restarted_twice, 90, "two gang restarts after node loss", interval=0.5)
        # Node loss never consumes backoffLimit (0 here): the job keeps restarting instead of failing.
        self.assertEqual(job["status"]["restarts"], 0)
        self.assertNotEqual(job["status"].get("phase"), "Failed")
        reasons = self.event_reasons(ns, "stranded")
        self.assertIn("NodeLost", reasons)
        self.assertIn("ForceDeleted", reasons)
        generations = {p["metadata"]["labels"]["tandem.dev/generation"] for p in self.pods(ns, "stranded")}
        self.assertTrue(generations and min(int(g) for g in generations) >= 1, generations)
        self.kube.kubectl("delete", "dtj", "-n", ns, "stranded", "--wait=false", check=True)

    def test_refused_pod_creations_are_one_counted_warning_and_the_job_starts_once_allowed(self):
        ns = self.namespace("quota")
        # A quota of no pods. Admission enforces status.hard against status.used, which the quota controller
        # (not run here) would fill in: written by hand instead.
        quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-pods"}, "spec": {"hard": {"pods": "0"}}}
        status, body = self.kube.request("POST", f"/api/v1/namespaces/{ns}/resourcequotas", quota)
        self.assertEqual(status, 201, body)
        body["status"] = {"hard": {"pods": "0"}, "used": {"pods": "0"}}
        status, body = self.kube.request("PUT", f"/api/v1/namespaces/{ns}/resourcequotas/no-pods/status", body)
        self.assertEqual(status, 200, body)
        self.create_job(ns, synthetic_job("refused", workers=2, epochs=1))

        def counted_warning():
            failed = [e for e in self.events(ns, "refused") if e["reason"] == "FailedCreate"]
            return failed if failed and failed[0].get("count", 1) >= 3 else None
        try:
            failed = self.wait_for(counted_warning, 60, "a FailedCreate Event counted 3 times", interval=0.5)
        except AssertionError as error:
            raise AssertionError(f"{error}\nevents: {json.dumps(self.events(ns, 'refused'), indent=1)}"
                                 f"\n--- operator log tail\n{self.operator.log()[-4000:]}") from None
        # The operator retried with backoff, and every refusal went into the one Event.
        self.assertEqual(len(failed), 1, failed)
        self.assertEqual(failed[0]["type"], "Warning")
        self.assertIn("pod refused-worker-0", failed[0]["message"])
        self.assertIn("no-pods", failed[0]["message"])
        self.assertGreaterEqual(failed[0]["lastTimestamp"], failed[0]["firstTimestamp"])  # RFC 3339, whole seconds
        self.assertEqual(self.pods(ns, "refused"), [])
        # The phase went to Created in the pass whose pod creation was refused: its Event was still sent.
        self.assertIn("JobCreated", self.event_reasons(ns, "refused"))

        status, body = self.kube.request("DELETE", f"/api/v1/namespaces/{ns}/resourcequotas/no-pods")
        self.assertEqual(status, 200, body)
        self.wait_phase(ns, "refused", "Succeeded", 120, op=self.operator)
        self.assertEqual(len([e for e in self.events(ns, "refused") if e["reason"] == "FailedCreate"]), 1)

    def test_prometheus_scrapes_the_operator_and_every_operator_panel_has_data(self):
        """The dashboard's operator row against Debian's Prometheus scraping the running operator."""
        prometheus = shutil.which("prometheus")
        self.assertIsNotNone(prometheus, "Debian's prometheus package is installed by scripts/setup")
        tmp = os.path.join(self.kube.tmp, "prometheus")
        os.makedirs(tmp, exist_ok=True)
        web = test_prometheus.free_port()
        config = os.path.join(tmp, "prometheus.yml")
        with open(config, "w") as f:
            f.write(f"""global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: tandem-operator
    static_configs: [{{targets: ['127.0.0.1:{self.operator.port()}']}}]
""")
        with open(os.path.join(tmp, "prometheus.log"), "w") as log:
            server = subprocess.Popen([prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp}/tsdb",
                                       f"--web.listen-address=127.0.0.1:{web}"], stdout=subprocess.DEVNULL,
                                      stderr=log, start_new_session=True)
        try:
            base = f"http://127.0.0.1:{web}"
            self.wait_for(lambda: test_prometheus.get_json(base + "/api/v1/targets")["data"]["activeTargets"]
                          if self._answers(base) else None, 30, "prometheus up with its target")
            ns = self.namespace("metrics")
            self.create_job(ns, synthetic_job("observed", workers=1, epochs=2))
            self.wait_phase(ns, "observed", "Succeeded", 120, self.operator)
            time.sleep(3)  # a few more scrapes after the last reconcile
            checked = 0
            for row, title, expression in test_prometheus.dashboard_expressions():
                if row != test_prometheus.OPERATOR_ROW:
                    continue
                names = test_prometheus.metric_names(expression)
                self.assertLessEqual(names, test_prometheus.DESIGN_OPERATOR_METRICS, title)
                query = expression.replace("$__rate_interval", "60s")
                answer = test_prometheus.get_json(base + "/api/v1/query?" + urllib.parse.urlencode({"query": query}))
                self.assertEqual(answer["status"], "success", f"{title}: {query}: {answer.get('error')}")
                self.assertTrue(answer["data"]["result"], f"{title}: no data for {query}")
                checked += 1
            self.assertEqual(checked, 6)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)

    @staticmethod
    def _answers(base):
        try:
            return urllib.request.urlopen(base + "/-/ready", timeout=1).status == 200
        except OSError:
            return False


class OperatorControlPlaneFailures(OperatorTestCase):
    """Watch expiry (410 Gone) and leader election, without worker processes. The apiserver runs without its
    watch cache so that a watch resumed from a compacted revision gets 410, as it would after a long outage."""

    apiserver_args = ["--watch-cache=false", "--etcd-compaction-interval=0"]
    controller_manager = True  # pods are admitted only once their namespace has its default ServiceAccount

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.install_crd()

    def compact_etcd(self):
        """Compacts etcd at its current revision (etcd's JSON gateway), so that older watches are refused."""
        def post(path, body):
            request = urllib.request.Request(self.kube.etcd_url + path, data=json.dumps(body).encode(), method="POST")
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.load(response)
        revision = int(post("/v3/kv/range", {"key": "AA=="})["header"]["revision"])
        post("/v3/kv/compaction", {"revision": revision, "physical": True})
        return revision

    def test_expired_watch_is_recovered_by_relisting(self):
        ns = self.namespace("expiry")
        op = OperatorProcess(self.kube, "--watch-timeout=3", name="operator-expiry").start()
        try:
            op.wait_ready()
            op.kill(signal.SIGSTOP)
            time.sleep(5)  # the server ends every watch stream meanwhile
            self.create_job(ns, synthetic_job("late", workers=2, epochs=1))  # an event the frozen operator missed
            # A watch from revision r starts at r + 1: two more writes put the compaction past that.
            for i in range(2):
                self.kube.request("POST", f"/api/v1/namespaces/{ns}/configmaps",
                                  {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"filler-{i}"}})
            self.compact_etcd()
            op.kill(signal.SIGCONT)
            # Resuming from its old resourceVersion gets 410: it relists, finds the job and creates its gang.
            self.wait_for(lambda: len(self.pods(ns, "late")) == 2, 60, "pods of the job created after the 410",
                          interval=0.5)
            self.assertIn("watch expired (410 Gone", op.log())
            self.assertEqual(self.job(ns, "late")["status"]["phase"], "Created")
        finally:
            op.stop()

    def lease(self, name="tandem-operator"):
        status, body = self.kube.request("GET", f"/apis/coordination.k8s.io/v1/namespaces/default/leases/{name}")
        return body["spec"] if status == 200 else None

    def test_standby_replica_takes_over_within_the_lease_duration(self):
        ns = self.namespace("election")
        first = OperatorProcess(self.kube, *LEASE_FLAGS, name="replica-1").start()
        second = None
        try:
            first.wait_ready()
            self.wait_for(lambda: (self.lease() or {}).get("holderIdentity") == "replica-1", 30, "replica-1 leads")
            second = OperatorProcess(self.kube, *LEASE_FLAGS, name="replica-2").start()
            second.wait_ready()
            time.sleep(3)  # longer than the renew deadline: a standby must not steal a renewed lease
            self.assertEqual(self.lease()["holderIdentity"], "replica-1")
            self.assertIn("held by replica-1; standing by", second.log())
            self.assertNotIn("reconciling with", second.log())

            first.kill(signal.SIGKILL)
            killed = time.monotonic()
            self.wait_for(lambda: (self.lease() or {}).get("holderIdentity") == "replica-2", 15, "replica-2 leads",
                          interval=0.05)
            took = time.monotonic() - killed
            # Expiry counts from when the standby last saw a renewal (its own clock, as in client-go), at most
            # one retry period before the kill: lease duration 4 s + retry period 0.5 s bound the takeover.
            self.assertLess(took, 4.5 + 0.5, f"takeover after {took:.2f} s")
            self.assertEqual(self.lease()["leaseTransitions"], 1)
            # The new leader reconciles.
            self.create_job(ns, synthetic_job("after-takeover", workers=1, epochs=1))
            self.wait_for(lambda: self.pods(ns, "after-takeover"), 30, "the new leader created the pod")
            # Graceful shutdown hands the lease over at once.
            self.assertEqual(second.stop(), 0)
            self.assertEqual(self.lease()["holderIdentity"], "")
        finally:
            first.stop()
            if second:
                second.stop()


    def test_sigterm_while_the_api_server_is_stalled_still_exits_promptly(self):
        # A lease of its own: the one it leaves to expire is no other test's.
        op = OperatorProcess(self.kube, *LEASE_FLAGS, "--lease-name=stalled", name="stalled-shutdown").start()
        lease = lambda: self.lease("stalled") or {}  # noqa: E731
        try:
            op.wait_ready()
            self.wait_for(lambda: lease().get("holderIdentity") == "stalled-shutdown", 30, "it leads")
            self.wait_for(lambda: "reconciling with" in op.log(), 10, "its workers started")
            # Right after a renewal, so that the SIGTERM usually finds the elector between renewals (0.5 s
            # apart) and the release is what waits on the stalled server; inside a renewal, the elector
            # cancels it a second after the stop instead.
            renewed = lease()["renewTime"]
            self.wait_for(lambda: lease()["renewTime"] != renewed, 5, "a renewal", interval=0.02)
            self.kube.apiserver.send_signal(signal.SIGSTOP)  # accepts connections, answers nothing
            try:
                started = time.monotonic()
                code = op.stop(timeout=40)
                took = time.monotonic() - started
            finally:
                self.kube.apiserver.send_signal(signal.SIGCONT)
            # Every call would otherwise wait 30 s per attempt, retried: the shutdown is bounded instead
            # (0.5 s for reconciles with these lease flags, 2 s for the release), and the lease expires.
            self.assertEqual(code, 0, op.log()[-3000:])
            self.assertLess(took, 8, f"shutdown took {took:.1f} s:\n{op.log()[-3000:]}")
            log = op.log()
            self.assertTrue("leader election: the API server did not answer within 2000 ms; the lease expires by itself"
                            in log or "stopping while a renewal still waits on the API server: cancelling it" in log,
                            log[-3000:])
            self.assertIn("tandem-operator stopped", op.log())
        finally:
            op.stop()

if __name__ == "__main__":
    unittest.main()
