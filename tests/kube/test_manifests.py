"""Every plain manifest in manifests/ (CRD, RBAC, operator Deployment and Service, examples) is accepted by
a real API server, and the operator's RBAC grants exactly what it uses: checked by asking the server
(`kubectl auth can-i` as the operator's service account)."""

import glob
import os
import unittest

import kube_fixture

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OPERATOR_ACCOUNT = f"system:serviceaccount:{kube_fixture.OPERATOR_NAMESPACE}:{kube_fixture.OPERATOR_ACCOUNT_NAME}"


class PlainManifests(kube_fixture.KubeTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.kube.kubectl("apply", "-f", os.path.join(REPO, "manifests", "crd"), check=True)
        cls.wait_for(lambda: cls.kube.kubectl("get", "crd", "distributedtrainingjobs.tandem.dev", "-o",
                                              "jsonpath={.status.conditions[?(@.type=='Established')].status}")
                     .stdout == "True", 60, "CRD not established")

    def test_rbac_and_operator_pass_server_dry_run(self):
        # Namespaced objects need their namespace to exist for a server-side dry run.
        self.kube.kubectl("create", "namespace", "tandem-system")
        files = sorted(glob.glob(os.path.join(REPO, "manifests", "rbac", "*.yaml")) +
                       glob.glob(os.path.join(REPO, "manifests", "operator", "*.yaml")))
        self.assertGreaterEqual(len(files), 2)
        for path in files:
            with self.subTest(manifest=os.path.relpath(path, REPO)):
                result = self.kube.kubectl("apply", "--dry-run=server", "-f", path)
                self.assertEqual(result.returncode, 0, result.stderr)
                self.assertIn("(server dry run)", result.stdout)

    def test_every_example_passes_server_dry_run(self):
        self.kube.kubectl("create", "namespace", "examples")
        for path in sorted(glob.glob(os.path.join(REPO, "manifests", "examples", "*.yaml"))):
            with self.subTest(example=os.path.basename(path)):
                result = self.kube.kubectl("apply", "--dry-run=server", "-n", "examples", "-f", path)
                self.assertEqual(result.returncode, 0, result.stderr)

    def test_operator_rbac_is_least_privilege(self):
        self.kube.kubectl("create", "namespace", "tandem-system")
        self.kube.kubectl("apply", "-f", os.path.join(REPO, "manifests", "rbac"), check=True)

        def can(verb, resource, namespace="team-a", subresource=None):
            extra = [f"--subresource={subresource}"] if subresource else []
            result = self.kube.kubectl("auth", "can-i", verb, resource, "-n", namespace, f"--as={OPERATOR_ACCOUNT}",
                                       *extra)
            self.assertIn(result.stdout.strip(), ("yes", "no"), result.stderr)
            return result.stdout.strip() == "yes"

        # What the operator does.
        for verb in ("get", "list", "watch", "create", "delete"):
            for resource in ("pods", "services", "configmaps"):
                self.assertTrue(can(verb, resource), f"{verb} {resource}")
        self.assertTrue(can("create", "secrets"))
        for verb in ("get", "list", "watch", "delete"):
            self.assertTrue(can(verb, "distributedtrainingjobs.tandem.dev"))
        self.assertTrue(can("update", "distributedtrainingjobs.tandem.dev", subresource="status"))
        # Setting blockOwnerDeletion on a child, where owner-reference permissions are enforced.
        self.assertTrue(can("update", "distributedtrainingjobs.tandem.dev", subresource="finalizers"))
        self.assertTrue(can("create", "events"))
        for verb in ("get", "list", "watch"):
            self.assertTrue(can(verb, "nodes"), f"{verb} nodes")
        self.assertTrue(can("update", "leases.coordination.k8s.io", "tandem-system"))
        # And nothing more.
        self.assertFalse(can("update", "pods"))
        # No Secret's contents, ours or anyone's (a DELETE, even a dry run, answers with the object).
        for verb in ("get", "list", "watch", "patch", "update", "delete"):
            self.assertFalse(can(verb, "secrets"), f"{verb} secrets")
        self.assertFalse(can("create", "distributedtrainingjobs.tandem.dev"))
        self.assertFalse(can("update", "distributedtrainingjobs.tandem.dev"))
        self.assertFalse(can("patch", "pods", subresource="status"))
        self.assertFalse(can("patch", "distributedtrainingjobs.tandem.dev", subresource="status"))  # the operator PUTs it
        self.assertFalse(can("update", "leases.coordination.k8s.io", "team-a"))
        self.assertFalse(can("update", "nodes"))
        self.assertFalse(can("delete", "nodes"))
        self.assertFalse(can("create", "deployments.apps"))
        self.assertFalse(can("*", "*"))


if __name__ == "__main__":
    unittest.main()
