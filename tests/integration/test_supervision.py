"""`tandem run` supervises its workers: a dead worker stops the group within 10 s and is named with its
exit code; Ctrl-C stops everyone; killing tandem itself leaves no orphan workers."""

import os
import signal
import subprocess
import threading
import time
import unittest

from tandem_testlib import TANDEM, TempDirTest, children_of, manifest, rank_of, wait_for, worker_pids


class Supervision(TempDirTest):
    def start_job(self, workers=2):
        # Long enough (synthetic data, many epochs) that it is still training when we interfere.
        # restartPolicy Never: this is about stopping the group, not restarting it (test_fault_tolerance).
        config = self.write("job.yaml", manifest(workers=workers, data_kind="synthetic", samples=8192, epochs=2000,
                                                 extra_spec="  runPolicy: {restartPolicy: Never}\n"))
        process = subprocess.Popen([TANDEM, "run", config], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
        self.addCleanup(self.cleanup, process)
        # Collect stderr in the background so the pipe never fills.
        self.stderr_lines = []
        self.stderr_reader = threading.Thread(target=lambda: self.stderr_lines.extend(process.stderr), daemon=True)
        self.stderr_reader.start()
        # Wait for the first progress line: every worker is then training.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            if line.startswith("epoch "):
                threading.Thread(target=lambda: process.stdout.read(), daemon=True).start()
                workers_now = children_of(process.pid)
                self.assertEqual(len(workers_now), workers, "one child process per worker")
                # Ordered by rank, read from each worker's environment.
                return process, sorted(workers_now, key=rank_of)
        self.fail("the job never reported progress: " + "".join(self.stderr_lines)[-3000:])

    def cleanup(self, process):
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        process.stdout.close()
        process.stderr.close()

    def assert_no_orphans(self, pids):
        alive = lambda: [pid for pid in pids if pid in worker_pids()]
        self.assertTrue(wait_for(lambda: not alive(), 10), f"orphan workers still running: {alive()}")

    def test_dead_worker_stops_the_group_and_is_named(self):
        process, pids = self.start_job(workers=2)
        os.kill(pids[1], signal.SIGKILL)
        killed_at = time.monotonic()
        code = process.wait(timeout=30)
        self.assertLess(time.monotonic() - killed_at, 10, "the other workers must be stopped within 10 s")
        self.stderr_reader.join(10)
        stderr = "".join(self.stderr_lines)
        self.assertIn("worker rank 1 was killed by signal 9", stderr)
        self.assertEqual(code, 128 + 9)
        self.assert_no_orphans(pids)

    def test_ctrl_c_stops_every_worker(self):
        process, pids = self.start_job(workers=2)
        os.killpg(process.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
        code = process.wait(timeout=30)
        self.stderr_reader.join(10)
        self.assertEqual(code, 130)
        self.assertIn("interrupted; all workers stopped", "".join(self.stderr_lines))
        self.assert_no_orphans(pids)

    def test_killing_tandem_kills_its_workers(self):
        process, pids = self.start_job(workers=2)
        process.kill()
        process.wait(timeout=10)
        self.assert_no_orphans(pids)


if __name__ == "__main__":
    unittest.main()
