// tandem-helm-render: renders a Helm chart the way `helm template` does, for tests on a machine without
// Helm (Helm is not packaged in Debian 12). It is built offline from Debian's Go packages
// (golang-github-masterminds-sprig-dev, golang-k8s-sigs-yaml-dev; GOPATH=/usr/share/gocode, GO111MODULE=off)
// by tests/helm/helm_render.py.
//
// What it implements of Helm 3's rendering (pkg/engine, pkg/chartutil, pkg/releaseutil), and nothing more:
//   - text/template with sprig's TxtFuncMap minus env/expandenv (Helm removes them), plus Helm's include,
//     tpl, required, toYaml, fromYaml, fromYamlArray, toJson, fromJson, fromJsonArray, and lookup (always an
//     empty map, as in `helm template`);
//   - option missingkey=zero, and "<no value>" removed from the output, like Helm's non-strict mode;
//   - every file of templates/ parsed into one set (so define/include work across files); files whose
//     name starts with "_" and NOTES.txt are not emitted (--notes prints the rendered NOTES.txt instead,
//     after every manifest rendered, as Helm renders it last);
//   - .Values: values.yaml coalesced with -f files (in order) then --set/--set-string (later wins; maps merge
//     deeply; a null removes a key). --set takes `a.b.c=v[,x=y]` with Helm's typing (true/false, null,
//     int64, else string); list syntax (`a[0]=`, `{a,b}`) and escaped commas are NOT supported;
//   - .Release (Name, Namespace, Service "Helm", IsInstall true, IsUpgrade false, Revision 1), .Chart (the
//     Chart.yaml fields, capitalised), .Template (Name, BasePath), .Capabilities (KubeVersion with
//     Version/Major/Minor/GitVersion, APIVersions.Has over a built-in list of Kubernetes 1.20 group versions
//     plus --api-versions);
//   - .Files: every chart file outside templates/ except Chart.yaml and values.yaml (crds/ included, as in
//     Helm), honouring no .helmignore; Get, GetBytes, Glob (path.Match patterns, no `**`), Lines,
//     AsConfig, AsSecrets;
//   - Chart.yaml's kubeVersion constraint checked against --kube-version (Helm fails the same way);
//   - manifests split on `---`, each parsed as YAML (a parse error fails like Helm's), sorted stably by
//     Helm's install order of kinds (unknown kinds last, alphabetically), printed as
//     `---\n# Source: <chart>/templates/<file>\n<manifest>`; --include-crds prints crds/ first;
//   - test aids, not Helm's: --output json prints [{"source", "object"}], --to-json FILE converts any
//     multi-document YAML file the same way (the Python tests use the standard library only).
//
// Not implemented: subcharts and dependencies, hooks, values.schema.json, library charts, .helmignore,
// post-renderers, --show-only, strict mode, lookup against a cluster.
package main

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"text/template"

	"github.com/Masterminds/semver"
	"github.com/Masterminds/sprig"
	"sigs.k8s.io/yaml"
)

// ----- chart metadata and capabilities ----------------------------------------------------------------

type Chart struct {
	APIVersion  string   `json:"apiVersion"`
	Name        string   `json:"name"`
	Version     string   `json:"version"`
	AppVersion  string   `json:"appVersion"`
	KubeVersion string   `json:"kubeVersion"`
	Description string   `json:"description"`
	Type        string   `json:"type"`
	Home        string   `json:"home"`
	Icon        string   `json:"icon"`
	Keywords    []string `json:"keywords"`
	Sources     []string `json:"sources"`
}

type KubeVersion struct {
	Version string
	Major   string
	Minor   string
}

func (v KubeVersion) String() string     { return v.Version }
func (v KubeVersion) GitVersion() string { return v.Version }

type VersionSet []string

func (s VersionSet) Has(apiVersion string) bool {
	for _, v := range s {
		if v == apiVersion {
			return true
		}
	}
	return false
}

type Capabilities struct {
	KubeVersion KubeVersion
	APIVersions VersionSet
}

