"""A pod runner for the kube tier: plays scheduler and kubelet for a ControlPlane (DESIGN.md §10).

A background thread lists every pod about five times a second and:

- binds pending pods without spec.nodeName to its node (pods/binding; no Node object is needed);
- runs the first container of each bound pod as a local process (command + args, Kubernetes semantics) on
  its own loopback address 127.0.0.x, with the environment a kubelet would give (PATH, HOME, HOSTNAME and
  the container's env, downward API and secret/configMap references resolved through the API);
- mounts the pod's volumes (configMap, secret, emptyDir, persistentVolumeClaim, hostPath) with bind mounts in
  a private mount namespace per pod (`unshare --mount --uts`, which also gives the pod its hostname; needs
  root), together with a runner-wide hosts file
  over /etc/hosts that names every live pod the way cluster DNS would (`<hostname>.<subdomain>.<ns>.svc`);
- writes pod status (Running, then Succeeded/Failed with the exit code) through pods/status; a pod whose
  Secret or ConfigMap (or key) does not exist stays Pending, its container waiting in
  CreateContainerConfigError (environment, with the kubelet's words: `secret "<name>" not found`) or
  ContainerCreating (volumes, a FailedMount Event), and starts once it does;
- on deletion sends SIGTERM to the pod's process group, SIGKILL after the grace period, and then finalises
  the deletion; a pod that vanished from the API (force-deleted) has its process killed at once.

Usage, with a ControlPlane that runs kube-controller-manager (pods need the `default` ServiceAccount):

    with PodRunner(plane, bin_dirs=[os.environ["TANDEM_BIN_DIR"]]) as runner:
        ...  # create pods; runner.log_of(ns, name), runner.kill_process(ns, name, signal.SIGKILL)
        runner.check()  # re-raises a fatal runner error

Not modelled: init containers and every container but the first, probes, restartPolicy other than Never
(a pod whose container exits stays finished), resources, images (the command runs from the host's files).
Mount targets that do not exist are created on the host's filesystem (empty directories or files), since
the mount namespace is private but the filesystem is shared.

Thread-safety: the public methods may be called from any thread; they take the runner's lock.
"""

import base64
import datetime
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import traceback
import urllib.parse

from kube_fixture import die_with_parent

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
POLL_INTERVAL = 0.2
REQUEST_TIMEOUT = 10
STOP_TIMEOUT = 15
DEFAULT_GRACE_SECONDS = 30
UNSHARE = shutil.which("unshare", path="/usr/bin:/bin") or "/usr/bin/unshare"
MOUNT = shutil.which("mount", path="/usr/bin:/bin") or "/bin/mount"
MKDIR = shutil.which("mkdir", path="/usr/bin:/bin") or "/bin/mkdir"
HOSTNAME = shutil.which("hostname", path="/usr/bin:/bin") or "/bin/hostname"

# Debian's libgrpc++ 1.51 resolves names with c-ares by default, and c-ares reads /etc/hosts too (checked with
# a gRPC client in a pod of this runner), so the hosts file suffices and GRPC_DNS_RESOLVER stays unset: the
# pods get exactly the kubelet's environment.



def _now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def expand(text, variables):
    """Kubernetes $(VAR) expansion: known names are replaced, unknown ones kept literally, $$ escapes a $."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("$(", i) and ")" in text[i + 2:]:
            end = text.index(")", i + 2)
            name = text[i + 2:end]
            out.append(variables[name] if name in variables else text[i:end + 1])
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


class ApiError(RuntimeError):
    """A failed API call: logged and retried on the next poll, never fatal."""


class ConfigError(RuntimeError):
    """The pod cannot be started as written (missing Secret key, no command...): the pod fails with `reason`."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


class MissingObject(ConfigError):
    """A Secret or ConfigMap the pod reads, or a key of one, does not exist (yet): like the kubelet, the
    runner leaves the pod Pending with its container waiting, in CreateContainerConfigError for the
    environment (`secret "<name>" not found`, `couldn't find key <key> in Secret <ns>/<name>`) and in
    ContainerCreating for a volume (no message; a FailedMount Event says `MountVolume.SetUp failed for
    volume ...`), and tries again about once a second, starting it once the object is there. Volumes come
    first, as with the kubelet."""


