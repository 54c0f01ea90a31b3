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


class ProgressDisplay(TempDirTest):
    """On a terminal the progress line is redrawn in place (carriage return + erase line); through a pipe it
    is a plain line every 10% of the run (or 15 s), never one per step."""

    def test_in_place_on_a_terminal(self):
        config = self.write("job.yaml", manifest(workers=1, data_kind="synthetic", samples=4096, epochs=100))
        controller, terminal = os.openpty()
        process = subprocess.Popen([TANDEM, "run", config], stdin=terminal, stdout=terminal, stderr=terminal,
                                   close_fds=True)
        os.close(terminal)
        output = bytearray()
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the terminal's last writer has gone
                break
            if not chunk:
                break
            output.extend(chunk)
        os.close(controller)
        self.assertEqual(process.wait(timeout=120), 0, output[-2000:])
        text = output.decode(errors="replace")
        redraws = text.count("\r\x1b[K")
        self.assertGreater(redraws, 5, "the progress line is redrawn in place")
        self.assertLess(redraws, 400, "redraws are throttled, not one per step (1600 steps)")
        # The last redraw shows the end, and the line is finished before the summary.
        self.assertIn("epoch 100/100  step 1600/1600", text)
        self.assertRegex(text, r"step 1600/1600[^\n]*\r?\n(.*\n)*.*summary: default/itest")

    def test_plain_lines_through_a_pipe(self):
        config = self.write("job.yaml", manifest(workers=1, data_kind="synthetic", samples=4096, epochs=20))
        result = subprocess.run([TANDEM, "run", config], capture_output=True, text=True, timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        progress = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
        self.assertNotIn("\x1b[K", result.stdout)
        self.assertGreaterEqual(len(progress), 10)
        self.assertLessEqual(len(progress), 12, "about one line per 10% of 320 steps, not one per step")
        self.assertTrue(progress[-1].startswith("epoch 20/20  step 320/320"))


if __name__ == "__main__":
    unittest.main()
