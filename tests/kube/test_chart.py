"""The Helm chart charts/tandem, rendered like `helm template` by tests/helm/render.go (Helm is not packaged in
Debian 12; render.go says which Helm semantics it implements): with defaults and with every option on, every
document parsed and checked for consistent labels and selectors, least-privilege RBAC equal to
manifests/rbac/rbac.yaml, a hardened Deployment and the dashboard unchanged; then every rendered object is
sent to a real API server (`kubectl apply --dry-run=server`) after the chart's CRD is applied."""

import json
import os
import sys
import tempfile
import unittest

import kube_fixture

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "helm"))
import helm_render  # noqa: E402

REPO = helm_render.REPO
CHART = helm_render.CHART
MANIFEST_CRD = os.path.join(REPO, "manifests", "crd", "distributedtrainingjobs.tandem.dev.yaml")
CHART_CRD = os.path.join(CHART, "crds", "distributedtrainingjobs.tandem.dev.yaml")
DASHBOARDS = os.path.join(CHART, "dashboards")
STANDARD_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                   "app.kubernetes.io/managed-by", "app.kubernetes.io/component", "helm.sh/chart")
EVERYTHING = ["serviceMonitor.enabled=true", "podMonitor.enabled=true", "networkPolicy.enabled=true",
              "watchNamespace=team-a", "metrics.port=9090"]
WORKER_SELECTOR = {"matchExpressions": [{"key": "tandem.dev/job", "operator": "Exists"}]}


def by_kind(objects):
    out = {}
    for _, obj in objects:
        out.setdefault(obj["kind"], []).append(obj)
    return out


def one(objects, kind, name=None):
    found = [o for o in by_kind(objects).get(kind, []) if name is None or o["metadata"]["name"] == name]
    if len(found) != 1:
        raise AssertionError(f"want one {kind} {name or ''}, rendered {len(found)}")
    return found[0]


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def plain_rbac():
    objects = helm_render.yaml_to_json(os.path.join(REPO, "manifests", "rbac", "rbac.yaml"))
    return {o["kind"]: o for o in objects}


