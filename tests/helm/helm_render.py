"""Renders charts/tandem like `helm template`, through tests/helm/render.go (Helm is not packaged in Debian 12;
render.go's header lists exactly which Helm semantics it implements).

The renderer is built offline from Debian's Go packages (GOPATH=/usr/share/gocode, GO111MODULE=off: nothing is
downloaded) on first use, into $TANDEM_BIN_DIR/../helm-render when the tests run from a build, else into
/tmp; the binary's name carries a hash of render.go, so an edit rebuilds it and an unchanged source is reused.
"""

import hashlib
import json
import os
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
CHART = os.path.join(REPO, "charts", "tandem")
SOURCE = os.path.join(HERE, "render.go")
GOPATH = "/usr/share/gocode"
BUILD_TIMEOUT = 600  # sprig and its dependencies compile from source once, on 2 loaded cores

_binary = None


def cache_dir():
    bin_dir = os.environ.get("TANDEM_BIN_DIR")
    if bin_dir:
        return os.path.join(os.path.dirname(os.path.abspath(bin_dir)), "helm-render")
    return os.path.join(tempfile.gettempdir(), f"tandem-helm-render-{os.getuid()}")


def renderer():
    """Path of the built renderer, building it when missing."""
    global _binary
    if _binary is None:
        with open(SOURCE, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        directory = cache_dir()
        binary = os.path.join(directory, f"tandem-helm-render-{digest}")
        if not os.path.exists(binary):
            os.makedirs(directory, exist_ok=True)
            partial = f"{binary}.{os.getpid()}.tmp"
            env = dict(os.environ, GO111MODULE="off", GOPATH=GOPATH, GOFLAGS="",
                       GOCACHE=os.path.join(directory, "gocache"), CGO_ENABLED="0")
            result = subprocess.run(["go", "build", "-o", partial, SOURCE], cwd=HERE, env=env, capture_output=True,
                                    text=True, timeout=BUILD_TIMEOUT)
            if result.returncode != 0:
                raise RuntimeError(f"building {SOURCE} failed (scripts/setup installs golang-go, "
                                   f"golang-github-masterminds-sprig-dev, golang-k8s-sigs-yaml-dev):\n{result.stderr}")
            os.replace(partial, binary)  # atomic: a concurrent build never leaves a half-written binary
        _binary = binary
    return _binary


def _args(name, namespace, sets, values_files, api_versions):
    args = ["--chart", CHART, "--name", name, "--namespace", namespace]
    for assignment in sets:
        args += ["--set", assignment]
    for path in values_files:
        args += ["-f", path]
    for version in api_versions:
        args += ["--api-versions", version]
    return args


def run(*args):
    """Runs the renderer; returns CompletedProcess (text), never raising on a failed render."""
    return subprocess.run([renderer(), *args], capture_output=True, text=True, timeout=60)


def render(name="tandem", namespace="tandem-system", sets=(), values_files=(), api_versions=(), include_crds=False,
           output="json"):
    """The chart's manifests: a list of (source, object) for output json, the YAML stream for output yaml."""
    args = _args(name, namespace, sets, values_files, api_versions) + ["--output", output]
    if include_crds:
        args.append("--include-crds")
    result = run(*args)
    if result.returncode != 0:
        raise AssertionError(f"rendering the chart failed:\n{result.stderr}")
    if output == "yaml":
        return result.stdout
    return [(entry["source"], entry["object"]) for entry in json.loads(result.stdout)]


def notes(name="tandem", namespace="tandem-system", sets=()):
    result = run(*_args(name, namespace, sets, (), ()), "--notes")
    if result.returncode != 0:
        raise AssertionError(f"rendering NOTES.txt failed:\n{result.stderr}")
    return result.stdout


def yaml_to_json(path):
    """Every document of a YAML file, parsed (the tests use Python's standard library only)."""
    result = run("--to-json", path)
    if result.returncode != 0:
        raise AssertionError(f"parsing {path} failed:\n{result.stderr}")
    return [entry["object"] for entry in json.loads(result.stdout)]
