"""The Dockerfile, checked against a checklist (no container engine runs here, and Debian has no hadolint):
multi-stage with `operator` and `worker` targets; dependencies from scripts/setup and the build from
scripts/build, as CI does; the operator built without CUDA and the worker with it; slim Debian runtime stages
that run as a non-root numeric user; NVIDIA's images pinned and used only as sources to copy CUDA from; nothing
fetched from the network except Debian packages; and every shared library the built binaries load is provided
by the image: by the Debian packages its stages install (resolved with apt-cache's dependency closure and
dpkg -S), by a file copied from NVIDIA's CUDA runtime image under its soname, or by the NVIDIA container
toolkit (the driver's libraries, when the image asks for them)."""

import functools
import os
import re
import shlex
import subprocess
import unittest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN_DIR = os.environ.get("TANDEM_BIN_DIR", os.path.join(ROOT, "build", "bin"))
# Always present in debian:12-slim (Essential/base packages).
BASE = {"libc6", "libgcc-s1", "libstdc++6", "zlib1g", "libzstd1", "liblzma5", "libbz2-1.0", "libselinux1",
        "libpcre2-8-0", "libcrypt1", "libsystemd0", "libgcrypt20", "libgpg-error0", "liblz4-1", "libcap2"}
# Driver libraries the NVIDIA container toolkit mounts into a container, by NVIDIA_DRIVER_CAPABILITIES entry.
DRIVER_LIBRARIES = {"compute": {"libcuda.so.1", "libnvidia-ptxjitcompiler.so.1"}, "utility": {"libnvidia-ml.so.1"}}
RUNTIME_STAGES = ("runtime-base", "operator", "worker", "worker-cpu")
LOADER_DEFAULT_DIRS = {"/lib", "/usr/lib", "/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/usr/local/lib"}


def logical_lines(text):
    """Instructions with their continuation lines joined; comments and blank lines dropped."""
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            yield line


def expand(word, args):
    """`word` with $NAME and ${NAME} replaced from `args` (Docker's ARGs before the first FROM)."""
    def value(match):
        name = match.group(1) or match.group(2)
        if args.get(name) is None:
            raise ValueError(f"{word}: ARG {name} has no default value before the first FROM")
        return args[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, word)


def stages(text):
    """{stage name: (base image or stage, [instructions])} in file order; ARGs declared before the first FROM
    are expanded in the bases, as Docker does (stages without AS are named by their index)."""
    args, result, current = {}, {}, None
    for line in logical_lines(text):
        match = re.match(r"FROM\s+(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?$", line, re.IGNORECASE)
        if match:
            current = match.group(2) or str(len(result))
            result[current] = (expand(match.group(1), args), [])
        elif current:
            result[current][1].append(line)
        else:
            arg = re.match(r"ARG\s+(\w+)(?:=(\S*))?", line, re.IGNORECASE)
            if arg:
                args[arg.group(1)] = arg.group(2).strip("\"'") if arg.group(2) is not None else None
    return result


def lineage(all_stages, name):
    """`name` and the stages it is built on, the base-most first."""
    chain = []
    while name in all_stages:
        chain.insert(0, name)
        name = all_stages[name][0]
    return chain


def root_image(all_stages, name):
    """The external image `name` is ultimately built on."""
    return all_stages[lineage(all_stages, name)[0]][0]


def is_nvidia(image):
    return image.startswith(("nvidia/", "docker.io/nvidia/", "nvcr.io/nvidia/"))


def copies(instructions):
    """[(--from value or None, [sources], destination)] of the COPY instructions."""
    result = []
    for line in instructions:
        if not re.match(r"COPY\s", line, re.IGNORECASE):
            continue
        words = shlex.split(line)
        flags = [word for word in words[1:] if word.startswith("--")]
        paths = [word for word in words[1:] if not word.startswith("--")]
        source = next((flag.split("=", 1)[1] for flag in flags if flag.startswith("--from=")), None)
        result.append((source, paths[:-1], paths[-1]))
    return result


def stage_copies(all_stages, name):
    """copies() of `name` and the stages it is built on."""
    return [copy for stage in lineage(all_stages, name) for copy in copies(all_stages[stage][1])]