// The group versions a Kubernetes 1.20 API server serves (Helm's default set comes from client-go's scheme).
var defaultAPIVersions = []string{
	"v1", "admissionregistration.k8s.io/v1", "apiextensions.k8s.io/v1", "apiregistration.k8s.io/v1",
	"apps/v1", "authentication.k8s.io/v1", "authorization.k8s.io/v1", "autoscaling/v1", "autoscaling/v2beta2",
	"batch/v1", "batch/v1beta1", "certificates.k8s.io/v1", "coordination.k8s.io/v1", "discovery.k8s.io/v1beta1",
	"events.k8s.io/v1", "networking.k8s.io/v1", "node.k8s.io/v1", "policy/v1beta1", "rbac.authorization.k8s.io/v1",
	"scheduling.k8s.io/v1", "storage.k8s.io/v1",
}

// ----- .Files --------------------------------------------------------------------------------------------

type Files map[string][]byte

func (f Files) GetBytes(name string) []byte { return f[name] }
func (f Files) Get(name string) string      { return string(f[name]) }

func (f Files) Glob(pattern string) Files {
	out := Files{}
	for name, data := range f {
		if ok, _ := path.Match(pattern, name); ok {
			out[name] = data
		}
	}
	return out
}

func (f Files) Lines(name string) []string {
	if f[name] == nil {
		return []string{}
	}
	return strings.Split(string(f[name]), "\n")
}

// AsConfig and AsSecrets key each file by its base name, as Helm does.
func (f Files) AsConfig() string {
	m := map[string]string{}
	for name, data := range f {
		m[path.Base(name)] = string(data)
	}
	return toYAML(m)
}

func (f Files) AsSecrets() string {
	m := map[string]string{}
	for name, data := range f {
		m[path.Base(name)] = base64.StdEncoding.EncodeToString(data)
	}
	return toYAML(m)
}

// ----- Helm's extra template functions -------------------------------------------------------------------

func toYAML(v interface{}) string {
	data, err := yaml.Marshal(v)
	if err != nil {
		return "" // Helm swallows the error the same way
	}
	return strings.TrimSuffix(string(data), "\n")
}

func fromYAML(s string) map[string]interface{} {
	m := map[string]interface{}{}
	if err := yaml.Unmarshal([]byte(s), &m); err != nil {
		m["Error"] = err.Error()
	}
	return m
}

func fromYAMLArray(s string) []interface{} {
	a := []interface{}{}
	if err := yaml.Unmarshal([]byte(s), &a); err != nil {
		a = []interface{}{err.Error()}
	}
	return a
}

func toJSON(v interface{}) string {
	data, err := json.Marshal(v)
	if err != nil {
		return ""
	}
	return string(data)
}

func fromJSON(s string) map[string]interface{} {
	m := map[string]interface{}{}
	if err := json.Unmarshal([]byte(s), &m); err != nil {
		m["Error"] = err.Error()
	}
	return m
}

func fromJSONArray(s string) []interface{} {
	a := []interface{}{}
	if err := json.Unmarshal([]byte(s), &a); err != nil {
		a = []interface{}{err.Error()}
	}
	return a
}

func required(message string, value interface{}) (interface{}, error) {
	if value == nil {
		return value, errors.New(message)
	}
	if s, ok := value.(string); ok && s == "" {
		return value, errors.New(message)
	}
	return value, nil
}

const maxIncludeDepth = 1000 // Helm's recursionMaxNums

