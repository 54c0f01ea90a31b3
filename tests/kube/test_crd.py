"""The DistributedTrainingJob CRD (manifests/crd/) on a real kube-apiserver 1.20.2: it installs and becomes
Established, the server accepts every example and every field the C++ parser accepts without pruning any,
refuses wrong types, enum values, minimums and missing required fields naming the field, prunes unknown fields
(what a 1.20 server does with them; `tandem validate` refuses them), prints the printer columns, and keeps
status behind the status subresource."""

import glob
import json
import os
import subprocess
import unittest

import kube_fixture

REPO = kube_fixture.REPO_ROOT
CRD = os.path.join(REPO, "manifests", "crd", "distributedtrainingjobs.tandem.dev.yaml")
CRD_NAME = "distributedtrainingjobs.tandem.dev"
EXAMPLES = sorted(glob.glob(os.path.join(REPO, "manifests", "examples", "*.yaml")))
BIN_DIR = os.environ.get("TANDEM_BIN_DIR", os.path.join(REPO, "build", "bin"))
TANDEM = os.path.join(BIN_DIR, "tandem")
API = "/apis/tandem.dev/v1alpha1/namespaces/default/distributedtrainingjobs"
DRY_RUN_NAMESPACE = "dry-run"  # the examples' dry runs use their real names without meeting the created ones
MERGE_PATCH = "application/merge-patch+json"


def full_manifest(name):
    """A manifest that sets every field worker/manifest/job_spec.cc accepts, valid for `tandem validate`."""
    return {
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "DistributedTrainingJob",
        "metadata": {"name": name, "labels": {"team": "ml"}, "annotations": {"note": "every field"}},
        "spec": {
            "workers": 4,
            "parallelism": {"pipelineStages": 2, "microBatches": 4, "schedule": "GPipe"},
            "model": {
                "kind": "mlp",
                "mlp": {"hidden": [64, 32, 16], "activation": "gelu"},
                "gpt": {"layers": 2, "heads": 2, "dModel": 32, "seqLen": 16, "vocab": 256},
            },
            "data": {"kind": "synthetic", "path": "/data/none", "samples": 512},
            "optimizer": {"kind": "sgd", "lr": 0.05, "weightDecay": 0.0001, "momentum": 0.9, "nesterov": True,
                          "beta1": 0.9, "beta2": 0.999, "eps": 1e-08, "warmupSteps": 10, "schedule": "cosine"},
            "training": {"globalBatchSize": 64, "epochs": 2, "maxSteps": 100, "seed": 7, "evalEvery": 50,
                         "precision": "fp32", "device": "cpu"},
            "checkpoint": {"dir": "/checkpoints", "everySteps": 20, "keep": 2, "claimName": "ckpt-claim"},
            "runPolicy": {"restartPolicy": "ExitCode", "backoffLimit": 0, "activeDeadlineSeconds": 3600,
                          "ttlSecondsAfterFinished": 0, "cleanPodPolicy": "All", "suspend": False},
            "template": {
                "metadata": {"labels": {"app": "trainer"}},
                "spec": {"containers": [{"name": "worker", "image": "tandem-worker:dev",
                                         "resources": {"limits": {"nvidia.com/gpu": 1}},
                                         "env": [{"name": "X", "value": "1"}]}],
                         "tolerations": [{"key": "gpu", "operator": "Exists"}]},
            },
        },
    }