class RunnerError(RuntimeError):
    pass


class _Pod:
    """What the runner knows about one pod it started (or tried to), keyed by uid."""

    def __init__(self, pod, ip, directory, log_path):
        meta = pod["metadata"]
        self.uid = meta["uid"]
        self.namespace = meta["namespace"]
        self.name = meta["name"]
        spec = pod.get("spec", {})
        self.hostname = spec.get("hostname") or self.name
        self.subdomain = spec.get("subdomain") or ""
        container = (spec.get("containers") or [{}])[0]
        self.container_name = container.get("name", "")
        self.image = container.get("image", "")
        self.ip = ip
        self.directory = directory
        self.log_path = log_path
        self.process = None
        self.started_at = None
        self.exit_code = None
        self.term_sent = None  # monotonic time of the SIGTERM sent on deletion
        self.kill_at = None
        self.pending_status = None  # the latest status patch not yet accepted by the API
        self.finished = False  # the process exited (or never started): nothing left to run

    @property
    def key(self):
        return f"{self.namespace}/{self.name}"


class PodRunner:
    """Scheduler + kubelet for tests: binds, runs, reports and deletes the pods of a ControlPlane."""

    def __init__(self, plane, bin_dirs=(), node_name="tandem-runner", poll_interval=POLL_INTERVAL):
        self.plane = plane
        self.bin_dirs = [os.path.abspath(d) for d in bin_dirs if d]
        self.node_name = node_name
        self.poll_interval = poll_interval
        # Under the plane's directory: logs stay readable after stop() and go with the plane.
        self.tmp = tempfile.mkdtemp(prefix="pod-runner-", dir=getattr(plane, "tmp", None))
        self.log_dir = os.path.join(self.tmp, "logs")
        self.claims_dir = os.path.join(self.tmp, "claims")
        self.hosts_file = os.path.join(self.tmp, "hosts")
        self.runner_log = os.path.join(self.tmp, "runner.log")
        os.makedirs(self.log_dir)
        os.makedirs(self.claims_dir)
        with open(self.hosts_file, "w") as f:
            f.write("127.0.0.1 localhost\n")
        self._hosts_text = None
        self._lock = threading.RLock()
        self._pods = {}  # uid -> _Pod, live and finished pods still in the API
        self._latest = {}  # (namespace, name) -> the _Pod started last under that name
        # uid -> (monotonic time of the last try, reason, message), for pods waiting for a Secret or ConfigMap
        self._waiting = {}
        self._stop = threading.Event()
        self._thread = None
        self._fatal = None

    # --- lifecycle ---------------------------------------------------------------------------------------

    def start(self):
        self._thread = threading.Thread(target=self._run, name="pod-runner", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Stops polling and kills every pod process (SIGKILL to its group), waiting for each within a deadline.
        Like a node that dies, it writes no pod status; a later runner with the same node name reports the
        pods it finds Running there as Failed (ContainerStatusUnknown, exit code 137)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT)
            if self._thread.is_alive():
                self._remember(RunnerError(f"pod runner thread did not stop within {STOP_TIMEOUT} s"))
        with self._lock:
            for pod in self._pods.values():
                self._kill_group(pod, signal.SIGKILL)
            deadline = time.monotonic() + STOP_TIMEOUT
            for pod in self._pods.values():
                if pod.process is not None:
                    try:
                        pod.process.wait(timeout=max(0.1, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        self._log(f"{pod.key}: process {pod.process.pid} still alive after SIGKILL")

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def check(self):
        """Raises the first fatal runner error (a bug or a local failure, not a failed API call), if any."""
        with self._lock:
            if self._fatal is not None:
                raise RunnerError(f"pod runner failed (see {self.runner_log}): {self._fatal}")
            if self._thread is not None and not self._thread.is_alive() and not self._stop.is_set():
                raise RunnerError(f"pod runner thread died (see {self.runner_log})")

    # --- helpers for tests -------------------------------------------------------------------------------

    def log_of(self, namespace, name):
        """stdout+stderr of the latest pod of that name ('' before it started)."""
        with self._lock:
            pod = self._latest.get((namespace, name))
        if pod is None:
            return ""
        try:
            with open(pod.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def pid_of(self, namespace, name):
        """Process id of the latest pod of that name while its process runs, else None."""
        with self._lock:
            pod = self._latest.get((namespace, name))
            if pod is None or pod.process is None or pod.process.poll() is not None:
                return None
            return pod.process.pid

    def kill_process(self, namespace, name, sig=signal.SIGKILL):
        """Fault injection: signals the container process of that pod, which then reports Failed like a crash."""
        with self._lock:
            pid = self.pid_of(namespace, name)
            if pid is None:
                raise RunnerError(f"pod {namespace}/{name} has no running process to kill")
            os.kill(pid, sig)

    # --- the poll loop -----------------------------------------------------------------------------------

    def _run(self):
        while not self._stop.is_set():
            try:
                with self._lock:
                    self._sync()
            except ApiError as error:
                self._log(f"API error (retrying): {error}")
            except Exception as error:  # noqa: BLE001 - remembered for check(); the loop must keep going
                self._log(f"runner error: {error}\n{traceback.format_exc()}")
                self._remember(error)
            self._stop.wait(self.poll_interval)

    def _remember(self, error):
        with self._lock:
            if self._fatal is None:
                self._fatal = error

    def _log(self, message):
        with open(self.runner_log, "a") as f:
            f.write(f"{_now()} {message}\n")

    def _request(self, method, path, body=None, content_type="application/json", ok=(200, 201)):
        """One API call; returns (status, body) for statuses in `ok` or 404/409 handled by callers, else raises."""
        try:
            status, payload = self.plane.request(method, path, body, content_type=content_type,
                                                 timeout=REQUEST_TIMEOUT)
        except (OSError, ValueError) as error:
            raise ApiError(f"{method} {path}: {error}") from None
        if status not in ok:
            message = payload.get("message") if isinstance(payload, dict) else payload
            raise ApiError(f"{method} {path}: HTTP {status}: {message}")
        return status, payload

    def _sync(self):
        _, listing = self._request("GET", "/api/v1/pods")
        seen = {}
        for item in listing.get("items", []):
            seen[item["metadata"]["uid"]] = item
        for uid in [uid for uid in self._pods if uid not in seen]:
            self._forget(self._pods[uid], "vanished from the API")
        for uid in [uid for uid in self._waiting if uid not in seen]:
            del self._waiting[uid]
        for pod in seen.values():
            try:
                self._sync_pod(pod)
            except ApiError as error:  # one pod's failed call must not hold up the others
                self._log(f"API error for pod {pod['metadata'].get('namespace')}/{pod['metadata']['name']}"
                          f" (retrying): {error}")
        self._write_hosts()

    def _sync_pod(self, pod):
        meta, spec = pod["metadata"], pod.get("spec", {})
        uid = meta["uid"]
        if not spec.get("nodeName"):
            if meta.get("deletionTimestamp"):
                return
            self._bind(pod)
            spec["nodeName"] = self.node_name
        if spec["nodeName"] != self.node_name:
            return
        record = self._pods.get(uid)
        deleting = bool(meta.get("deletionTimestamp"))
        phase = pod.get("status", {}).get("phase", "Pending")

        if record is None:
            if deleting:  # bound but never started here
                self._waiting.pop(meta["uid"], None)
                self._finalise(meta)
            elif phase in ("Succeeded", "Failed"):
                pass
            elif meta["uid"] in self._waiting:
                if time.monotonic() - self._waiting[meta["uid"]][0] >= 1.0:
                    self._start(pod)
            elif any("waiting" not in status.get("state", {"waiting": {}})
                     for status in pod.get("status", {}).get("containerStatuses") or []):
                # Started by an earlier runner with this node name, whose processes died with it (a pod
                # that only ever waited for a Secret or ConfigMap never ran: it is tried again).
                self._adopt_lost(pod)
            else:
                self._start(pod)
            return

        if record.process is not None and not record.finished:
            code = record.process.poll()
            if code is not None:
                self._finish(record, code)
            elif deleting:
                self._terminate(record, meta)
        if record.pending_status is not None:
            self._send_status(record)
        if deleting and record.finished and record.pending_status is None:
            self._finalise(meta)

    # --- scheduling --------------------------------------------------------------------------------------

    def _bind(self, pod):
        meta = pod["metadata"]
        binding = {"apiVersion": "v1", "kind": "Binding",
                   "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]},
                   "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name}}
        self._request("POST", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/binding", binding)

    # --- starting a pod ----------------------------------------------------------------------------------

    def _free_ip(self):
        used = {p.ip for p in self._pods.values() if p.ip and not p.finished}
        for x in range(2, 255):
            if f"127.0.0.{x}" not in used:
                return f"127.0.0.{x}"
        raise RunnerError("no free loopback address: 253 live pods")

    def _start(self, pod):
        meta = pod["metadata"]
        directory = os.path.join(self.tmp, "pods", meta["uid"])
        log_path = os.path.join(self.log_dir, f"{meta['namespace']}_{meta['name']}_{meta['uid']}.log")
        record = _Pod(pod, self._free_ip(), directory, log_path)
        pod.setdefault("status", {})["podIP"] = record.ip  # for the downward API
        try:
            container = self._first_container(pod)
            mounts = self._volumes(pod, container, directory)  # as the kubelet: volumes, then the environment
            env = self._environment(pod, container, record)
            argv = self._argv(pod, container, env, mounts, record.hostname)
        except MissingObject as error:
            # The status again whenever the wait changes (a ConfigMap that arrived, a Secret that went).
            # The kubelet's ContainerCreating has no message: the mount's failure is a FailedMount Event.
            message = "" if error.reason == "ContainerCreating" else str(error)
            previous = self._waiting.get(record.uid)
            if previous is None or previous[1:] != (error.reason, str(error)):
                self._log(f"{record.key}: waiting: {error.reason}: {error}")
                if error.reason == "ContainerCreating":
                    self._pod_event(pod, "Warning", "FailedMount", str(error))
                waiting = {"waiting": {"reason": error.reason, **({"message": message} if message else {})}}
                record.pending_status = {"phase": "Pending", "hostIP": "127.0.0.1", "startTime": _now(),
                                         "conditions": self._conditions(False, _now(), "ContainersNotReady"),
                                         "containerStatuses": self._container_status(record, False, waiting)}
                self._send_status(record)
            self._waiting[record.uid] = (time.monotonic(), error.reason, str(error))
            return
        except ConfigError as error:
            self._log(f"{record.key}: {error.reason}: {error}")
            self._pods[record.uid] = record
            self._latest[(record.namespace, record.name)] = record
            record.finished = True
            record.pending_status = self._config_failure_status(record, error)
            self._send_status(record)
            return
        # ApiError from the lookups above propagates: nothing was started, the next poll tries again.

        self._waiting.pop(record.uid, None)
        self._pods[record.uid] = record
        self._latest[(record.namespace, record.name)] = record
        self._write_hosts()  # before the process starts: it may look itself up
        with open(log_path, "ab") as log:
            try:
                record.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                                  env=env, cwd=os.path.join(directory, "home"),
                                                  preexec_fn=die_with_parent)
            except OSError as error:
                record.finished = True
                record.pending_status = self._config_failure_status(
                    record, ConfigError("StartError", f"pod {record.key}: cannot start {argv[0]}: {error}"))
                self._send_status(record)
                return
        record.started_at = _now()
        self._log(f"{record.key}: started pid {record.process.pid} on {record.ip}: {shlex.join(argv[9:])}")
        record.pending_status = self._running_status(record)
        self._send_status(record)

    def _first_container(self, pod):
        containers = pod.get("spec", {}).get("containers") or []
        if not containers:
            raise ConfigError("NoContainers", f"pod {self._key(pod)} has no containers")
        container = containers[0]
        if not container.get("command"):
            raise ConfigError(
                "NoCommand", f"pod {self._key(pod)} container {container.get('name')!r} has no command: the pod runner "
                             f"runs local programs and cannot run an image's entrypoint")
        return container

    @staticmethod
    def _key(pod):
        return f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"

    def _environment(self, pod, container, record):
        """PATH, HOME, HOSTNAME and the container's env (in order, $(VAR) expanded as Kubernetes does)."""
        env = {"PATH": ":".join(self.bin_dirs + [DEFAULT_PATH]),
               "HOME": os.path.join(record.directory, "home"),
               "HOSTNAME": record.hostname}
        os.makedirs(env["HOME"], exist_ok=True)
        where = f"pod {record.key} container {container.get('name')!r}"
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source or "secretRef" in source:
                secret = "secretRef" in source
                ref = source["secretRef" if secret else "configMapRef"]
                data = self._object_data(pod, "secrets" if secret else "configmaps", ref.get("name"),
                                         ref.get("optional"), f"{where} envFrom")
                for name, value in (data or {}).items():
                    env[prefix + name] = value
        for item in container.get("env") or []:
            name = item.get("name")
            if "valueFrom" in item:
                value = self._value_from(pod, item["valueFrom"], f"{where} env {name}")
                if value is None:  # an optional reference that is missing: the variable is left out
                    continue
            else:
                value = expand(item.get("value", ""), env)
            env[name] = value
        return env

    def _value_from(self, pod, source, where):
        if "fieldRef" in source:
            path = source["fieldRef"].get("fieldPath", "")
            meta, spec, status = pod["metadata"], pod.get("spec", {}), pod.get("status", {})
            fields = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
                      "metadata.uid": meta["uid"], "status.podIP": status.get("podIP", ""),
                      "status.hostIP": "127.0.0.1", "spec.nodeName": self.node_name,
                      "spec.serviceAccountName": spec.get("serviceAccountName", "")}
            if path in fields:
                return fields[path]
            for prefix, values in (("metadata.labels", meta.get("labels", {})),
                                   ("metadata.annotations", meta.get("annotations", {}))):
                if path.startswith(prefix + "['") and path.endswith("']"):
                    return values.get(path[len(prefix) + 2:-2], "")
            raise ConfigError("CreateContainerConfigError", f"{where}: fieldRef {path!r} is not supported")
        for field, resource in (("secretKeyRef", "secrets"), ("configMapKeyRef", "configmaps")):
            if field in source:
                ref = source[field]
                data = self._object_data(pod, resource, ref.get("name"), ref.get("optional"), where)
                if data is None:
                    return None
                if ref.get("key") not in data:
                    if ref.get("optional"):
                        return None
                    kind = "Secret" if resource == "secrets" else "ConfigMap"
                    raise MissingObject("CreateContainerConfigError",  # the key may yet be added
                                        f"couldn't find key {ref.get('key')} in {kind} "
                                        f"{pod['metadata']['namespace']}/{ref.get('name')}")
                return data[ref["key"]]
        raise ConfigError("CreateContainerConfigError", f"{where}: unsupported valueFrom {sorted(source)}")

    def _object_data(self, pod, resource, name, optional, where):
        """A Secret's (base64-decoded) or ConfigMap's data as text; None when missing and optional."""
        data = self._object_bytes(pod, resource, name, optional, where)
        return None if data is None else {key: value.decode(errors="replace") for key, value in data.items()}

    def _object_bytes(self, pod, resource, name, optional, where):
        """A Secret's or ConfigMap's data (and binaryData) as bytes, for files; None when missing and optional."""
        namespace = pod["metadata"]["namespace"]
        kind = "secret" if resource == "secrets" else "configmap"
        status, body = self._request("GET", f"/api/v1/namespaces/{namespace}/{resource}/{name}", ok=(200, 404))
        if status == 404:
            if optional:
                return None
            raise MissingObject("CreateContainerConfigError", f'{kind} "{name}" not found')
        data = {key: base64.b64decode(value) for key, value in (body.get("binaryData") or {}).items()}
        for key, value in (body.get("data") or {}).items():
            data[key] = base64.b64decode(value) if resource == "secrets" else value.encode()
        return data

    def _volumes(self, pod, container, directory):
        """Host directories for the container's volumeMounts: [(source, target, read_only)]."""
        key = self._key(pod)
        sources = {}
        for volume in pod.get("spec", {}).get("volumes") or []:
            name = volume.get("name")
            where = f"pod {key} volume {name!r}"
            if "configMap" in volume or "secret" in volume:
                secret = "secret" in volume
                spec = volume["secret" if secret else "configMap"]
                object_name = spec.get("secretName" if secret else "name")
                try:
                    data = self._object_bytes(pod, "secrets" if secret else "configmaps", object_name,
                                              spec.get("optional"), where) or {}  # optional and missing: empty
                except MissingObject as error:  # the kubelet's volume manager retries the mount
                    raise MissingObject("ContainerCreating",
                                        f'MountVolume.SetUp failed for volume "{name}" : {error}') from None
                path = os.path.join(directory, "volumes", name)
                os.makedirs(path, exist_ok=True)
                items = spec.get("items") or [{"key": k, "path": k} for k in data]
                for item in items:
                    if item["key"] not in data:
                        if spec.get("optional"):
                            continue
                        raise MissingObject("ContainerCreating",
                                            f'MountVolume.SetUp failed for volume "{name}" : '
                                            f"{'references non-existent secret' if secret else 'configmap references non-existent config'} "
                                            f"key: {item['key']}")
                    file_path = os.path.join(path, item.get("path", item["key"]))
                    os.makedirs(os.path.dirname(file_path), exist_ok=True)
                    with open(file_path, "wb") as f:
                        f.write(data[item["key"]])
                    os.chmod(file_path, item.get("mode", spec.get("defaultMode", 0o644)))
                sources[name] = path
            elif "emptyDir" in volume:
                sources[name] = os.path.join(directory, "volumes", name)
                os.makedirs(sources[name], exist_ok=True)
            elif "persistentVolumeClaim" in volume:
                # One directory per claim for the runner's lifetime: checkpoints survive a gang restart.
                claim = volume["persistentVolumeClaim"].get("claimName")
                sources[name] = os.path.join(self.claims_dir, pod["metadata"]["namespace"], claim)
                os.makedirs(sources[name], exist_ok=True)
            elif "hostPath" in volume:
                sources[name] = volume["hostPath"].get("path")
                if volume["hostPath"].get("type") == "DirectoryOrCreate":
                    os.makedirs(sources[name], exist_ok=True)
            else:
                kinds = sorted(k for k in volume if k != "name")
                raise ConfigError("CreateContainerConfigError", f"{where}: volume type {kinds} is not supported")
        mounts = []
        for mount in container.get("volumeMounts") or []:
            name = mount.get("name")
            if name not in sources:
                raise ConfigError("CreateContainerConfigError",
                                  f"pod {key} volumeMount {mount.get('mountPath')!r}: no volume named {name!r}")
            source = sources[name]
            if mount.get("subPath"):
                source = os.path.join(source, mount["subPath"])
                if not os.path.exists(source):
                    os.makedirs(source)  # as kubelet does for a missing subPath
            mounts.append((source, mount["mountPath"], bool(mount.get("readOnly"))))
        return mounts

    def _argv(self, pod, container, env, mounts, hostname):
        """unshare + sh that sets the pod's hostname and mounts the volumes and /etc/hosts in private namespaces,
        then execs the command."""
        command = [expand(part, env) for part in container["command"]]
        args = [expand(part, env) for part in container.get("args") or []]
        program = command[0]
        resolved = program if "/" in program else shutil.which(program, path=env.get("PATH", DEFAULT_PATH))
        if not resolved or not os.access(resolved, os.X_OK):
            raise ConfigError("StartError", f"pod {self._key(pod)} container {container.get('name')!r}: "
                                            f"executable {program!r} not found on PATH {env.get('PATH')}")
        q = shlex.quote
        steps = ["set -e", f"{HOSTNAME} {q(hostname)}"]
        for source, target, read_only in mounts + [(self.hosts_file, "/etc/hosts", False)]:
            if os.path.isdir(source):
                steps.append(f"{MKDIR} -p {q(target)}")
            else:
                steps.append(f"[ -e {q(target)} ] || {{ {MKDIR} -p {q(os.path.dirname(target))}; : > {q(target)}; }}")
            steps.append(f"{MOUNT} --bind {q(source)} {q(target)}")
            if read_only:
                steps.append(f"{MOUNT} -o remount,bind,ro {q(target)}")
        working_dir = container.get("workingDir")
        if working_dir:
            steps.append(f"{MKDIR} -p {q(working_dir)}")
            steps.append(f"cd {q(working_dir)}")
        # sh exports PWD (and OLDPWD after cd); a container's process would not see them.
        steps.append("unset PWD OLDPWD")
        steps.append('exec "$0" "$@"')
        return [UNSHARE, "--mount", "--uts", "--propagation", "private", "--", "/bin/sh", "-c", "\n".join(steps),
                resolved, *command[1:], *args]

    # --- running pods ------------------------------------------------------------------------------------

    def _terminate(self, record, meta):
        grace = meta.get("deletionGracePeriodSeconds")
        grace = DEFAULT_GRACE_SECONDS if grace is None else int(grace)
        if record.term_sent is None:
            self._log(f"{record.key}: deleted; SIGTERM to process group {record.process.pid}, SIGKILL in {grace} s")
            self._kill_group(record, signal.SIGTERM)
            record.term_sent = time.monotonic()
            record.kill_at = record.term_sent + grace
        elif record.kill_at != float("inf"):
            # A second delete may shorten the grace period (the server lowers deletionGracePeriodSeconds).
            record.kill_at = min(record.kill_at, record.term_sent + grace)
        if time.monotonic() >= record.kill_at:
            self._log(f"{record.key}: grace period over; SIGKILL to process group {record.process.pid}")
            self._kill_group(record, signal.SIGKILL)
            record.kill_at = float("inf")

    def _kill_group(self, record, sig):
        if record.process is None:
            return
        try:
            os.killpg(record.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _finish(self, record, returncode):
        # A process killed by signal N reports 128+N, as the kubelet does.
        record.exit_code = returncode if returncode >= 0 else 128 - returncode
        record.finished = True
        self._kill_group(record, signal.SIGKILL)  # what the container left behind goes with it
        self._log(f"{record.key}: process {record.process.pid} exited with code {record.exit_code}")
        record.pending_status = self._terminated_status(record)

    def _forget(self, record, why):
        if record.process is not None and record.process.poll() is None:
            self._log(f"{record.key}: {why}; SIGKILL to process group {record.process.pid}")
            self._kill_group(record, signal.SIGKILL)
            try:
                record.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._log(f"{record.key}: process {record.process.pid} still alive after SIGKILL")
        elif record.process is not None:
            self._kill_group(record, signal.SIGKILL)
        record.finished = True
        del self._pods[record.uid]

    def _finalise(self, meta):
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        options = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                   "preconditions": {"uid": uid}}
        status, _ = self._request("DELETE", f"/api/v1/namespaces/{namespace}/pods/{urllib.parse.quote(name)}",
                                  options, ok=(200, 202, 404, 409))
        self._log(f"{namespace}/{name}: deletion finalised (HTTP {status})")
        if uid in self._pods:
            del self._pods[uid]

    def _adopt_lost(self, pod):
        """A pod this node ran before the runner (re)started: its process is gone; report it Failed once."""
        meta = pod["metadata"]
        record = _Pod(pod, None, os.path.join(self.tmp, "pods", meta["uid"]), os.devnull)
        record.finished = True
        record.exit_code = 137
        record.started_at = pod.get("status", {}).get("startTime") or _now()
        record.pending_status = self._terminated_status(record, reason="ContainerStatusUnknown",
                                                        message="The container could not be located when the pod "
                                                                "runner started")
        self._pods[record.uid] = record
        self._send_status(record)

    # --- status ------------------------------------------------------------------------------------------

    def _pod_event(self, pod, event_type, reason, message):
        """An Event about the pod, from this node's kubelet."""
        meta = pod["metadata"]
        event = {"apiVersion": "v1", "kind": "Event",
                 "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
                 "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                                    "namespace": meta["namespace"], "uid": meta["uid"]},
                 "type": event_type, "reason": reason, "message": message,
                 "source": {"component": "kubelet", "host": self.node_name},
                 "firstTimestamp": _now(), "lastTimestamp": _now(), "count": 1}
        self._request("POST", f"/api/v1/namespaces/{meta['namespace']}/events", event, ok=(200, 201, 403, 404))

    def _send_status(self, record):
        path = f"/api/v1/namespaces/{record.namespace}/pods/{urllib.parse.quote(record.name)}/status"
        status, body = self._request("PATCH", path, {"status": record.pending_status},
                                     content_type="application/merge-patch+json", ok=(200, 400, 404, 422))
        if status in (400, 422):  # the runner wrote a status the server refuses: a runner bug, not worth retrying
            message = body.get("message") if isinstance(body, dict) else body
            self._log(f"{record.key}: status refused: HTTP {status}: {message}")
            self._remember(RunnerError(f"status of pod {record.key} refused: HTTP {status}: {message}"))
        elif status == 404:
            self._log(f"{record.key}: gone before its status was written")
        record.pending_status = None

    @staticmethod
    def _conditions(ready, when, reason=None):
        conditions = []
        for kind, value in (("PodScheduled", True), ("Initialized", True), ("ContainersReady", ready), ("Ready", ready)):
            condition = {"type": kind, "status": "True" if value else "False", "lastProbeTime": None,
                         "lastTransitionTime": when}
            if not value and reason:
                condition["reason"] = reason
            conditions.append(condition)
        return conditions

    def _container_status(self, record, ready, state):
        pid = record.process.pid if record.process is not None else 0
        return [{"name": record.container_name, "ready": ready, "restartCount": 0, "image": record.image,
                 "imageID": "", "containerID": f"runner://{pid}", "started": ready, "state": state}]

    def _running_status(self, record):
        return {"phase": "Running", "hostIP": "127.0.0.1", "podIP": record.ip, "podIPs": [{"ip": record.ip}],
                "startTime": record.started_at, "conditions": self._conditions(True, record.started_at),
                "containerStatuses": self._container_status(record, True, {"running": {"startedAt": record.started_at}})}

    def _terminated_status(self, record, reason=None, message=None):
        now = _now()
        code = record.exit_code
        terminated = {"exitCode": code, "reason": reason or ("Completed" if code == 0 else "Error"),
                      "startedAt": record.started_at, "finishedAt": now,
                      "containerID": f"runner://{record.process.pid if record.process else 0}"}
        if message:
            terminated["message"] = message
        status = {"phase": "Succeeded" if code == 0 else "Failed", "hostIP": "127.0.0.1",
                  "startTime": record.started_at,
                  "conditions": self._conditions(False, now, "PodCompleted" if code == 0 else "ContainersNotReady"),
                  "containerStatuses": self._container_status(record, False, {"terminated": terminated})}
        if record.ip:
            status.update(podIP=record.ip, podIPs=[{"ip": record.ip}])
        return status

    def _config_failure_status(self, record, error):
        now = _now()
        return {"phase": "Failed", "reason": error.reason, "message": str(error), "hostIP": "127.0.0.1",
                "startTime": now, "conditions": self._conditions(False, now, "ContainersNotReady"),
                "containerStatuses": self._container_status(
                    record, False, {"waiting": {"reason": error.reason, "message": str(error)}})}

    # --- names -------------------------------------------------------------------------------------------

    def _write_hosts(self):
        """Rewrites the hosts file in place (same inode: every pod's bind mount of it sees the change)."""
        lines = ["127.0.0.1 localhost"]
        for record in sorted(self._pods.values(), key=lambda p: socket.inet_aton(p.ip or "0.0.0.0")):
            if record.finished or not record.ip:
                continue
            names = []
            if record.subdomain:
                base = f"{record.hostname}.{record.subdomain}.{record.namespace}"
                names += [f"{base}.svc.cluster.local", f"{base}.svc", base]
            names.append(record.hostname)
            if record.name != record.hostname:
                names.append(record.name)
            lines.append(f"{record.ip} {' '.join(names)}")
        text = "\n".join(lines) + "\n"
        if text == self._hosts_text:
            return
        # Write first, then truncate: a reader never sees an empty file, at worst a stale tail.
        with open(self.hosts_file, "r+") as f:
            f.write(text)
            f.truncate()
        self._hosts_text = text
