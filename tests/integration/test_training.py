"""Training through `tandem run` with real worker processes: the example reaches its accuracy with 1
and 4 workers, and 1, 2 and 4 workers follow the same trajectory (parameters after 50 steps); custom
mode, --bind-cores and the OpenBLAS kernels workers pick."""

import os
import re
import subprocess
import time
import unittest

from tandem_testlib import TANDEM, WORKER, TempDirTest, custom_manifest, manifest, relative_error, read_floats, tandem, wait_for

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
EXAMPLE = os.path.join(ROOT, "manifests", "examples", "fashion-mnist.yaml")


def summary_accuracy(stdout):
    match = re.search(r"test accuracy ([0-9.]+)%", stdout)
    return float(match.group(1)) if match else None


class ExampleAccuracy(TempDirTest):
    """The example (MLP 784-256-128-10, AdamW 1e-3, batch 256, 10 epochs, seed 1) reaches >= 88.0%."""

    def check(self, workers):
        result = tandem("run", EXAMPLE, "--workers", str(workers), timeout=900)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        accuracy = summary_accuracy(result.stdout)
        self.assertIsNotNone(accuracy, result.stdout[-2000:])
        print(f"{workers} worker(s): test accuracy {accuracy}%")
        self.assertGreaterEqual(accuracy, 88.0)
        self.assertIn("steps 2340", result.stdout)

    def test_one_worker(self):
        self.check(1)

    def test_four_workers(self):
        self.check(4)