func funcMap(root *template.Template) template.FuncMap {
	f := sprig.TxtFuncMap()
	delete(f, "env")
	delete(f, "expandenv")
	depth := map[string]int{}
	f["include"] = func(name string, data interface{}) (string, error) {
		if depth[name] > maxIncludeDepth {
			return "", fmt.Errorf("rendering template has a nested reference name: %s", name)
		}
		depth[name]++
		defer func() { depth[name]-- }()
		var buf strings.Builder
		err := root.ExecuteTemplate(&buf, name, data)
		return buf.String(), err
	}
	f["tpl"] = func(text string, data interface{}) (string, error) {
		t, err := root.Clone()
		if err != nil {
			return "", err
		}
		t, err = t.New("tpl").Option("missingkey=zero").Parse(text)
		if err != nil {
			return "", fmt.Errorf("cannot parse template %q: %w", text, err)
		}
		var buf strings.Builder
		if err := t.Execute(&buf, data); err != nil {
			return "", err
		}
		return strings.ReplaceAll(buf.String(), "<no value>", ""), nil
	}
	f["required"] = required
	f["toYaml"] = toYAML
	f["fromYaml"] = fromYAML
	f["fromYamlArray"] = fromYAMLArray
	f["toJson"] = toJSON
	f["fromJson"] = fromJSON
	f["fromJsonArray"] = fromJSONArray
	f["lookup"] = func(apiVersion, kind, namespace, name string) (map[string]interface{}, error) {
		return map[string]interface{}{}, nil
	}
	return f
}

// ----- values --------------------------------------------------------------------------------------------

// mergeValues coalesces src over dst in place: maps merge key by key, anything else replaces, null deletes.
func mergeValues(dst, src map[string]interface{}) {
	for key, value := range src {
		if value == nil {
			delete(dst, key)
			continue
		}
		srcMap, srcIsMap := value.(map[string]interface{})
		dstMap, dstIsMap := dst[key].(map[string]interface{})
		if srcIsMap && dstIsMap {
			mergeValues(dstMap, srcMap)
		} else {
			dst[key] = value
		}
	}
}

// typedValue follows Helm's strvals typing for --set.
func typedValue(s string) interface{} {
	switch s {
	case "true":
		return true
	case "false":
		return false
	case "null":
		return nil
	case "0":
		return int64(0)
	}
	if len(s) > 0 && s[0] != '0' {
		if i, err := strconv.ParseInt(s, 10, 64); err == nil {
			return i
		}
	}
	return s
}

func parseSet(assignments string, typed bool) (map[string]interface{}, error) {
	out := map[string]interface{}{}
	for _, assignment := range strings.Split(assignments, ",") {
		key, raw, ok := strings.Cut(assignment, "=")
		if !ok || key == "" {
			return nil, fmt.Errorf("--set %q: want key=value", assignment)
		}
		if strings.ContainsAny(key, "[]{}") || strings.ContainsAny(raw, "{}") {
			return nil, fmt.Errorf("--set %q: list syntax is not implemented", assignment)
		}
		var value interface{} = raw
		if typed {
			value = typedValue(raw)
		}
		parts := strings.Split(key, ".")
		node := out
		for _, part := range parts[:len(parts)-1] {
			next, ok := node[part].(map[string]interface{})
			if !ok {
				next = map[string]interface{}{}
				node[part] = next
			}
			node = next
		}
		node[parts[len(parts)-1]] = value
	}
	return out, nil
}

// ----- manifests -----------------------------------------------------------------------------------------

// Helm's releaseutil.InstallOrder.
var installOrder = []string{
	"PriorityClass", "Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange", "PodSecurityPolicy",
	"PodDisruptionBudget", "ServiceAccount", "Secret", "SecretList", "ConfigMap", "StorageClass",
	"PersistentVolume", "PersistentVolumeClaim", "CustomResourceDefinition", "ClusterRole", "ClusterRoleList",
	"ClusterRoleBinding", "ClusterRoleBindingList", "Role", "RoleList", "RoleBinding", "RoleBindingList",
	"Service", "DaemonSet", "Pod", "ReplicationController", "ReplicaSet", "Deployment",
	"HorizontalPodAutoscaler", "StatefulSet", "Job", "CronJob", "IngressClass", "Ingress", "APIService",
}

type manifest struct {
	source  string
	kind    string
	content string
}

var separator = regexp.MustCompile(`(?:^|\s*\n)---\s*`)

func splitManifests(source, rendered string) ([]manifest, error) {
	var out []manifest
	for _, doc := range separator.Split(rendered, -1) {
		doc = strings.TrimSpace(doc)
		if doc == "" {
			continue
		}
		var head struct {
			Kind string `json:"kind"`
		}
		if err := yaml.Unmarshal([]byte(doc), &head); err != nil {
			return nil, fmt.Errorf("YAML parse error on %s: %w", source, err)
		}
		out = append(out, manifest{source: source, kind: head.Kind, content: doc})
	}
	return out, nil
}