class CrdTest(kube_fixture.KubeTestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        try:
            cls.kube.kubectl("apply", "-f", CRD, check=True)
            cls.wait_for(lambda: cls.crd_condition("Established") == "True", 60,
                         f"CRD {CRD_NAME} did not become Established")
            # kubectl resolves the new resource through discovery, which can lag the condition a little.
            cls.wait_for(lambda: cls.kube.kubectl("get", "dtj").returncode == 0, 60,
                         "kubectl does not know dtj after the CRD was Established")
            # The manifests are YAML; kubectl (client side, nothing sent) turns them into JSON to edit here.
            cls.fmnist = cls.local_json(os.path.join(REPO, "manifests", "examples", "fashion-mnist.yaml"))
            cls.kube.kubectl("create", "namespace", DRY_RUN_NAMESPACE, check=True)
        except BaseException:
            cls.tearDownClass()
            raise
        if not os.access(TANDEM, os.X_OK):
            raise AssertionError(f"{TANDEM} not built (ninja tandem; ctest sets TANDEM_BIN_DIR)")

    # --- helpers -----------------------------------------------------------------------------------------

    @classmethod
    def crd(cls):
        status, crd = cls.kube.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD_NAME}")
        return crd if status == 200 else None

    @classmethod
    def crd_condition(cls, kind):
        crd = cls.crd() or {}
        # Right after creation the CRD's status.conditions can still be null.
        for condition in (crd.get("status") or {}).get("conditions") or []:
            if condition["type"] == kind:
                return condition["status"]
        return None

    @classmethod
    def local_json(cls, path):
        result = cls.kube.kubectl("create", "--dry-run=client", "--validate=false", "-o", "json", "-f", path, check=True)
        return json.loads(result.stdout)

    def manifest_file(self, obj, name):
        """Writes obj as JSON (which is YAML, for kubectl and `tandem validate` alike)."""
        path = os.path.join(self.kube.tmp, f"{name}.json")
        with open(path, "w") as f:
            json.dump(obj, f, indent=1)
        return path

    def variant(self, name, edit):
        obj = json.loads(json.dumps(self.fmnist))
        obj["metadata"]["name"] = name
        edit(obj)
        return obj

    def tandem_validate(self, path):
        result = subprocess.run([TANDEM, "validate", path], capture_output=True, text=True, timeout=60)
        return result.returncode, result.stdout + result.stderr

    def get_job(self, name, namespace="default"):
        return self.kube.request("GET", f"/apis/tandem.dev/v1alpha1/namespaces/{namespace}/distributedtrainingjobs/{name}")

    def assert_not_stored(self, name, namespace="default"):
        status, body = self.get_job(name, namespace)
        self.assertEqual(status, 404, f"{namespace}/{name} was stored: {body}")

    def get_table(self, *args):
        """`kubectl get` as a list of {column: cell} rows, cut at the header's column offsets (cells may be empty)."""
        lines = self.kube.kubectl("get", *args, check=True).stdout.splitlines()
        header = lines[0]
        starts = [i for i, c in enumerate(header) if c != " " and (i == 0 or header[i - 1] == " ")]
        names = header.split()
        self.assertEqual(len(starts), len(names), header)
        bounds = list(zip(starts, starts[1:] + [None]))
        return names, [{name: line[a:b].strip() for name, (a, b) in zip(names, bounds)} for line in lines[1:]]

    # --- the CRD -----------------------------------------------------------------------------------------

    def test_crd_is_established_with_its_names_and_a_structural_schema(self):
        crd = self.crd()
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        self.assertEqual(conditions.get("Established"), "True", conditions)
        self.assertEqual(conditions.get("NamesAccepted"), "True", conditions)
        # A non-structural schema would show up here (and disable pruning); so would a schema violation.
        self.assertNotIn("NonStructuralSchema", conditions)
        self.assertNotIn("KubernetesAPIApprovalPolicyConformant", conditions)
        names = crd["status"]["acceptedNames"]
        self.assertEqual(names["kind"], "DistributedTrainingJob")
        self.assertEqual(names["plural"], "distributedtrainingjobs")
        self.assertEqual(names["shortNames"], ["dtj"])
        self.assertEqual(crd["spec"]["scope"], "Namespaced")
        [version] = crd["spec"]["versions"]
        self.assertEqual((version["name"], version["served"], version["storage"]), ("v1alpha1", True, True))
        self.assertEqual(version["subresources"], {"status": {}})
        self.assertEqual(crd["status"]["storedVersions"], ["v1alpha1"])

        listing = self.kube.kubectl("api-resources", "--api-group=tandem.dev", "--no-headers", check=True).stdout.split()
        self.assertEqual(listing, ["distributedtrainingjobs", "dtj", "tandem.dev/v1alpha1", "true", "DistributedTrainingJob"])

    def test_every_example_passes_server_dry_run_unchanged(self):
        self.assertGreaterEqual(len(EXAMPLES), 3, EXAMPLES)
        for path in EXAMPLES:
            with self.subTest(example=os.path.basename(path)):
                local = self.local_json(path)
                result = self.kube.kubectl("apply", "--dry-run=server", "-n", DRY_RUN_NAMESPACE, "-o", "json", "-f", path)
                self.assertEqual(result.returncode, 0, result.stderr)
                served = json.loads(result.stdout)
                self.assertEqual(served["kind"], "DistributedTrainingJob")
                # Nothing pruned, nothing defaulted: every field of the example is in the schema.
                self.assertEqual(served["spec"], local["spec"])
                self.assertEqual(served["metadata"]["namespace"], DRY_RUN_NAMESPACE)
                self.assert_not_stored(local["metadata"]["name"], DRY_RUN_NAMESPACE)
                code, output = self.tandem_validate(path)
                self.assertEqual(code, 0, output)

    def test_every_field_the_parser_accepts_survives_the_server(self):
        manifest = full_manifest("every-field")
        path = self.manifest_file(manifest, "every-field")
        code, output = self.tandem_validate(path)
        self.assertEqual(code, 0, f"tandem validate refused the all-fields manifest:\n{output}")
        result = self.kube.kubectl("create", "-o", "json", "-f", path)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout)["spec"], manifest["spec"])
        status, stored = self.get_job("every-field")
        self.assertEqual(status, 200)
        self.assertEqual(stored["spec"], manifest["spec"], "the server pruned or changed a field the parser accepts")
        self.assertEqual(stored["metadata"]["labels"], {"team": "ml"})

    # --- create and print --------------------------------------------------------------------------------

    def test_create_fashion_mnist_and_get_prints_the_columns(self):
        path = os.path.join(REPO, "manifests", "examples", "fashion-mnist.yaml")
        result = self.kube.kubectl("create", "-f", path)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("distributedtrainingjob.tandem.dev/fmnist created", result.stdout)

        columns, [row] = self.get_table("dtj", "fmnist")
        self.assertEqual(columns, ["NAME", "PHASE", "READY", "WORKERS", "RESTARTS", "STEP", "AGE"])
        # No status yet: the status columns are empty; Workers comes from the spec.
        self.assertEqual(row, dict(row, NAME="fmnist", PHASE="", READY="", WORKERS="2", RESTARTS="", STEP=""))
        self.assertRegex(row["AGE"], r"^\d+s$")

        status, _ = self.kube.request("PATCH", f"{API}/fmnist/status",
                                      {"status": {"phase": "Running", "readyWorkers": 2, "restarts": 1, "step": 120}},
                                      content_type=MERGE_PATCH)
        self.assertEqual(status, 200)
        _, [row] = self.get_table("distributedtrainingjobs", "fmnist")
        self.assertEqual(row, dict(row, NAME="fmnist", PHASE="Running", READY="2", WORKERS="2", RESTARTS="1", STEP="120"))
        columns, [row] = self.get_table("dtj", "-o", "wide")
        self.assertEqual(columns, ["NAME", "PHASE", "READY", "WORKERS", "RESTARTS", "STEP", "AGE", "STAGES", "MODEL"])
        self.assertEqual((row["NAME"], row["STAGES"], row["MODEL"]), ("fmnist", "1", "mlp"))

    # --- invalid manifests -------------------------------------------------------------------------------

    def test_server_refuses_wrong_types_enums_minimums_and_missing_fields_naming_the_field(self):
        def set_path(obj, path, value):
            *parents, leaf = path.split(".")
            for key in parents:
                obj = obj.setdefault(key, {})
            obj[leaf] = value

        def delete_path(obj, path):
            *parents, leaf = path.split(".")
            for key in parents:
                obj = obj[key]
            del obj[leaf]

        # (name, edit, field the server names, words of the server's message)
        cases = [
            ("workers-four", lambda o: set_path(o, "spec.workers", "four"), "spec.workers", "must be of type integer"),
            ("workers-zero", lambda o: set_path(o, "spec.workers", 0), "spec.workers",
             "should be greater than or equal to 1"),
            ("no-workers", lambda o: delete_path(o, "spec.workers"), "spec.workers", "Required value"),
            ("no-spec", lambda o: delete_path(o, "spec"), "spec", "Required value"),
            ("schedule-zigzag", lambda o: set_path(o, "spec.parallelism.schedule", "Zigzag"),
             "spec.parallelism.schedule", 'Unsupported value: "Zigzag"'),
            ("optimizer-adam", lambda o: set_path(o, "spec.optimizer.kind", "adam"), "spec.optimizer.kind",
             'Unsupported value: "adam"'),
            ("lr-zero", lambda o: set_path(o, "spec.optimizer.lr", 0), "spec.optimizer.lr", "should be greater than 0"),
            # A 1.20 server names a list item by the list's path, without the index.
            ("hidden-zero", lambda o: set_path(o, "spec.model.mlp.hidden", [256, 0]), "spec.model.mlp.hidden",
             "should be greater than or equal to 1"),
            ("backoff-negative", lambda o: set_path(o, "spec.runPolicy.backoffLimit", -1),
             "spec.runPolicy.backoffLimit", "should be greater than or equal to 0"),
            ("precision-fp16", lambda o: set_path(o, "spec.training.precision", "fp16"), "spec.training.precision",
             'Unsupported value: "fp16"'),
            ("suspend-yes", lambda o: set_path(o, "spec.runPolicy.suspend", "yes"), "spec.runPolicy.suspend",
             "must be of type boolean"),
            ("model-no-kind", lambda o: delete_path(o, "spec.model.kind"), "spec.model.kind", "Required value"),
        ]
        for name, edit, field, words in cases:
            with self.subTest(case=name):
                path = self.manifest_file(self.variant(name, edit), name)
                # --validate=false: nothing is checked on the client, so the refusal is the server's.
                result = self.kube.kubectl("create", "--validate=false", "-f", path)
                self.assertNotEqual(result.returncode, 0, result.stdout)
                self.assertIn(f'The DistributedTrainingJob "{name}" is invalid: ', result.stderr)
                self.assertIn(f"{field}: ", result.stderr)
                self.assertIn(words, result.stderr)
                self.assert_not_stored(name)
                # The C++ parser refuses the same manifest and names the same field.
                code, output = self.tandem_validate(path)
                self.assertEqual(code, 2, output)
                self.assertIn(field, output)

    def test_unknown_fields_are_pruned_by_the_server_and_refused_by_kubectl_and_tandem(self):
        def add_unknown(o):
            o["spec"]["training"]["learningRate"] = 0.1
            o["spec"]["parallelism"]["zigzag"] = True
        obj = self.variant("unknown-field", add_unknown)
        path = self.manifest_file(obj, "unknown-field")

        # kubectl's client-side validation (on by default) checks the CRD's published schema: refused unsent.
        result = self.kube.kubectl("create", "-f", path)
        self.assertNotEqual(result.returncode, 0, result.stdout)
        self.assertIn('unknown field "learningRate"', result.stderr)
        self.assertIn("spec.training", result.stderr)
        self.assert_not_stored("unknown-field")

        # The 1.20 server itself does not refuse unknown fields: it prunes them and stores the rest.
        result = self.kube.kubectl("create", "--validate=false", "-f", path)
        self.assertEqual(result.returncode, 0, result.stderr)
        status, stored = self.get_job("unknown-field")
        self.assertEqual(status, 200)
        self.assertNotIn("learningRate", stored["spec"]["training"])
        self.assertNotIn("zigzag", stored["spec"]["parallelism"])
        self.assertEqual(stored["spec"]["training"], self.fmnist["spec"]["training"])
        self.assertEqual(stored["spec"]["parallelism"], self.fmnist["spec"]["parallelism"])

        # `tandem validate` (and so `tandem run` and the worker) refuses both, naming them.
        code, output = self.tandem_validate(path)
        self.assertEqual(code, 2, output)
        self.assertIn("spec.training.learningRate: unknown field", output)
        self.assertIn("spec.parallelism.zigzag: unknown field", output)

    def test_cross_field_rules_are_left_to_tandem_validate(self):
        # 3 workers cannot form 2 pipeline stages: a 1.20 schema cannot say so, the parser does.
        obj = self.variant("three-workers", lambda o: o["spec"].update(
            workers=3, parallelism={"pipelineStages": 2, "microBatches": 1}))
        path = self.manifest_file(obj, "three-workers")
        result = self.kube.kubectl("create", "--dry-run=server", "-f", path)
        self.assertEqual(result.returncode, 0, result.stderr)
        code, output = self.tandem_validate(path)
        self.assertEqual(code, 2, output)
        self.assertIn("spec.parallelism.pipelineStages: 2 does not divide spec.workers (3)", output)

    # --- status subresource ------------------------------------------------------------------------------

    def test_status_is_written_only_through_the_status_subresource(self):
        # A status in the created object is dropped: only the subresource writes it.
        obj = self.variant("status-demo", lambda o: o.update(status={"phase": "Succeeded"}))
        result = self.kube.kubectl("create", "-f", self.manifest_file(obj, "status-demo"))
        self.assertEqual(result.returncode, 0, result.stderr)
        status, job = self.get_job("status-demo")
        self.assertEqual(status, 200)
        self.assertNotIn("status", job)
        generation = job["metadata"]["generation"]

        written = {
            "phase": "Running", "readyWorkers": 2, "restarts": 0, "step": 10,
            "startTime": "2024-01-01T00:00:00Z", "workers": {"pending": 0, "running": 2, "succeeded": 0, "failed": 0},
            "conditions": [{"type": "Running", "status": "True", "reason": "AllWorkersRunning",
                            "message": "2 of 2 workers running", "lastTransitionTime": "2024-01-01T00:00:05Z"}],
            "lastCheckpoint": "step-00000010",  # not in the schema: status stays open for a newer operator
        }
        status, job = self.kube.request("PATCH", f"{API}/status-demo/status",
                                        {"status": written, "spec": {"workers": 8}}, content_type=MERGE_PATCH)
        self.assertEqual(status, 200, job)
        self.assertEqual(job["status"], written)
        self.assertEqual(job["spec"]["workers"], 2, "a spec change through /status must be ignored")
        self.assertEqual(job["metadata"]["generation"], generation)

        # Through the main resource a status change is ignored while the spec change is applied.
        status, job = self.kube.request("PATCH", f"{API}/status-demo",
                                        {"status": {"phase": "Failed", "restarts": 3},
                                         "spec": {"runPolicy": {"backoffLimit": 5}}}, content_type=MERGE_PATCH)
        self.assertEqual(status, 200, job)
        self.assertEqual(job["spec"]["runPolicy"]["backoffLimit"], 5)
        self.assertEqual(job["metadata"]["generation"], generation + 1)
        status, stored = self.get_job("status-demo")
        self.assertEqual(stored["status"], written)

        # The typed part of the status is still validated.
        status, body = self.kube.request("PATCH", f"{API}/status-demo/status", {"status": {"restarts": "many"}},
                                         content_type=MERGE_PATCH)
        self.assertEqual(status, 422, body)
        self.assertIn("status.restarts", body["message"])
        status, body = self.kube.request("PATCH", f"{API}/status-demo/status",
                                         {"status": {"conditions": [{"type": "Running", "status": "Maybe"}]}},
                                         content_type=MERGE_PATCH)
        self.assertEqual(status, 422, body)
        self.assertIn('status.conditions.status: Unsupported value: "Maybe"', body["message"])


if __name__ == "__main__":
    unittest.main()