class StepCount(TempDirTest):
    """`epochs` as a mere upper bound ("train until maxSteps"): a huge count trains exactly the steps
    --max-steps asks for; epochs x steps per epoch saturates instead of wrapping into zero steps."""

    def test_a_huge_epoch_count_trains_until_max_steps(self):
        config = self.write("job.yaml", manifest(data_kind="synthetic", samples=1024, global_batch=64,
                                                 epochs=40000000000000000))
        result = tandem("run", config, "--max-steps", "3", timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assertIn("steps 3", result.stdout)


class DataParallelEquivalence(TempDirTest):
    """Same seed and global batch: 2 and 4 workers end 50 steps where 1 worker does (rel. error <= 1e-5)."""

    def parameters_after_50_steps(self, workers):
        path = os.path.join(self.tmp, f"params-{workers}.bin")
        result = tandem("run", EXAMPLE, "--workers", str(workers), "--max-steps", "50", "--dump-params", path,
                        "--quiet")
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        return read_floats(path)

    def test_one_two_four_workers_agree(self):
        single = self.parameters_after_50_steps(1)
        self.assertEqual(len(single), 784 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10)
        for workers in (2, 4):
            multi = self.parameters_after_50_steps(workers)
            relative, largest = relative_error(multi, single)
            print(f"{workers} workers vs 1: relative L2 error {relative:.3g}, largest element difference {largest:.3g}")
            self.assertLessEqual(relative, 1e-5)

    def test_training_moved_the_parameters(self):
        # Guards the equivalence test against a run that never trained: 50 steps vs 1 step differ.
        path = os.path.join(self.tmp, "one-step.bin")
        result = tandem("run", EXAMPLE, "--workers", "1", "--max-steps", "1", "--dump-params", path, "--quiet")
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        relative, _ = relative_error(read_floats(path), self.parameters_after_50_steps(1))
        self.assertGreater(relative, 1e-3)


def cpu_flags():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


class GemmKernels(TempDirTest):
    """Workers run OpenBLAS kernels as good as the CPU allows (Debian's OpenBLAS falls back to generic ones on
    CPUs newer than itself), and a user's OPENBLAS_CORETYPE is kept."""

    AVX512 = {"skylakex", "cooperlake", "sapphirerapids"}

    def kernels(self, env=None):
        config = self.write("job.yaml", manifest(hidden=(64,)))
        full_env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
        full_env.update(env or {})
        result = subprocess.run([TANDEM, "run", config, "--max-steps", "1", "--quiet"], capture_output=True, text=True,
                                timeout=120, env=full_env)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        match = re.search(r"GEMM threads, OpenBLAS (\w+) kernels", result.stderr)
        self.assertIsNotNone(match, result.stderr[-2000:])
        return match.group(1).lower()

    def test_kernels_match_the_cpu(self):
        flags = cpu_flags()
        core = self.kernels()
        print(f"OpenBLAS kernels: {core}")
        if {"avx512f", "avx512vl", "avx512bw", "avx512dq", "avx512cd"} <= flags:
            self.assertIn(core, self.AVX512)
        elif {"avx2", "fma"} <= flags:
            self.assertIn(core, self.AVX512 | {"haswell", "zen"})

    def test_the_users_choice_is_kept(self):
        self.assertEqual(self.kernels({"OPENBLAS_CORETYPE": "Prescott"}), "prescott")


def cpu_limited_cgroup(test, cpus):
    """A cgroup whose CPU quota is `cpus` (a container's CPU limit), removed after the test: v1's cpu
    controller (this machine's) or v2's. Needs root, as CI runs."""
    name = f"tandem-test-{os.getpid()}"
    quota = int(cpus * 100000)
    if os.path.isdir("/sys/fs/cgroup/cpu"):
        path = os.path.join("/sys/fs/cgroup/cpu", name)
        os.mkdir(path)
        with open(os.path.join(path, "cpu.cfs_period_us"), "w") as f:
            f.write("100000")
        with open(os.path.join(path, "cpu.cfs_quota_us"), "w") as f:
            f.write(str(quota))
    else:
        path = os.path.join("/sys/fs/cgroup", name)
        os.mkdir(path)
        with open(os.path.join(path, "cpu.max"), "w") as f:
            f.write(f"{quota} 100000")
    test.addCleanup(os.rmdir, path)
    return path


class CpuLimit(TempDirTest):
    """A worker in a container with a CPU limit (a CFS quota: it still sees every CPU of the node) uses as
    many GEMM threads as the limit allows, unless the user said how many."""

    def run_limited(self, env):
        cgroup = cpu_limited_cgroup(self, 0.5)

        def enter():
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        config = self.write("job.yaml", manifest(hidden=(32,), data_kind="synthetic", samples=512, global_batch=64))
        full_env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
        full_env.update(TANDEM_RANK="0", TANDEM_WORLD_SIZE="1", **env)
        result = subprocess.run([WORKER, "--config", config], capture_output=True, text=True, timeout=120, env=full_env,
                                preexec_fn=enter)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        return result.stderr

    def test_gemm_threads_follow_the_cgroup_cpu_limit(self):
        log = self.run_limited({})
        self.assertIn("training on cpu with 1 GEMM threads", log)
        if len(os.sched_getaffinity(0)) > 1:  # with one CPU, one thread was the default anyway
            self.assertIn("cgroup CPU limit 0.5 CPUs: 1 GEMM threads", log)

    def test_the_users_thread_count_is_kept(self):
        log = self.run_limited({"OPENBLAS_NUM_THREADS": "2"})
        self.assertIn("training on cpu with 2 GEMM threads", log)
        self.assertNotIn("cgroup CPU limit", log)


class CustomMode(TempDirTest):
    """No spec.model and a template command: `tandem run` runs the command unchanged in every worker with
    the environment of DESIGN.md §3 (torchrun's names included), and the job ends with its exit code."""

    def job(self, script, workers=2):
        return custom_manifest(script, workers)

    def test_command_runs_with_the_process_contract(self):
        keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "TANDEM_JOB",
                "TANDEM_RANK", "TANDEM_WORLD_SIZE", "TANDEM_GENERATION", "TANDEM_RDZV_ENDPOINT", "TANDEM_POD_IP")
        script = "import os; print('ENV', " + ", ".join(f"os.environ[{k!r}]" for k in keys) + ")"
        result = tandem("run", self.write("custom.yaml", self.job(script, workers=3)), timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assertIn("custom mode: running /usr/bin/python3", result.stderr)
        rows = {}
        for line in result.stdout.splitlines():
            match = re.match(r"\[rank (\d)\] ENV (.*)", line)
            if match:
                rows[int(match.group(1))] = dict(zip(keys, match.group(2).split()))
        self.assertEqual(sorted(rows), [0, 1, 2])
        for rank, env in rows.items():
            self.assertEqual(env["RANK"], str(rank))
            self.assertEqual(env["TANDEM_RANK"], str(rank))
            self.assertEqual(env["WORLD_SIZE"], "3")
            self.assertEqual(env["TANDEM_WORLD_SIZE"], "3")
            self.assertEqual(env["LOCAL_RANK"], str(rank))
            self.assertEqual(env["NODE_RANK"], "0")
            self.assertEqual(env["MASTER_ADDR"], "127.0.0.1")
            self.assertEqual(env["TANDEM_JOB"], "default/custom")
            self.assertEqual(env["TANDEM_GENERATION"], "0")
            self.assertEqual(env["TANDEM_POD_IP"], "127.0.0.1")
            self.assertEqual(env["MASTER_PORT"], rows[0]["MASTER_PORT"])
            self.assertEqual(env["TANDEM_RDZV_ENDPOINT"], rows[0]["TANDEM_RDZV_ENDPOINT"])

    def test_a_failing_command_fails_the_job_with_its_code(self):
        script = "import os, sys; sys.exit(7 if os.environ['RANK'] == '1' else 0)"
        result = tandem("run", self.write("custom.yaml", self.job(script)), timeout=120)
        self.assertEqual(result.returncode, 7, result.stderr[-2000:])
        self.assertIn("worker rank 1 exited with code 7", result.stderr)

    def test_the_killed_worker_is_named_not_the_peer_that_lost_it(self):
        # Rank 0 exits first with 129 (a peer connection broke), as a survivor does; rank 1, the cause, dies
        # of SIGKILL 100 ms later. The launcher names rank 1 and exits with its status.
        script = ("import os, signal, time; time.sleep(1.0)\n"
                  "if os.environ['RANK'] == '0': os._exit(129)\n"
                  "time.sleep(0.1); os.kill(os.getpid(), signal.SIGKILL)")
        result = tandem("run", self.write("custom.yaml", self.job(script)), timeout=60)
        self.assertEqual(result.returncode, 137, result.stderr[-2000:])
        self.assertIn("worker rank 1 was killed by signal 9", result.stderr)
        self.assertNotIn("worker rank 0 exited with code 129", result.stderr)

    def test_a_lone_lost_peer_is_named_after_a_short_wait(self):
        script = ("import os, time; time.sleep(1.0)\n"
                  "if os.environ['RANK'] == '0': os._exit(129)\n"
                  "time.sleep(60)")
        started = time.monotonic()
        result = tandem("run", self.write("custom.yaml", self.job(script)), timeout=60)
        self.assertEqual(result.returncode, 129, result.stderr[-2000:])
        self.assertIn("worker rank 0 exited with code 129; stopping the other workers", result.stderr)
        self.assertLess(time.monotonic() - started, 30, "the sleeping rank is stopped, not waited for")

    def test_bind_cores_gives_each_worker_cpus_of_its_own(self):
        cpus = sorted(os.sched_getaffinity(0))
        workers = min(len(cpus), 2)
        script = ("import os; print('CPUS', ' '.join(map(str, sorted(os.sched_getaffinity(0)))), "
                  "'THREADS', os.environ['OPENBLAS_NUM_THREADS'])")
        # Without the user's OPENBLAS_NUM_THREADS, a bound worker gets one GEMM thread per core it owns.
        env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
        result = subprocess.run([TANDEM, "run", self.write("custom.yaml", self.job(script, workers=workers)),
                                 "--bind-cores"], capture_output=True, text=True, timeout=120, env=env)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        sets = {}
        for line in result.stdout.splitlines():
            match = re.match(r"\[rank (\d)\] CPUS ([\d ]+) THREADS (\d+)", line)
            if match:
                sets[int(match.group(1))] = ({int(c) for c in match.group(2).split()}, int(match.group(3)))
        self.assertEqual(sorted(sets), list(range(workers)))
        used = set()
        for rank, (bound, threads) in sets.items():
            self.assertTrue(bound, f"rank {rank}")
            self.assertTrue(bound <= set(cpus), f"rank {rank}: {bound} outside {cpus}")
            self.assertFalse(bound & used, f"rank {rank} shares CPUs with another rank")
            used |= bound
            self.assertGreaterEqual(threads, 1)
            self.assertLessEqual(threads, len(bound))
            self.assertIn(f"tandem: rank {rank} bound to CPUs", result.stderr)

    def test_a_process_a_worker_left_behind_does_not_keep_tandem_waiting(self):
        # The worker exits at once; the process it started ignores SIGTERM and holds its stdout and stderr
        # open for 1000 s. (One that obeys SIGTERM is gone at once.)
        script = ("import signal, subprocess; child = subprocess.Popen(['sleep', '1000'], "
                  "preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN)); "
                  "print('LEFTOVER', child.pid, flush=True)")
        started = time.monotonic()
        result = tandem("run", self.write("custom.yaml", self.job(script)), timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assertLess(time.monotonic() - started, 20)
        self.assertIn("tandem: rank 0 exited, but a process it started kept its output open", result.stderr)
        leftover = int(re.search(r"LEFTOVER (\d+)", result.stdout).group(1))

        def ended():  # gone, or a zombie waiting for whoever adopted it to reap it
            try:
                with open(f"/proc/{leftover}/stat") as f:
                    return f.read().rsplit(")", 1)[1].split()[0] == "Z"
            except OSError:
                return True
        self.assertTrue(wait_for(ended, 5), "the leftover process was not ended")

    def test_bind_cores_splits_only_the_cpus_tandem_may_use(self):
        # What keeps two jobs apart: `taskset -c <cpus> tandem run --bind-cores ...`.
        last = max(os.sched_getaffinity(0))
        script = "import os; print('CPUS', ' '.join(map(str, sorted(os.sched_getaffinity(0)))))"
        result = subprocess.run([TANDEM, "run", self.write("custom.yaml", self.job(script, workers=1)), "--bind-cores"],
                                capture_output=True, text=True, timeout=120,
                                preexec_fn=lambda: os.sched_setaffinity(0, {last}))
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assertIn(f"[rank 0] CPUS {last}\n", result.stdout)
        result = subprocess.run([TANDEM, "run", self.write("custom.yaml", self.job(script, workers=2)), "--bind-cores"],
                                capture_output=True, text=True, timeout=120,
                                preexec_fn=lambda: os.sched_setaffinity(0, {last}))
        self.assertEqual(result.returncode, 2, result.stderr[-2000:])
        self.assertIn(f"--bind-cores: 2 workers but only 1 CPUs available to tandem ({last})", result.stderr)

    def test_bind_cores_refuses_more_workers_than_cpus(self):
        workers = len(os.sched_getaffinity(0)) + 1
        result = tandem("run", self.write("custom.yaml", self.job("print('never')", workers=workers)), "--bind-cores",
                        timeout=60)
        self.assertEqual(result.returncode, 2, result.stderr[-2000:])
        self.assertIn(f"--bind-cores: {workers} workers but only {workers - 1} CPUs available to tandem", result.stderr)
        self.assertNotIn("never", result.stdout)


class ComputeThreadPlacement(TempDirTest):
    """A worker that `tandem run --bind-cores` gave CPUs of its own keeps its compute thread apart."""

    def test_a_bound_worker_gives_its_compute_thread_a_cpu_of_its_own(self):
        # One worker bound to all of tandem's CPUs (at least two here): the thread that trains on the highest,
        # the gradient-sum, checkpoint and transport threads on the others. TANDEM_PIN_COMPUTE_THREAD=0 keeps
        # the scheduler's placement. (launch_unit_test's ThreadPlacement checks the threads' masks.)
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            self.skipTest("needs a machine with two CPUs")
        for pin in ("1", "0"):
            # One GEMM thread, as pipelines' stages run in bench/: several share the CPUs and are not placed.
            env = {k: v for k, v in os.environ.items() if k != "TANDEM_PIN_COMPUTE_THREAD"}
            env["OPENBLAS_NUM_THREADS"] = "1"
            if pin == "0":
                env["TANDEM_PIN_COMPUTE_THREAD"] = "0"
            result = subprocess.run([TANDEM, "run", EXAMPLE, "--workers", "1", "--max-steps", "2", "--bind-cores"],
                                    capture_output=True, text=True, timeout=120, env=env)
            self.assertEqual(result.returncode, 0, result.stderr[-2000:])
            placed = re.search(r"compute thread alone on CPU (\d+), the worker's other threads on CPUs ([\d,-]+)",
                               result.stderr)
            if pin == "0":
                self.assertIsNone(placed, result.stderr[-2000:])
                continue
            self.assertIsNotNone(placed, result.stderr[-2000:])
            self.assertEqual(int(placed.group(1)), cpus[-1])
            others = set()
            for part in placed.group(2).split(","):
                first, _, last = part.partition("-")
                others |= set(range(int(first), int(last or first) + 1))
            self.assertTrue(others, placed.group(2))
            self.assertLessEqual(others, set(cpus[:-1]))  # without the compute CPU (and its hyperthread sibling)
        # Several GEMM threads (tandem's default: one per core of the set) are not placed, and the log says so.
        env = {k: v for k, v in os.environ.items() if k not in ("TANDEM_PIN_COMPUTE_THREAD", "OPENBLAS_NUM_THREADS")}
        result = subprocess.run([TANDEM, "run", EXAMPLE, "--workers", "1", "--max-steps", "2", "--bind-cores"],
                                capture_output=True, text=True, timeout=120, env=env)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        shared = re.search(r"(\d+) GEMM threads share the worker's CPUs: its threads are not placed", result.stderr)
        self.assertIsNotNone(shared, result.stderr[-2000:])
        self.assertGreater(int(shared.group(1)), 1)
        # Unbound workers never place, even when the user's environment says 1: they would all pick one CPU.
        env = dict(os.environ, TANDEM_PIN_COMPUTE_THREAD="1", OPENBLAS_NUM_THREADS="1")
        result = subprocess.run([TANDEM, "run", EXAMPLE, "--workers", "2", "--max-steps", "2"],
                                capture_output=True, text=True, timeout=120, env=env)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assertNotIn("compute thread alone", result.stderr)


if __name__ == "__main__":
    unittest.main()
