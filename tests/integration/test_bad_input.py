"""Bad input never starts training: each case fails fast with the exit code of DESIGN.md §3 and one line
that names the field, file or peer. Covers the manifest (tandem validate and tandem run), the dataset,
and the rendezvous (unreachable, wrong token, another config hash)."""

import gzip
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
import unittest

from tandem_testlib import FASHION_MNIST, TANDEM, WORKER, TempDirTest, free_port, kill_quietly, manifest, run, tandem

EXIT_INVALID_CONFIG = 2
EXIT_BAD_DATA = 3
EXIT_REFUSED = 4
EXIT_PEER_LOST = 129
EXIT_RESOURCE_UNAVAILABLE = 150


def started_training(output):
    return "@progress" in output or "epoch 1/" in output


class ManifestErrors(TempDirTest):
    """Each bad manifest: `tandem validate` and `tandem run` exit 2 naming the field; nothing trains."""

    def assert_rejected(self, text, expected_line):
        path = self.write("job.yaml", text)
        for command in (["validate", path], ["run", path]):
            result = tandem(*command, timeout=60)
            self.assertEqual(result.returncode, EXIT_INVALID_CONFIG, (command, result.stdout, result.stderr))
            self.assertIn(expected_line, result.stderr, (command, result.stderr))
            self.assertFalse(started_training(result.stdout + result.stderr))

    def test_malformed_yaml(self):
        self.assert_rejected("apiVersion: tandem.dev/v1alpha1\nspec: {workers: [1, 2\n", "malformed YAML")

    def test_unknown_field(self):
        text = manifest(workers=1).replace("globalBatchSize: 256", "globalBatchSiz: 256")
        self.assert_rejected(text, "spec.training.globalBatchSiz: unknown field")

    def test_wrong_type(self):
        text = manifest().replace("workers: 1", "workers: four")
        self.assert_rejected(text, 'spec.workers: expected an integer, got "four"')

    def test_batch_not_divisible(self):
        self.assert_rejected(manifest(workers=4, global_batch=250),
                             "spec.training.globalBatchSize: 250 is not divisible by 4 workers")

    def test_missing_required_field(self):
        text = manifest().replace("  name: itest\n", "  labels: {team: ml}\n")
        self.assert_rejected(text, "metadata.name: required field is missing")

    def test_workers_override_checked(self):
        path = self.write("job.yaml", manifest(workers=1, global_batch=250))
        result = tandem("run", path, "--workers", "4", timeout=60)
        self.assertEqual(result.returncode, EXIT_INVALID_CONFIG, result.stderr)
        self.assertIn("spec.training.globalBatchSize: 250 is not divisible by 4 workers (with --workers 4)", result.stderr)

    def test_out_of_range_flags_are_refused_before_any_worker_starts(self):
        path = self.write("job.yaml", manifest())
        for flags, line in ((["--rendezvous-timeout", "inf"],
                             '--rendezvous-timeout: expected a positive number up to 1000000, got "inf"'),
                            (["--collective-timeout", "1e10"], "--collective-timeout: expected a positive number"),
                            (["--max-steps", "-5"], '--max-steps: expected an integer from 0 to'),
                            (["--grace-seconds", "0"], "--grace-seconds: expected a positive number")):
            result = tandem("run", path, *flags, timeout=60)
            self.assertEqual(result.returncode, EXIT_INVALID_CONFIG, (flags, result.stderr))
            self.assertIn(line, result.stderr)
            self.assertNotIn("local worker", result.stderr)  # "tandem: running ... with 1 local worker"

    def test_every_example_manifest_validates(self):
        examples = os.path.join(os.path.dirname(__file__), "..", "..", "manifests", "examples")
        names = sorted(n for n in os.listdir(examples) if n.endswith(".yaml"))
        self.assertGreaterEqual(len(names), 3)
        for name in names:
            result = tandem("validate", os.path.join(examples, name), timeout=60)
            self.assertEqual(result.returncode, 0, f"{name}: {result.stderr}")

    def test_valid_manifest_passes_validate(self):
        path = self.write("job.yaml", manifest(workers=4))
        result = tandem("validate", path, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("valid DistributedTrainingJob default/itest", result.stdout)


class Divergence(TempDirTest):
    def test_a_diverging_run_stops_at_the_first_non_finite_loss_naming_the_learning_rate(self):
        # SGD at lr 1e30 overflows the parameters in its first update: step 2's loss is NaN on every rank
        # (the loss is summed across them), so every rank stops there, before a NaN checkpoint. Permanent.
        config = self.write("job.yaml", manifest(workers=2, data_kind="synthetic", samples=1024, epochs=5,
                                                 global_batch=64, optimizer="sgd", lr="1.0e+30",
                                                 extra_spec="  runPolicy: {restartPolicy: ExitCode}\n"))
        result = tandem("run", config, "--quiet", timeout=120)
        self.assertEqual(result.returncode, EXIT_INVALID_CONFIG, result.stderr[-2000:])
        for rank in (0, 1):
            self.assertRegex(result.stderr, f"rank={rank} step=2 INVALID_ARGUMENT: step 2: the training loss is NaN: "
                                            r"training diverged \(spec.optimizer.lr 1e\+30")
        self.assertIn("restartPolicy ExitCode: exit code 2 is permanent (1-127), not restarting", result.stderr)


class TooLargeForTheMachine(TempDirTest):
    def test_a_dataset_larger_than_memory_is_a_permanent_error_naming_the_fields(self):
        # 10^10 synthetic samples of 784 floats: 31 TB. The allocation fails at once (not the OOM killer);
        # retrying would ask for the same, so the exit is permanent, with the likely fields named.
        config = self.write("job.yaml", manifest(data_kind="synthetic", samples=10000000000,
                                                 extra_spec="  runPolicy: {restartPolicy: ExitCode}\n"))
        # Under a 16 GiB address-space limit, so that the allocation fails whatever the host's overcommit
        # policy (with vm.overcommit_memory 1 it would succeed, and zero-filling it would wake the OOM killer).
        limit = 16 << 30
        result = subprocess.run([TANDEM, "run", config, "--quiet"], capture_output=True, text=True, timeout=120,
                                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
        self.assertEqual(result.returncode, EXIT_INVALID_CONFIG, result.stderr[-2000:])
        self.assertIn("out of memory: an allocation failed (is spec.data.samples", result.stderr)
        self.assertIn("exit code 2 is permanent", result.stderr)


class DatasetErrors(TempDirTest):
    def test_missing_dataset_directory(self):
        path = self.write("job.yaml", manifest(data_path="/nonexistent/fashion-mnist"))
        result = tandem("run", path, timeout=60)
        self.assertEqual(result.returncode, EXIT_INVALID_CONFIG, result.stderr)
        self.assertIn("spec.data.path: dataset directory /nonexistent/fashion-mnist does not exist", result.stderr)
        # The worker on its own (as in a pod) names it too, with the bad-data code.
        result = run([WORKER, "--config", path], timeout=60, env={"TANDEM_RANK": "0", "TANDEM_WORLD_SIZE": "1"})
        self.assertEqual(result.returncode, EXIT_BAD_DATA, result.stderr)
        self.assertIn("/nonexistent/fashion-mnist does not exist", result.stderr)

    def copy_dataset(self):
        directory = os.path.join(self.tmp, "fmnist")
        shutil.copytree(FASHION_MNIST, directory)
        return directory

    def test_truncated_compressed_idx(self):
        directory = self.copy_dataset()
        images = os.path.join(directory, "train-images-idx3-ubyte.gz")
        size = os.path.getsize(images)
        with open(images, "r+b") as f:
            f.truncate(size // 2)
        result = tandem("run", self.write("job.yaml", manifest(data_path=directory)), timeout=120)
        self.assertEqual(result.returncode, EXIT_BAD_DATA, result.stderr)
        self.assertIn(images, result.stderr)
        self.assertIn("worker rank 0 exited with code 3", result.stderr)
        self.assertFalse(started_training(result.stdout))

    def test_truncated_uncompressed_idx(self):
        directory = self.copy_dataset()
        labels = os.path.join(directory, "t10k-labels-idx1-ubyte")
        with gzip.open(labels + ".gz", "rb") as f:
            content = f.read()
        os.remove(labels + ".gz")
        with open(labels, "wb") as f:
            f.write(content[:5000])
        result = tandem("run", self.write("job.yaml", manifest(data_path=directory)), timeout=120)
        self.assertEqual(result.returncode, EXIT_BAD_DATA, result.stderr)
        self.assertIn(f"{labels}: truncated: the header promises 10000 values but the file holds 4992", result.stderr)


class RendezvousErrors(TempDirTest):
    """Workers started by hand, as the operator's pods would be, with the environment of DESIGN.md §3."""

    def worker_env(self, rank, port, token="secret-token-1", world=2):
        return {"TANDEM_RANK": str(rank), "TANDEM_WORLD_SIZE": str(world), "TANDEM_GENERATION": "0",
                "TANDEM_RDZV_ENDPOINT": f"127.0.0.1:{port}", "TANDEM_RDZV_TOKEN": token,
                "TANDEM_POD_IP": "127.0.0.1", "TANDEM_JOB": "default/itest"}

    def start_worker(self, config, env, timeout_seconds):
        full_env = dict(os.environ)
        full_env.update(env)
        return subprocess.Popen([WORKER, "--config", config, "--rendezvous-timeout", str(timeout_seconds)],
                                env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def test_unreachable_rendezvous_fails_within_its_deadline(self):
        config = self.write("job.yaml", manifest(workers=2, data_kind="synthetic", samples=1024))
        started = time.monotonic()
        result = run([WORKER, "--config", config, "--rendezvous-timeout", "2"], timeout=30,
                     env=self.worker_env(1, free_port()))
        elapsed = time.monotonic() - started
        self.assertEqual(result.returncode, EXIT_PEER_LOST, result.stderr)
        self.assertIn("cannot reach the rendezvous at 127.0.0.1:", result.stderr)
        self.assertIn("within 2.0s", result.stderr)
        self.assertLess(elapsed, 10, "the worker must give up at its deadline, not hang")
        self.assertFalse(started_training(result.stdout + result.stderr))

    def test_sigterm_while_waiting_for_peers_at_the_rendezvous_stops_at_once(self):
        # Rank 0 of 2 waits for a rank 1 that never comes; a stop (preemption, Ctrl-C) must not wait out
        # the 60 s rendezvous deadline.
        config = self.write("job.yaml", manifest(workers=2, data_kind="synthetic", samples=1024))
        env = dict(os.environ, **self.worker_env(0, free_port()))
        process = subprocess.Popen([WORKER, "--config", config, "--rendezvous-timeout", "60"], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        time.sleep(1.5)
        process.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        _, err = process.communicate(timeout=30)
        self.assertLess(time.monotonic() - stopped, 5, "the stop waited for the rendezvous deadline")
        self.assertEqual(process.returncode, 143, err)
        self.assertIn("stopping: stopped while waiting at the rendezvous", err)

    def test_a_rank_outside_the_world_is_refused_before_it_joins(self):
        config = self.write("job.yaml", manifest(workers=2, data_kind="synthetic", samples=1024))
        for rank in ("2", "4294967296"):  # the second is 0 when narrowed to 32 bits
            result = run([WORKER, "--config", config, "--rendezvous-timeout", "2"], timeout=30,
                         env=self.worker_env(rank, free_port()))
            self.assertEqual(result.returncode, EXIT_INVALID_CONFIG, result.stderr)
            self.assertIn(f"TANDEM_RANK {rank} is outside 0..", result.stderr)
            self.assertNotIn("joining rendezvous", result.stderr)

    def test_rank_0_whose_rendezvous_port_is_taken_names_it_and_exits_as_the_cause(self):
        config = self.write("job.yaml", manifest(workers=2, data_kind="synthetic", samples=1024))
        with socket.socket() as taken:
            taken.bind(("0.0.0.0", 0))
            taken.listen()
            port = taken.getsockname()[1]
            result = run([WORKER, "--config", config, "--rendezvous-timeout", "2"], timeout=30,
                         env=self.worker_env(0, port))
        # Retryable (another pod or moment may have the port), and not "peer lost": the cause is this worker.
        self.assertEqual(result.returncode, EXIT_RESOURCE_UNAVAILABLE, result.stderr)
        self.assertIn(f"RESOURCE_UNAVAILABLE: rendezvous: cannot listen on 127.0.0.1:{port} (port in use?)", result.stderr)
        self.assertFalse(started_training(result.stdout + result.stderr))

    def refused_pair(self, rank1_config, rank1_token):
        """Rank 0 with the reference config and token; rank 1 with the given ones. Returns both outputs."""
        config = self.write("job.yaml", manifest(workers=2, data_kind="synthetic", samples=1024))
        port = free_port()
        rank0 = self.start_worker(config, self.worker_env(0, port), 6)
        try:
            time.sleep(0.3)
            rank1 = run([WORKER, "--config", rank1_config or config, "--rendezvous-timeout", "6"], timeout=60,
                        env=self.worker_env(1, port, token=rank1_token))
            out0, err0 = rank0.communicate(timeout=30)
        finally:
            kill_quietly(rank0.pid)
            rank0.wait()
        self.assertFalse(started_training(rank1.stdout + out0))
        return rank1, err0

    def test_wrong_token_is_refused_and_logged(self):
        rank1, rank0_log = self.refused_pair(None, "not-the-token")
        self.assertEqual(rank1.returncode, EXIT_REFUSED, rank1.stderr)
        self.assertIn("Join refused: wrong rendezvous token", rank1.stderr)
        self.assertIn("refused Join from rank 1", rank0_log)
        self.assertIn("wrong rendezvous token", rank0_log)
        self.assertNotIn("secret-token-1", rank0_log + rank1.stderr, "the token must never be logged")

    def test_other_config_hash_is_refused_and_logged(self):
        other = self.write("other.yaml", manifest(workers=2, data_kind="synthetic", samples=1024, hidden=(64,)))
        rank1, rank0_log = self.refused_pair(other, "secret-token-1")
        self.assertEqual(rank1.returncode, EXIT_REFUSED, rank1.stderr)
        self.assertIn("differs from rank 0's", rank1.stderr)
        self.assertIn("the ranks were given different job specs", rank1.stderr)
        self.assertIn("refused Join from rank 1", rank0_log)
        self.assertIn("config hash", rank0_log)


if __name__ == "__main__":
    unittest.main()