def environment(all_stages, name):
    """The ENV variables `name` sets, its base stages' included."""
    env = {}
    for stage in lineage(all_stages, name):
        for line in all_stages[stage][1]:
            if not re.match(r"ENV\s", line, re.IGNORECASE):
                continue
            words = shlex.split(line)
            if len(words) >= 3 and "=" not in words[1]:
                env[words[1]] = " ".join(words[2:])
            else:
                env.update(word.split("=", 1) for word in words[1:])
    return env


def build_line(all_stages, name):
    """The RUN instruction of stage `name` that calls ./scripts/build ("" if none)."""
    return next((line for line in all_stages[name][1] if "./scripts/build" in line), "")


def cuda_runtime_copies(all_stages, name):
    """[(source path, destination)] that `name` copies from a stage of NVIDIA's CUDA runtime image."""
    result = []
    for source, paths, destination in stage_copies(all_stages, name):
        if source in all_stages and re.match(r"(docker\.io/)?nvidia/cuda:\S*-runtime-", root_image(all_stages, source)):
            result.extend((path, destination) for path in paths)
    return result


def driver_libraries(env):
    """Sonames the NVIDIA container toolkit mounts for the image's NVIDIA_DRIVER_CAPABILITIES."""
    capabilities = set(env.get("NVIDIA_DRIVER_CAPABILITIES", "").split(","))
    if not env.get("NVIDIA_VISIBLE_DEVICES"):
        return set()
    if "all" in capabilities:
        capabilities = set(DRIVER_LIBRARIES)
    return set().union(*(DRIVER_LIBRARIES.get(capability, set()) for capability in capabilities))


def installed_packages(instructions):
    packages = set()
    for line in instructions:
        for command in re.findall(r"apt-get install ([^&]+)", line):
            packages.update(word for word in command.split() if not word.startswith("-"))
    return packages


@functools.cache
def dependency_closure(packages):
    """The packages a tuple of `packages` installs, apt's recursive dependencies included."""
    out = subprocess.run(["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
                          "--no-breaks", "--no-replaces", "--no-enhances", *packages], capture_output=True, text=True)
    closure = set(packages)
    for line in out.stdout.splitlines():
        match = re.match(r"\s*(?:\|)?(?:Depends|PreDepends):\s+<?([^\s>:]+)", line)
        if match:
            closure.add(match.group(1))
        elif line and not line.startswith(" "):
            closure.add(line.strip().split(":")[0])
    return closure


def parse_ldd(text):
    """{soname: path it resolves to here, or None when ldd finds none} from ldd's output."""
    libraries = {}
    for soname, target in re.findall(r"(?m)^\s*(\S+)\s+=>\s+(\S+)", text):
        libraries[soname] = target if target.startswith("/") else None
    return libraries


def shared_libraries(binary):
    return parse_ldd(subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout)


@functools.cache
def debian_package_of(path):
    """The Debian package owning the library at `path`, or None."""
    real = os.path.realpath(path)
    for candidate in (path, real, path.replace("/usr/lib", "/lib"), real.replace("/usr/lib", "/lib")):
        query = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True)
        if query.returncode == 0:
            return query.stdout.split(":")[0]
    return None


def missing_libraries(libraries, provided_packages, package_of, copied_sonames, driver_sonames):
    """Why an image would fail to load some of `libraries` ({soname: path here}); [] when it provides them all.
    A library is provided by a file of that soname copied from NVIDIA's CUDA runtime image, by the container
    toolkit (the driver's libraries), or by a Debian package the image installs; a library of no Debian package
    (one under /usr/local/cuda, say) is provided only by the first two."""
    problems = []
    for soname, path in sorted(libraries.items()):
        if soname in copied_sonames or soname in driver_sonames:
            continue
        if path is None:
            problems.append(f"{soname}: ldd finds it nowhere here, and the image neither copies it from NVIDIA's "
                            f"CUDA runtime image nor gets it from the NVIDIA container toolkit")
            continue
        package = package_of(path)
        if package is None:
            problems.append(f"{soname} ({path}) belongs to no Debian package and is not copied from NVIDIA's "
                            f"CUDA runtime image")
        elif package not in provided_packages:
            problems.append(f"{soname} ({path}) comes from {package}, which the image lacks")
    return problems