func sortByInstallOrder(manifests []manifest) {
	rank := func(kind string) int {
		for i, k := range installOrder {
			if k == kind {
				return i
			}
		}
		return len(installOrder)
	}
	sort.SliceStable(manifests, func(i, j int) bool {
		a, b := rank(manifests[i].kind), rank(manifests[j].kind)
		if a != b {
			return a < b
		}
		if a == len(installOrder) {
			return manifests[i].kind < manifests[j].kind
		}
		return false
	})
}

// ----- main ----------------------------------------------------------------------------------------------

type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

func readYAMLMap(file string) (map[string]interface{}, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	m := map[string]interface{}{}
	if err := yaml.Unmarshal(data, &m); err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	return m, nil
}

func run() error {
	var valueFiles, sets, setStrings, apiVersions stringList
	chartDir := flag.String("chart", "", "chart directory")
	releaseName := flag.String("name", "release-name", "release name")
	namespace := flag.String("namespace", "default", "release namespace")
	kubeVersion := flag.String("kube-version", "v1.20.2", "Kubernetes version for .Capabilities and kubeVersion")
	includeCRDs := flag.Bool("include-crds", false, "print crds/ first")
	notes := flag.Bool("notes", false, "print the rendered NOTES.txt instead of the manifests")
	output := flag.String("output", "yaml", "yaml (like helm template) or json (an array of {source, object})")
	toJSONFile := flag.String("to-json", "", "only convert this multi-document YAML file to a JSON array and exit")
	flag.Var(&valueFiles, "f", "values file (repeatable)")
	flag.Var(&sets, "set", "key=value[,key=value] (repeatable)")
	flag.Var(&setStrings, "set-string", "key=value[,key=value] kept as strings (repeatable)")
	flag.Var(&apiVersions, "api-versions", "extra group/version for .Capabilities.APIVersions (repeatable)")
	flag.Parse()
	if *toJSONFile != "" {
		data, err := os.ReadFile(*toJSONFile)
		if err != nil {
			return err
		}
		docs, err := splitManifests(*toJSONFile, string(data))
		if err != nil {
			return err
		}
		return printJSON(docs)
	}
	if *chartDir == "" {
		return errors.New("--chart is required")
	}

	var chart Chart
	chartYAML, err := os.ReadFile(filepath.Join(*chartDir, "Chart.yaml"))
	if err != nil {
		return err
	}
	if err := yaml.Unmarshal(chartYAML, &chart); err != nil {
		return fmt.Errorf("Chart.yaml: %w", err)
	}
	version, err := semver.NewVersion(*kubeVersion)
	if err != nil {
		return fmt.Errorf("--kube-version: %w", err)
	}
	if chart.KubeVersion != "" {
		constraint, err := semver.NewConstraint(chart.KubeVersion)
		if err != nil {
			return fmt.Errorf("Chart.yaml kubeVersion: %w", err)
		}
		if !constraint.Check(version) {
			return fmt.Errorf("chart requires kubeVersion: %s which is incompatible with Kubernetes %s",
				chart.KubeVersion, *kubeVersion)
		}
	}

	values, err := readYAMLMap(filepath.Join(*chartDir, "values.yaml"))
	if err != nil {
		return err
	}
	for _, file := range valueFiles {
		extra, err := readYAMLMap(file)
		if err != nil {
			return err
		}
		mergeValues(values, extra)
	}
	for _, group := range []struct {
		list  stringList
		typed bool
	}{{sets, true}, {setStrings, false}} {
		for _, assignments := range group.list {
			extra, err := parseSet(assignments, group.typed)
			if err != nil {
				return err
			}
			mergeValues(values, extra)
		}
	}

	// Read the chart: templates/ into the template set, everything else but Chart.yaml/values.yaml into .Files.
	files := Files{}
	templates := map[string]string{}
	err = filepath.WalkDir(*chartDir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(*chartDir, p)
		rel = filepath.ToSlash(rel)
		data, err := os.ReadFile(p) // follows symlinks, as Helm's loader does
		if err != nil {
			return err
		}
		switch {
		case strings.HasPrefix(rel, "templates/"):
			templates[chart.Name+"/"+rel] = string(data)
		case rel == "Chart.yaml" || rel == "values.yaml":
		default:
			files[rel] = data
		}
		return nil
	})
	if err != nil {
		return err
	}

	root := template.New("gotpl").Option("missingkey=zero")
	root.Funcs(funcMap(root))
	names := make([]string, 0, len(templates))
	for name := range templates {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		if _, err := root.New(name).Parse(templates[name]); err != nil {
			return fmt.Errorf("parse error in %s: %w", name, err)
		}
	}

	major, minor := strconv.FormatUint(version.Major(), 10), strconv.FormatUint(version.Minor(), 10)
	capabilities := Capabilities{
		KubeVersion: KubeVersion{Version: "v" + version.String(), Major: major, Minor: minor},
		APIVersions: append(VersionSet(defaultAPIVersions), apiVersions...),
	}
	release := map[string]interface{}{
		"Name": *releaseName, "Namespace": *namespace, "Service": "Helm",
		"IsInstall": true, "IsUpgrade": false, "Revision": 1,
	}
	render := func(name string) (string, error) {
		data := map[string]interface{}{
			"Values": values, "Release": release, "Chart": chart, "Capabilities": capabilities, "Files": files,
			"Template": map[string]interface{}{"Name": name, "BasePath": chart.Name + "/templates"},
		}
		var buf bytes.Buffer
		if err := root.ExecuteTemplate(&buf, name, data); err != nil {
			return "", err
		}
		return strings.ReplaceAll(buf.String(), "<no value>", ""), nil
	}

	notesName := chart.Name + "/templates/NOTES.txt"
	var manifests []manifest
	for _, name := range names {
		if strings.HasPrefix(path.Base(name), "_") || name == notesName {
			continue
		}
		text, err := render(name)
		if err != nil {
			return err
		}
		split, err := splitManifests(name, text)
		if err != nil {
			return err
		}
		manifests = append(manifests, split...)
	}
	sortByInstallOrder(manifests)

	// Like Helm, NOTES.txt is rendered after (and only if) every manifest rendered.
	if *notes {
		if _, ok := templates[notesName]; !ok {
			return errors.New("the chart has no templates/NOTES.txt")
		}
		text, err := render(notesName)
		if err != nil {
			return err
		}
		fmt.Print(text)
		return nil
	}

	if *includeCRDs {
		var crds []string
		for name := range files {
			if strings.HasPrefix(name, "crds/") {
				crds = append(crds, name)
			}
		}
		sort.Strings(crds)
		var crdManifests []manifest
		for _, name := range crds {
			split, err := splitManifests(chart.Name+"/"+name, string(files[name]))
			if err != nil {
				return err
			}
			crdManifests = append(crdManifests, split...)
		}
		manifests = append(crdManifests, manifests...)
	}
	if *output == "json" {
		return printJSON(manifests)
	}
	out := &strings.Builder{}
	for _, m := range manifests {
		fmt.Fprintf(out, "---\n# Source: %s\n%s\n", m.source, m.content)
	}
	fmt.Print(out.String())
	return nil
}

// printJSON prints manifests as [{"source": ..., "object": ...}] for tests that parse with a JSON library only.
func printJSON(manifests []manifest) error {
	type entry struct {
		Source string          `json:"source"`
		Object json.RawMessage `json:"object"`
	}
	entries := []entry{}
	for _, m := range manifests {
		object, err := yaml.YAMLToJSON([]byte(m.content))
		if err != nil {
			return fmt.Errorf("%s: %w", m.source, err)
		}
		entries = append(entries, entry{m.source, object})
	}
	data, err := json.MarshalIndent(entries, "", "  ")
	if err != nil {
		return err
	}
	fmt.Println(string(data))
	return nil
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "Error:", err)
		os.Exit(1)
	}
}
