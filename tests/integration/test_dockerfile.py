"""The Dockerfile, checked against a checklist (no container engine runs here, and Debian has no hadolint):
multi-stage with `operator` and `worker` targets; dependencies from scripts/setup and the build from
scripts/build, as CI does; slim runtime stages that run as a non-root numeric user; nothing fetched from
the network except Debian packages; and every shared library the built binaries load is provided by the
packages the runtime stage installs (resolved with apt-cache's dependency closure and dpkg -S)."""

import os
import re
import subprocess
import unittest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN_DIR = os.environ.get("TANDEM_BIN_DIR", os.path.join(ROOT, "build", "bin"))
# Always present in debian:12-slim (Essential/base packages).
BASE = {"libc6", "libgcc-s1", "libstdc++6", "zlib1g", "libzstd1", "liblzma5", "libbz2-1.0", "libselinux1",
        "libpcre2-8-0", "libcrypt1", "libsystemd0", "libgcrypt20", "libgpg-error0", "liblz4-1", "libcap2"}


def stages(text):
    """{stage name: (base image, [instructions])} in file order."""
    result, current = {}, None
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = match.group(2)
            result[current] = (match.group(1), [])
        elif current:
            result[current][1].append(line)
    return result


def installed_packages(instructions):
    packages = set()
    for line in instructions:
        for command in re.findall(r"apt-get install ([^&]+)", line):
            packages.update(word for word in command.split() if not word.startswith("-"))
    return packages


def dependency_closure(packages):
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


def packages_of_libraries(binary):
    """Debian packages owning the shared libraries `binary` loads."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    owners = {}
    for path in re.findall(r"=>\s+(/\S+)", out):
        real = os.path.realpath(path)
        found = None
        for candidate in (path, real, path.replace("/usr/lib", "/lib"), real.replace("/usr/lib", "/lib")):
            query = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True)
            if query.returncode == 0:
                found = query.stdout.split(":")[0]
                break
        owners[path] = found
    return owners


class DockerfileChecklist(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        with open(os.path.join(ROOT, "Dockerfile")) as f:
            cls.text = f.read()
        cls.stages = stages(cls.text)

    def test_targets_and_bases(self):
        self.assertIn("build", self.stages)
        self.assertIn("operator", self.stages)
        self.assertIn("worker", self.stages)
        self.assertEqual(self.stages["build"][0], "debian:12")
        self.assertEqual(self.stages["runtime-base"][0], "debian:12-slim")

    def test_build_uses_the_same_steps_as_ci(self):
        build = " ".join(self.stages["build"][1])
        self.assertIn("./scripts/setup", build)
        self.assertIn("./scripts/build", build)

    def test_final_stages_run_as_non_root(self):
        for name in ("operator", "worker"):
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

    def check_runtime_libraries(self, binary, stage_names):
        packages = set()
        for name in stage_names:
            packages |= installed_packages(self.stages[name][1])
        provided = dependency_closure(sorted(packages)) | BASE
        owners = packages_of_libraries(os.path.join(BIN_DIR, binary))
        self.assertTrue(owners)
        for library, package in owners.items():
            self.assertIsNotNone(package, f"{binary}: {library} belongs to no Debian package")
            self.assertIn(package, provided, f"{binary}: {library} comes from {package}, which the image lacks")

    def test_operator_image_has_every_library_the_operator_loads(self):
        self.check_runtime_libraries("tandem-operator", ["runtime-base", "operator"])

    def test_worker_image_has_every_library_the_worker_loads(self):
        self.check_runtime_libraries("tandem-worker", ["runtime-base", "worker"])
        self.check_runtime_libraries("tandem", ["runtime-base", "worker"])


if __name__ == "__main__":
    unittest.main()