class ChartRendering(unittest.TestCase):
    """What the chart renders, without a server."""

    def test_chart_metadata(self):
        chart = helm_render.yaml_to_json(os.path.join(CHART, "Chart.yaml"))[0]
        self.assertEqual({k: chart[k] for k in ("apiVersion", "name", "version", "appVersion", "kubeVersion")},
                         {"apiVersion": "v2", "name": "tandem", "version": "0.1.0", "appVersion": "0.1.0",
                          "kubeVersion": ">=1.20.0-0"})

    def test_chart_crd_is_the_manifest_crd(self):
        # One source of truth: crds/ links to manifests/crd (Helm's loader follows the link when it reads or
        # packages the chart directory).
        self.assertTrue(os.path.islink(CHART_CRD))
        self.assertEqual(os.path.realpath(CHART_CRD), os.path.realpath(MANIFEST_CRD))
        with open(CHART_CRD, "rb") as chart_copy, open(MANIFEST_CRD, "rb") as manifest:
            self.assertEqual(chart_copy.read(), manifest.read())
        crds = [o for s, o in helm_render.render(include_crds=True) if s.startswith("tandem/crds/")]
        self.assertEqual([o["metadata"]["name"] for o in crds], ["distributedtrainingjobs.tandem.dev"])

    def test_every_object_carries_the_standard_labels(self):
        for sets in ([], EVERYTHING):
            for source, obj in helm_render.render(name="prod", namespace="ops", sets=sets):
                with self.subTest(sets=sets, source=source, kind=obj["kind"]):
                    labels = obj["metadata"]["labels"]
                    for label in STANDARD_LABELS:
                        self.assertIn(label, labels)
                    self.assertEqual(labels["app.kubernetes.io/instance"], "prod")
                    self.assertEqual(labels["app.kubernetes.io/managed-by"], "Helm")
                    self.assertEqual(labels["app.kubernetes.io/version"], "0.1.0")
                    self.assertEqual(labels["helm.sh/chart"], "tandem-0.1.0")

    def test_defaults(self):
        objects = helm_render.render()
        self.assertEqual(sorted(o["kind"] for _, o in objects),
                         sorted(["ServiceAccount", "ConfigMap", "ClusterRole", "ClusterRoleBinding", "Role",
                                 "RoleBinding", "Service", "Deployment"]))
        for _, obj in objects:
            if not obj["kind"].startswith("Cluster"):
                self.assertEqual(obj["metadata"]["namespace"], "tandem-system", obj["kind"])

        deployment = one(objects, "Deployment")
        self.assertEqual(deployment["metadata"]["name"], "tandem-operator")  # the plain manifests' name
        self.assertEqual(deployment["spec"]["replicas"], 2)
        pod = deployment["spec"]["template"]
        pod_labels = pod["metadata"]["labels"]
        self.assertTrue(selects(deployment["spec"]["selector"]["matchLabels"], pod_labels))
        container = pod["spec"]["containers"][0]
        self.assertEqual(container["image"], "tandem-operator:0.1.0")
        self.assertEqual(container["args"], ["--metrics-port=8080", "--worker-image=tandem-worker:0.1.0",
                                             "--leader-elect", "--lease-name=tandem-operator"])
        self.assertEqual({e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]},
                         {"POD_NAMESPACE": "metadata.namespace", "POD_NAME": "metadata.name"})
        self.check_hardened_with_probes(deployment, 8080)

        # The metrics Service selects the operator's pods on the named metrics port.
        service = one(objects, "Service")
        self.assertTrue(selects(service["spec"]["selector"], pod_labels))
        self.assertEqual(service["spec"]["ports"], [{"name": "metrics", "port": 8080, "targetPort": "metrics",
                                                     "protocol": "TCP"}])

        # RBAC: the plain manifests' rules, bound to the chart's ServiceAccount.
        account = one(objects, "ServiceAccount")["metadata"]["name"]
        self.assertEqual(pod["spec"]["serviceAccountName"], account)
        rbac = plain_rbac()
        self.assertEqual(one(objects, "ClusterRole")["rules"], rbac["ClusterRole"]["rules"])
        self.assertEqual(one(objects, "Role")["rules"], rbac["Role"]["rules"])
        for kind, role_kind in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
            binding = one(objects, kind)
            self.assertEqual(binding["roleRef"], {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind,
                                                  "name": one(objects, role_kind)["metadata"]["name"]})
            self.assertEqual(binding["subjects"], [{"kind": "ServiceAccount", "name": account,
                                                    "namespace": "tandem-system"}])
        self.check_dashboards(one(objects, "ConfigMap"))

    def check_hardened_with_probes(self, deployment, port):
        pod = deployment["spec"]["template"]["spec"]
        self.assertTrue(pod["securityContext"]["runAsNonRoot"])
        self.assertEqual(pod["securityContext"]["runAsUser"], 65532)
        container = pod["containers"][0]
        self.assertTrue(container["securityContext"]["readOnlyRootFilesystem"])
        self.assertFalse(container["securityContext"]["allowPrivilegeEscalation"])
        self.assertEqual(container["securityContext"]["capabilities"], {"drop": ["ALL"]})
        self.assertEqual(container["ports"], [{"name": "metrics", "containerPort": port, "protocol": "TCP"}])
        self.assertEqual(container["livenessProbe"]["httpGet"], {"path": "/healthz", "port": "metrics"})
        self.assertEqual(container["readinessProbe"]["httpGet"], {"path": "/readyz", "port": "metrics"})

    def check_dashboards(self, config_map):
        self.assertEqual(config_map["metadata"]["labels"]["grafana_dashboard"], "1")
        files = sorted(os.listdir(DASHBOARDS))
        self.assertIn("tandem-training.json", files)
        self.assertEqual(sorted(config_map["data"]), files)
        for name in files:
            with open(os.path.join(DASHBOARDS, name)) as f:
                self.assertEqual(config_map["data"][name], f.read(), name)

    def test_everything_enabled(self):
        objects = helm_render.render(name="prod", namespace="ops", sets=EVERYTHING)
        kinds = by_kind(objects)
        deployment = one(objects, "Deployment", "prod-tandem-operator")
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        self.assertEqual(args, ["--metrics-port=9090", "--worker-image=tandem-worker:0.1.0", "--namespace=team-a",
                                "--leader-elect", "--lease-name=prod-tandem-operator"])
        self.check_hardened_with_probes(deployment, 9090)

        # One watched namespace: a Role there, nothing cluster-wide.
        self.assertNotIn("ClusterRole", kinds)
        self.assertNotIn("ClusterRoleBinding", kinds)
        role = one(objects, "Role", "prod-tandem-operator")
        self.assertEqual(role["metadata"]["namespace"], "team-a")
        self.assertEqual(role["rules"], plain_rbac()["ClusterRole"]["rules"])
        binding = one(objects, "RoleBinding", "prod-tandem-operator")
        self.assertEqual(binding["metadata"]["namespace"], "team-a")
        self.assertEqual(binding["roleRef"]["kind"], "Role")
        self.assertEqual(binding["subjects"][0]["namespace"], "ops")
        self.assertEqual(one(objects, "Role", "prod-tandem-operator-leader-election")["metadata"]["namespace"], "ops")

        # The ServiceMonitor finds the metrics Service, whose port is the metrics port.
        service = one(objects, "Service")
        monitor = one(objects, "ServiceMonitor")
        self.assertEqual(monitor["apiVersion"], "monitoring.coreos.com/v1")
        self.assertTrue(selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"]))
        self.assertEqual(monitor["spec"]["namespaceSelector"], {"matchNames": ["ops"]})
        self.assertEqual([e["port"] for e in monitor["spec"]["endpoints"]], ["metrics"])
        self.assertEqual(service["spec"]["ports"][0]["port"], 9090)

        # The PodMonitor scrapes every worker of the watched namespace on 9400, keeping their job label.
        pod_monitor = one(objects, "PodMonitor")
        self.assertEqual(pod_monitor["spec"]["selector"], WORKER_SELECTOR)
        self.assertEqual(pod_monitor["spec"]["namespaceSelector"], {"matchNames": ["team-a"]})
        self.assertEqual(pod_monitor["spec"]["podMetricsEndpoints"],
                         [{"targetPort": 9400, "path": "/metrics", "interval": "15s", "honorLabels": True}])

        policies = {p["metadata"]["name"]: p for p in kinds["NetworkPolicy"]}
        self.assertEqual(sorted(policies), ["prod-tandem-operator", "prod-tandem-workers"])
        operator = policies["prod-tandem-operator"]
        self.assertEqual(operator["metadata"]["namespace"], "ops")
        self.assertTrue(selects(operator["spec"]["podSelector"]["matchLabels"], pod_labels))
        self.assertEqual(operator["spec"]["policyTypes"], ["Ingress"])
        self.assertEqual(operator["spec"]["ingress"], [{"ports": [{"port": 9090, "protocol": "TCP"}]}])
        workers = policies["prod-tandem-workers"]
        self.assertEqual(workers["metadata"]["namespace"], "team-a")
        self.assertEqual(workers["spec"]["podSelector"], WORKER_SELECTOR)
        peers, metrics = workers["spec"]["ingress"]
        # Same namespace only: a podSelector without a namespaceSelector.
        self.assertEqual(peers["from"], [{"podSelector": WORKER_SELECTOR}])
        self.assertEqual(peers["ports"], [{"port": 29400, "protocol": "TCP"}, {"protocol": "TCP"}])
        self.assertEqual(metrics, {"ports": [{"port": 9400, "protocol": "TCP"}]})

    def test_network_policy_options(self):
        default = {p["metadata"]["namespace"] for p in by_kind(helm_render.render(sets=["networkPolicy.enabled=true"]))
                   ["NetworkPolicy"]}
        self.assertEqual(default, {"tandem-system"})  # operator and workers both in the release namespace
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as values:
            values.write("networkPolicy:\n  enabled: true\n  workerNamespaces: [team-a, team-b]\n  metricsFrom:\n"
                         "    - namespaceSelector: {matchLabels: {name: monitoring}}\n")
            values.flush()
            objects = helm_render.render(values_files=[values.name])
        peer = [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]
        policies = by_kind(objects)["NetworkPolicy"]
        operator = [p for p in policies if p["metadata"]["name"] == "tandem-operator"]
        workers = [p for p in policies if p["metadata"]["name"] == "tandem-workers"]
        self.assertEqual(operator[0]["spec"]["ingress"][0]["from"], peer)
        self.assertEqual([p["metadata"]["namespace"] for p in workers], ["team-a", "team-b"])
        for policy in workers:
            self.assertEqual(policy["spec"]["ingress"][1]["from"], peer)

    def test_leader_election_off(self):
        objects = helm_render.render(sets=["leaderElect=false", "replicas=1"])
        args = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
        self.assertEqual(args, ["--metrics-port=8080", "--worker-image=tandem-worker:0.1.0"])
        self.assertEqual([o["metadata"]["name"] for o in by_kind(objects).get("Role", [])], [])
        # Two operators without a Lease would fight over every job: refused at render time.
        result = helm_render.run("--chart", CHART, "--set", "leaderElect=false")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("replicas > 1 needs leaderElect=true", result.stderr)

    def test_optional_objects_can_be_left_out(self):
        objects = helm_render.render(sets=["rbac.create=false", "serviceAccount.create=false",
                                           "dashboards.enabled=false"])
        self.assertEqual(sorted(o["kind"] for _, o in objects), ["Deployment", "Service"])
        self.assertEqual(one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"], "default")

    def test_notes_render(self):
        notes = helm_render.notes(sets=EVERYTHING)
        self.assertIn("kubectl -n tandem-system rollout status deployment/tandem-operator", notes)
        self.assertIn("kubectl apply -f", notes)  # how to upgrade the CRD, which Helm never does
        self.assertNotIn("<no value>", notes)


class RendererSemantics(unittest.TestCase):
    """The Helm behaviours the chart relies on, checked on a scratch chart, so that a renderer bug cannot hide
    behind the chart test."""

    def render_scratch(self, template, values="", *args):
        with tempfile.TemporaryDirectory() as chart:
            os.makedirs(os.path.join(chart, "templates"))
            os.makedirs(os.path.join(chart, "files"))
            with open(os.path.join(chart, "Chart.yaml"), "w") as f:
                f.write('apiVersion: v2\nname: scratch\nversion: 1.2.3\nappVersion: "4.5"\nkubeVersion: ">=1.20.0-0"\n')
            with open(os.path.join(chart, "values.yaml"), "w") as f:
                f.write(values)
            with open(os.path.join(chart, "files", "a.txt"), "w") as f:
                f.write("alpha\n")
            with open(os.path.join(chart, "templates", "_helpers.tpl"), "w") as f:
                f.write('{{- define "scratch.greeting" -}}hello {{ .name }}{{- end }}')
            with open(os.path.join(chart, "templates", "cm.yaml"), "w") as f:
                f.write(template)
            return helm_render.run("--chart", chart, "--name", "r", "--namespace", "n", "--output", "json", *args)

    def data(self, result):
        self.assertEqual(result.returncode, 0, result.stderr)
        return json.loads(result.stdout)[0]["object"]["data"]

    def test_helm_functions_and_objects(self):
        template = """apiVersion: v1
kind: ConfigMap
metadata: {name: x}
data:
  include: {{ include "scratch.greeting" (dict "name" "you") | quote }}
  tpl: {{ tpl "{{ .Release.Name }}-{{ .Values.a.b }}" . | quote }}
  missing: "{{ .Values.nothing }}"
  chart: "{{ .Chart.Name }} {{ .Chart.Version }} {{ .Chart.AppVersion }}"
  release: "{{ .Release.Name }} {{ .Release.Namespace }} {{ .Release.Service }}"
  kube: "{{ .Capabilities.KubeVersion.Version }} {{ .Capabilities.APIVersions.Has "apps/v1" }} {{ .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" }}"
  template: "{{ .Template.Name }}"
  yaml: {{ toYaml .Values.a | quote }}
  fromYaml: "{{ (fromYaml "k: v").k }}"
  files: {{ .Files.Get "files/a.txt" | quote }}
  config: {{ (.Files.Glob "files/*").AsConfig | quote }}
  sprig: "{{ upper "x" }} {{ list 1 2 | len }}"
"""
        data = self.data(self.render_scratch(template, "a: {b: 7}\n", "--set", "a.c=true"))
        self.assertEqual(data, {
            "include": "hello you", "tpl": "r-7", "missing": "", "chart": "scratch 1.2.3 4.5",
            "release": "r n Helm", "kube": "v1.20.2 true false", "template": "scratch/templates/cm.yaml",
            "yaml": "b: 7\nc: true", "fromYaml": "v", "files": "alpha\n", "config": "a.txt: |\n  alpha",
            "sprig": "X 2"})

    def test_required_fails_and_kube_version_is_checked(self):
        template = 'kind: ConfigMap\ndata: {x: {{ required "x is required" .Values.x }}}\n'
        result = self.render_scratch(template)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("x is required", result.stderr)
        self.assertEqual(self.data(self.render_scratch(template, "", "--set", "x=1")), {"x": 1})
        result = self.render_scratch(template, "", "--set", "x=1", "--kube-version", "v1.19.4")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("incompatible with Kubernetes v1.19.4", result.stderr)
        self.assertIn("true", self.render_scratch(
            '{{ .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" }}: x\n', "",
            "--api-versions", "monitoring.coreos.com/v1").stdout)


# Test-only stand-in for prometheus-operator's CRDs: the group, versions, kinds and scope the chart's
# ServiceMonitor/PodMonitor need for a server dry run, with an open schema. It is NOT the real schema, so the
# field-level shape of those two objects is checked by ChartRendering above, not by the server.
MONITORING_CRDS = [{
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{plural}.monitoring.coreos.com"},
    "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
             "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower()},
             "versions": [{"name": "v1", "served": True, "storage": True,
                           "schema": {"openAPIV3Schema": {"type": "object",
                                                          "x-kubernetes-preserve-unknown-fields": True}}}]},
} for kind, plural in (("ServiceMonitor", "servicemonitors"), ("PodMonitor", "podmonitors"))]


class ChartAgainstApiServer(kube_fixture.KubeTestCase):
    """Every rendered object is accepted by a real kube-apiserver 1.20.2."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # The chart's own crds/ directory, as `helm install` applies it before the templates.
        cls.kube.kubectl("apply", "-f", os.path.join(CHART, "crds"), check=True)
        cls.kube.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                               "items": MONITORING_CRDS}), check=True)
        for crd in ("distributedtrainingjobs.tandem.dev", "servicemonitors.monitoring.coreos.com",
                    "podmonitors.monitoring.coreos.com"):
            cls.wait_for(lambda: cls.kube.kubectl("get", "crd", crd, "-o",
                                                  "jsonpath={.status.conditions[?(@.type=='Established')].status}")
                         .stdout == "True", 60, f"CRD {crd} not established")
        for namespace in ("tandem-system", "ops", "team-a"):
            cls.kube.kubectl("create", "namespace", namespace, check=True)

    def dry_run_each(self, objects):
        self.assertTrue(objects)
        for source, obj in objects:
            with self.subTest(source=source, kind=obj["kind"], name=obj["metadata"]["name"]):
                result = self.kube.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(obj))
                self.assertEqual(result.returncode, 0, result.stderr)
                self.assertIn("(server dry run)", result.stdout)

    def test_defaults_pass_server_dry_run(self):
        self.dry_run_each(helm_render.render())

    def test_everything_enabled_passes_server_dry_run(self):
        objects = helm_render.render(name="prod", namespace="ops", sets=EVERYTHING)
        self.assertIn("ServiceMonitor", by_kind(objects))
        self.assertIn("PodMonitor", by_kind(objects))
        self.dry_run_each(objects)

    def test_template_output_pipes_into_kubectl(self):
        # What users do without Tiller-side rendering: helm template ... | kubectl apply -f -
        stream = helm_render.render(name="prod", namespace="ops", sets=EVERYTHING, output="yaml")
        result = self.kube.kubectl("apply", "--dry-run=server", "-f", "-", input=stream)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.count("(server dry run)"), stream.count("\n---\n") + 1)

    def test_watch_namespace_rbac_is_confined_to_that_namespace(self):
        # Installed for real this time, then asked of the server as the operator's ServiceAccount.
        objects = helm_render.render(name="scoped", namespace="ops", sets=["watchNamespace=team-a"])
        for _, obj in objects:
            self.kube.kubectl("apply", "-f", "-", input=json.dumps(obj), check=True)
        account = "system:serviceaccount:ops:scoped-tandem-operator"

        def can(verb, resource, namespace):
            result = self.kube.kubectl("auth", "can-i", verb, resource, "-n", namespace, f"--as={account}")
            self.assertIn(result.stdout.strip(), ("yes", "no"), result.stderr)
            return result.stdout.strip() == "yes"

        self.assertTrue(can("create", "pods", "team-a"))
        self.assertTrue(can("watch", "distributedtrainingjobs.tandem.dev", "team-a"))
        self.assertTrue(can("update", "leases.coordination.k8s.io", "ops"))
        self.assertFalse(can("create", "pods", "default"))
        self.assertFalse(can("watch", "distributedtrainingjobs.tandem.dev", "ops"))
        self.assertFalse(can("update", "leases.coordination.k8s.io", "team-a"))


if __name__ == "__main__":
    unittest.main()