def is_cuda_build(libraries):
    return any(soname.startswith(("libcublas", "libcudart", "libcuda.", "libnccl")) or
               (path or "").startswith("/usr/local/cuda") for soname, path in libraries.items())


def debian_package_of_or(owners):
    """A package_of for made-up paths: `owners` first, then dpkg."""
    return lambda path: owners[path] if path in owners else debian_package_of(path)


def image_problems(all_stages, stage, libraries, package_of):
    """missing_libraries() for the image of `stage` (its base stages included)."""
    packages = set()
    for name in lineage(all_stages, stage):
        packages |= installed_packages(all_stages[name][1])
    provided = (dependency_closure(tuple(sorted(packages))) if packages else set()) | BASE
    copied = {os.path.basename(path) for path, _ in cuda_runtime_copies(all_stages, stage)}
    return missing_libraries(libraries, provided, package_of, copied, driver_libraries(environment(all_stages, stage)))


class DockerfileChecklist(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        with open(os.path.join(ROOT, "Dockerfile")) as f:
            cls.text = f.read()
        cls.stages = stages(cls.text)

    def binaries_source(self, stage, binary):
        """The stage whose files `stage` copies `binary` from."""
        sources = [source for source, paths, _ in stage_copies(self.stages, stage)
                   if any(os.path.basename(path) == binary for path in paths)]
        self.assertEqual(len(sources), 1, f"{stage}: {binary} should be copied from exactly one build stage")
        self.assertIn(sources[0], self.stages, f"{stage}: {binary} comes from {sources[0]}, not a stage of this file")
        return sources[0]

    def test_targets_and_bases(self):
        self.assertIn("build", self.stages)
        self.assertIn("operator", self.stages)
        self.assertIn("worker", self.stages)
        self.assertEqual(self.stages["build"][0], "debian:12")
        self.assertEqual(self.stages["runtime-base"][0], "debian:12-slim")
        for name in RUNTIME_STAGES:
            if name in self.stages:
                self.assertEqual(root_image(self.stages, name), "debian:12-slim", name)
        for name in self.stages:
            image = root_image(self.stages, name)
            self.assertTrue(image in ("debian:12", "debian:12-slim") or is_nvidia(image), f"{name}: {image}")

    def test_build_uses_the_same_steps_as_ci(self):
        builders = {self.binaries_source("operator", "tandem-operator"),
                    self.binaries_source("worker", "tandem-worker")}
        self.assertIn("build", builders)
        for name in builders:
            self.assertEqual(root_image(self.stages, name), "debian:12", name)
            build = " ".join(line for stage in lineage(self.stages, name) for line in self.stages[stage][1])
            self.assertIn("./scripts/setup", build, name)
            self.assertIn("./scripts/build", build, name)

    def test_operator_is_built_without_cuda(self):
        source = self.binaries_source("operator", "tandem-operator")
        self.assertIn("-DTANDEM_CUDA=OFF", build_line(self.stages, source), f"{source} must build with CUDA off")

    def test_worker_is_built_with_cuda_and_nccl(self):
        for binary in ("tandem-worker", "tandem"):
            source = self.binaries_source("worker", binary)
            self.assertIn("-DTANDEM_CUDA=ON", build_line(self.stages, source), f"{source} must build with CUDA on")
            toolkit = {os.path.basename(path.rstrip("/")) for from_stage, paths, _ in stage_copies(self.stages, source)
                       if from_stage in self.stages and is_nvidia(root_image(self.stages, from_stage))
                       for path in paths}
            self.assertIn("cuda", toolkit, f"{source}: no CUDA toolkit copied from NVIDIA's image")
            self.assertIn("nccl.h", toolkit, f"{source}: no NCCL header copied from NVIDIA's image")

    def test_nvidia_images_are_pinned_copy_sources_only(self):
        nvidia_stages = [name for name in self.stages if is_nvidia(root_image(self.stages, name))]
        self.assertTrue(nvidia_stages)
        for name in nvidia_stages:
            # A stage of an NVIDIA image only names it for COPY --from: no stage runs code on it or ships it.
            self.assertEqual(self.stages[name][1], [], f"{name}: runs on NVIDIA's image; use it only to copy from")
            self.assertNotIn(name, RUNTIME_STAGES)
        references = [root_image(self.stages, name) for name in nvidia_stages]
        for name in self.stages:
            references += [source for source, _, _ in copies(self.stages[name][1])
                           if source and source not in self.stages]
        for image in references:
            self.assertTrue(is_nvidia(image), f"COPY --from={image}: only this file's stages and NVIDIA's images")
            self.assertRegex(image, r"(:\d+\.\d+\.\d+-[\w.-]+|@sha256:[0-9a-f]{64})$", f"{image} is not pinned")

    def test_worker_asks_for_the_gpu_driver(self):
        env = environment(self.stages, "worker")
        self.assertEqual(env.get("NVIDIA_VISIBLE_DEVICES"), "all")
        capabilities = set(env.get("NVIDIA_DRIVER_CAPABILITIES", "").split(","))
        self.assertTrue({"compute", "utility"} <= capabilities or "all" in capabilities, capabilities)

    def test_cuda_libraries_are_on_the_loader_path(self):
        copied = cuda_runtime_copies(self.stages, "worker")
        self.assertIn("libcublasLt.so.13", {os.path.basename(path) for path, _ in copied})
        self.assertIn("libnccl.so.2", {os.path.basename(path) for path, _ in copied})
        runs = [line for stage in lineage(self.stages, "worker") for line in self.stages[stage][1]]
        registered = {directory for line in runs if "ldconfig" in line
                      for directory in re.findall(r"echo\s+(\S+)\s*>+\s*/etc/ld\.so\.conf\.d/", line)}
        registered |= set(filter(None, environment(self.stages, "worker").get("LD_LIBRARY_PATH", "").split(":")))
        for path, destination in copied:
            directory = destination.rstrip("/") if destination.endswith("/") else os.path.dirname(destination)
            self.assertIn(directory, registered | LOADER_DEFAULT_DIRS, f"{path} -> {destination} is not on the "
                          "loader path (add an /etc/ld.so.conf.d entry and run ldconfig)")

    def test_final_stages_run_as_non_root(self):
        for name in ("operator", "worker", "worker-cpu"):
            if name not in self.stages:
                continue
            users = [line.split()[1] for line in self.stages[name][1] if line.upper().startswith("USER ")]
            self.assertTrue(users, f"{name}: no USER")
            uid = users[-1].split(":")[0]
            self.assertTrue(uid.isdigit() and int(uid) != 0, f"{name}: USER {users[-1]} must be a non-root number")

    def test_nothing_is_downloaded_but_debian_packages(self):
        self.assertNotRegex(self.text, r"\b(curl|wget|git clone|pip install|npm install)\b")
        self.assertNotRegex(self.text, r"(?m)^\s*ADD\s+https?://")
        for name, (_, instructions) in self.stages.items():
            for line in instructions:
                if "apt-get install" in line:
                    self.assertIn("--no-install-recommends", line, name)
                    self.assertIn("rm -rf /var/lib/apt/lists", line, name)

    def check_runtime_libraries(self, binary, stage):
        libraries = shared_libraries(os.path.join(BIN_DIR, binary))
        self.assertTrue(libraries)
        self.assertEqual(image_problems(self.stages, stage, libraries, debian_package_of), [], f"{binary} in {stage}")

    def test_operator_image_has_every_library_the_operator_loads(self):
        self.check_runtime_libraries("tandem-operator", "operator")

    def test_worker_image_has_every_library_the_worker_loads(self):
        # BIN_DIR holds a CPU or a CUDA build; either must run in the GPU worker image.
        self.check_runtime_libraries("tandem-worker", "worker")
        self.check_runtime_libraries("tandem", "worker")

    def test_cpu_worker_image_has_every_library_the_worker_loads(self):
        if "worker-cpu" not in self.stages:
            self.skipTest("no worker-cpu stage")
        libraries = shared_libraries(os.path.join(BIN_DIR, "tandem-worker"))
        if is_cuda_build(libraries):
            self.skipTest(f"{BIN_DIR} holds a CUDA build; worker-cpu ships the CPU one")
        self.check_runtime_libraries("tandem-worker", "worker-cpu")
        self.check_runtime_libraries("tandem", "worker-cpu")

    def test_library_check_with_a_cuda_build(self):
        # ldd of a CUDA-built worker as the development machines produce it, and owners made up for it: the
        # check itself is under test, whatever build BIN_DIR holds.
        ldd = ("\tlinux-vdso.so.1 (0x00007ffd)\n"
               "\tlibyaml-cpp.so.0.7 => /lib/x86_64-linux-gnu/libyaml-cpp.so.0.7 (0x00007f01)\n"
               "\tlibcublasLt.so.13 => /usr/local/cuda/lib64/libcublasLt.so.13 (0x00007f02)\n"
               "\tlibcuda.so.1 => not found\n"
               "\tlibstdc++.so.6 => /lib/x86_64-linux-gnu/libstdc++.so.6 (0x00007f03)\n"
               "\t/lib64/ld-linux-x86-64.so.2 (0x00007f04)\n")
        libraries = parse_ldd(ldd)
        self.assertTrue(is_cuda_build(libraries))
        self.assertEqual(set(libraries), {"libyaml-cpp.so.0.7", "libcublasLt.so.13", "libcuda.so.1", "libstdc++.so.6"})
        owners = {"/lib/x86_64-linux-gnu/libyaml-cpp.so.0.7": "libyaml-cpp0.7",
                  "/lib/x86_64-linux-gnu/libstdc++.so.6": "libstdc++6"}
        package_of = owners.get
        provided = {"libyaml-cpp0.7", "libstdc++6"}
        driver = driver_libraries({"NVIDIA_VISIBLE_DEVICES": "all", "NVIDIA_DRIVER_CAPABILITIES": "compute,utility"})
        self.assertEqual(missing_libraries(libraries, provided, package_of, {"libcublasLt.so.13"}, driver), [])
        # Not copied: a file under /usr/local/cuda belongs to no Debian package.
        problems = missing_libraries(libraries, provided, package_of, set(), driver)
        self.assertEqual(len(problems), 1)
        self.assertIn("libcublasLt.so.13", problems[0])
        # Without the toolkit's driver libraries, libcuda.so.1 is missing; without the package, libyaml-cpp is.
        problems = missing_libraries(libraries, {"libstdc++6"}, package_of, {"libcublasLt.so.13"}, set())
        self.assertEqual([problem.split()[0] for problem in problems], ["libcuda.so.1:", "libyaml-cpp.so.0.7"])
        # The Dockerfile's own worker stage provides a CUDA build's libraries; the CPU-only stages do not.
        self.assertEqual(image_problems(self.stages, "worker", libraries, debian_package_of_or(owners)), [])
        for stage in ("operator", "worker-cpu"):
            if stage in self.stages:
                problems = image_problems(self.stages, stage, libraries, debian_package_of_or(owners))
                self.assertTrue(any("libcublasLt.so.13" in problem for problem in problems), stage)

    def test_stages_expand_args_and_follow_lineage(self):
        text = ("ARG CUDA_VERSION=13.0.2\nARG DISTRO=\"ubuntu24.04\"\n"
                "FROM nvidia/cuda:${CUDA_VERSION}-runtime-$DISTRO AS cuda-runtime\n"
                "FROM debian:12-slim AS base\nRUN true\nFROM base AS app\n"
                "COPY --from=cuda-runtime /usr/lib/x86_64-linux-gnu/libnccl.so.2 \\\n    /usr/local/cuda/lib64/\n"
                "ENV A=1 B=\"two words\"\n")
        parsed = stages(text)
        self.assertEqual(parsed["cuda-runtime"], ("nvidia/cuda:13.0.2-runtime-ubuntu24.04", []))
        self.assertEqual(lineage(parsed, "app"), ["base", "app"])
        self.assertEqual(root_image(parsed, "app"), "debian:12-slim")
        self.assertEqual(cuda_runtime_copies(parsed, "app"),
                         [("/usr/lib/x86_64-linux-gnu/libnccl.so.2", "/usr/local/cuda/lib64/")])
        self.assertEqual(environment(parsed, "app"), {"A": "1", "B": "two words"})
        with self.assertRaises(ValueError):
            stages("ARG TAG\nFROM nvidia/cuda:${TAG} AS cuda\n")


if __name__ == "__main__":
    unittest.main()
