"""Training through `tandem run` with real worker processes: the example reaches its accuracy with 1
and 4 workers, and 1, 2 and 4 workers follow the same trajectory (parameters after 50 steps)."""

import os
import re
import unittest

from tandem_testlib import TempDirTest, relative_error, read_floats, tandem

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


if __name__ == "__main__":
    unittest.main()
