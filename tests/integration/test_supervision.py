"""`tandem run` supervises its workers: a dead worker stops the group within 10 s and is named with its
exit code; Ctrl-C stops everyone (within the grace period it gave them, at once on a second Ctrl-C);
killing tandem itself leaves no orphan workers; workers never read tandem's terminal, odd output and
closed output cost tandem nothing, and a worker that cannot be started ends the run cleanly."""

import os
import re
import resource
import signal
import subprocess
import threading
import time
import unittest

from tandem_testlib import TANDEM, TempDirTest, children_of, custom_manifest, manifest, rank_of, run, wait_for, worker_pids


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


class Launcher(TempDirTest):
    """The launcher's own edges, with custom-mode workers (python3 -c SCRIPT) that do exactly one thing."""

    # Each worker says READY, then on SIGTERM takes `seconds` to "write its checkpoint" before exiting 143.
    SLOW_STOP = ("import signal, sys, time\n"
                 "def stop(*_):\n"
                 "    time.sleep({seconds}); print('CHECKPOINTED', flush=True); sys.exit(143)\n"
                 "signal.signal(signal.SIGTERM, stop)\n"
                 "print('READY', flush=True)\n"
                 "while True: time.sleep(0.05)\n")

    def start(self, script, *flags, workers=2):
        process = subprocess.Popen([TANDEM, "run", self.write("custom.yaml", custom_manifest(script, workers)), *flags],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        ready = 0
        while ready < workers:
            line = process.stdout.readline()
            if not line:
                self.fail("a worker never said READY: " + process.stderr.read()[-2000:])
            ready += "READY" in line
        return process

    # Each worker starts a grandchild (its own child, `sleep`), says READY with its pid, then does `then`.
    GRANDCHILD = ("import subprocess, sys, time\n"
                  "child = subprocess.Popen(['sleep', '1000'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
                  "print(f'READY {{child.pid}}', flush=True)\n"
                  "{then}\n")

    def grandchildren_of(self, process, workers):
        pids = []
        while len(pids) < workers:
            line = process.stdout.readline()
            if not line:
                self.fail("a worker never said READY: " + process.stderr.read()[-2000:])
            found = re.search(r"READY (\d+)", line)
            if found:
                pids.append(int(found.group(1)))
        return pids

    def assert_gone(self, pids):
        def running(pid):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    return f.read().rsplit(")", 1)[1].split()[0] != "Z"
            except OSError:
                return False
        self.assertTrue(wait_for(lambda: not any(running(pid) for pid in pids), 10),
                        f"processes the workers started outlived the run: {[p for p in pids if running(p)]}")

    def test_killing_tandem_ends_what_its_workers_started(self):
        # SIGKILL reaches tandem alone; the workers die with it (parent-death signal), and what they started
        # is ended by tandem's watchdog.
        process = subprocess.Popen([TANDEM, "run", self.write("custom.yaml", custom_manifest(
            self.GRANDCHILD.format(then="while True: time.sleep(0.05)"), 2))], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        self.addCleanup(process.stderr.close)
        self.addCleanup(process.stdout.close)
        pids = self.grandchildren_of(process, 2)
        process.kill()
        process.wait(timeout=10)
        self.assert_gone(pids)

    def test_a_finished_run_leaves_nothing_its_workers_started(self):
        # The workers exit 0 at once; what they started in the background is ended with them, as a kubelet
        # ends a container's processes when its main process exits.
        process = subprocess.Popen([TANDEM, "run", self.write("custom.yaml", custom_manifest(
            self.GRANDCHILD.format(then="sys.exit(0)"), 2))], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        pids = self.grandchildren_of(process, 2)
        _, err = process.communicate(timeout=30)
        self.assertEqual(process.returncode, 0, err[-2000:])
        self.assert_gone(pids)

    def test_a_stop_waits_for_the_grace_period_given_to_the_workers(self):
        # Workers are told they have --grace-seconds to finish; tandem must not kill them sooner.
        process = self.start(self.SLOW_STOP.format(seconds=6), "--grace-seconds", "10")
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
        self.assertEqual(process.returncode, 143, err[-2000:])
        self.assertEqual(out.count("CHECKPOINTED"), 2, "a worker was killed inside its grace period: " + err[-2000:])

    def test_a_closed_terminal_stops_the_workers_as_sigterm_does(self):
        # SIGHUP (the terminal or SSH session went away): the workers, in process groups of their own, do
        # not get it; tandem stops them with their grace period instead of taking them down with it.
        process = self.start(self.SLOW_STOP.format(seconds=1), "--grace-seconds", "10")
        process.send_signal(signal.SIGHUP)
        out, err = process.communicate(timeout=30)
        self.assertIn("Hangup: stopping all workers", err)
        self.assertEqual(out.count("CHECKPOINTED"), 2, "a worker did not get its grace period: " + err[-2000:])
        self.assertEqual(process.returncode, 143, err[-2000:])

    def test_the_active_deadline_stops_the_workers_and_ends_the_job(self):
        # spec.runPolicy.activeDeadlineSeconds bounds a local run as the operator bounds a job: the workers get
        # their grace period to checkpoint, then the job fails with 124 (timeout(1)'s code), not restarted.
        text = custom_manifest(self.SLOW_STOP.format(seconds=1), 2).replace(
            "runPolicy: {restartPolicy: Never}", "runPolicy: {restartPolicy: OnFailure, activeDeadlineSeconds: 2}")
        started = time.monotonic()
        result = run([TANDEM, "run", self.write("deadline.yaml", text), "--grace-seconds", "10"], timeout=60)
        self.assertGreaterEqual(time.monotonic() - started, 2)
        self.assertEqual(result.returncode, 124, result.stderr[-2000:])
        self.assertIn("spec.runPolicy.activeDeadlineSeconds (2 s) passed: stopping all workers", result.stderr)
        self.assertEqual(result.stdout.count("CHECKPOINTED"), 2, result.stderr[-2000:])
        self.assertIn("DeadlineExceeded: not restarting", result.stderr)

    def test_the_active_deadline_counts_across_restarts(self):
        # Every generation fails at once (150: retryable) and backoffLimit would allow 100 restarts: the
        # deadline, counted from the start and not per generation, ends the job after a few, whether it
        # passes while a generation runs, just after one failed, or during the back-off before the next.
        text = custom_manifest("import sys; sys.exit(150)", 2).replace(
            "runPolicy: {restartPolicy: Never}",
            "runPolicy: {restartPolicy: OnFailure, backoffLimit: 100, activeDeadlineSeconds: 2}")
        started = time.monotonic()
        result = run([TANDEM, "run", self.write("deadline.yaml", text)], timeout=60)
        elapsed = time.monotonic() - started
        self.assertEqual(result.returncode, 124, result.stderr[-2000:])
        self.assertGreaterEqual(elapsed, 2)
        self.assertLess(elapsed, 15, "the back-off (at most 5 s) ran on past the deadline")
        self.assertIn("restarting as generation 1", result.stderr)
        self.assertRegex(result.stderr, r"activeDeadlineSeconds (\(2 s\) passed: stopping all workers|has passed"
                                        r"|passed during the back-off)")
        self.assertIn("DeadlineExceeded: not restarting", result.stderr)
        self.assertNotIn("backoffLimit 100 reached", result.stderr)

    def test_workers_that_finish_within_the_deadlines_stop_succeed(self):
        # The deadline passes and the workers are stopped as on a preemption, but they exit 0: the job had
        # finished (its last step within the grace period), so it succeeded rather than timed out.
        script = ("import signal, sys, time\n"
                  "signal.signal(signal.SIGTERM, lambda *_: (print('FINISHED', flush=True), sys.exit(0)))\n"
                  "while True: time.sleep(0.05)\n")
        text = custom_manifest(script, 2).replace("runPolicy: {restartPolicy: Never}",
                                                  "runPolicy: {restartPolicy: OnFailure, activeDeadlineSeconds: 1}")
        result = run([TANDEM, "run", self.write("finished.yaml", text), "--grace-seconds", "10"], timeout=60)
        self.assertIn("activeDeadlineSeconds (1 s) passed: stopping all workers", result.stderr)
        self.assertEqual(result.stdout.count("FINISHED"), 2, result.stderr[-2000:])
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assertNotIn("restarting", result.stderr)

    def test_more_workers_than_cpus_is_said_once(self):
        # taskset leaves tandem (and its workers) one CPU: the two workers share it, which tandem says, since
        # their timings (a pipeline's bubble above all) are then not those of a CPU each.
        def job(workers):
            return self.write(f"job{workers}.yaml", manifest(workers=workers, data_kind="synthetic", samples=1024,
                                                             global_batch=64))
        shared = run(["taskset", "-c", "0", TANDEM, "run", job(2), "--max-steps", "3", "--quiet"], timeout=120)
        self.assertEqual(shared.returncode, 0, shared.stderr[-2000:])
        self.assertEqual(shared.stderr.count("tandem: 2 workers share 1 CPU: each computes at about 0.5 of a CPU's "
                                             "pace (timings, and a pipeline's bubble, are not those of a CPU per "
                                             "worker)"), 1, shared.stderr)
        alone = run(["taskset", "-c", "0", TANDEM, "run", job(1), "--max-steps", "3", "--quiet"], timeout=120)
        self.assertEqual(alone.returncode, 0, alone.stderr[-2000:])
        self.assertNotIn("workers share", alone.stderr)
        # A custom command's workers are the user's to place: nothing is said of them.
        custom = run(["taskset", "-c", "0", TANDEM, "run", self.write("custom.yaml", custom_manifest("print(1)", 2))],
                     timeout=60)
        self.assertEqual(custom.returncode, 0, custom.stderr[-2000:])
        self.assertNotIn("workers share", custom.stderr)

    def test_a_suspended_job_does_not_run(self):
        text = custom_manifest("print('RAN')", 1).replace("runPolicy: {restartPolicy: Never}",
                                                         "runPolicy: {suspend: true}")
        result = run([TANDEM, "run", self.write("suspended.yaml", text)], timeout=60)
        self.assertEqual(result.returncode, 2, result.stderr[-2000:])
        self.assertIn("spec.runPolicy.suspend: true: nothing runs", result.stderr)
        self.assertNotIn("RAN", result.stdout)

    def test_a_second_ctrl_c_kills_at_once(self):
        process = self.start(self.SLOW_STOP.format(seconds=60))
        process.send_signal(signal.SIGINT)
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        started = time.monotonic()
        out, err = process.communicate(timeout=30)
        self.assertLess(time.monotonic() - started, 5, "the second Ctrl-C waited out the grace period")
        self.assertIn("stopping all workers (again to kill them now)", err)
        self.assertIn("interrupted again: killing all workers", err)
        self.assertNotIn("CHECKPOINTED", out)

    def test_ctrl_c_while_a_failed_group_stops_means_no_restart(self):
        # Rank 1 fails (retryable) at 1 s; rank 0 takes 3 s to stop after SIGTERM. A Ctrl-C in that window is
        # the user's: under OnFailure tandem must not start another generation.
        script = ("import os, signal, sys, time\n"
                  "def stop(*_):\n"
                  "    time.sleep(3); sys.exit(143)\n"
                  "signal.signal(signal.SIGTERM, stop)\n"
                  "time.sleep(1)\n"
                  "if os.environ['RANK'] == '1': os._exit(150)\n"
                  "time.sleep(60)\n")
        process = subprocess.Popen([TANDEM, "run", self.write("custom.yaml", custom_manifest(script, restart_policy="OnFailure"))],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        time.sleep(2.2)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
        self.assertIn("worker rank 1 exited with code 150; stopping the other workers", err)
        self.assertIn("the workers are already stopping; no restart", err)
        self.assertNotIn("restarting as generation 1", err)
        self.assertEqual(process.returncode, 150, err[-2000:])

    def test_workers_do_not_read_tandems_input(self):
        # tandem's stdin stays open and silent (as a terminal would): a worker reading it sees end of file.
        script = "import sys; print('INPUT', repr(sys.stdin.read()), flush=True)"
        process = subprocess.Popen([TANDEM, "run", self.write("custom.yaml", custom_manifest(script))],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        watchdog = threading.Timer(30, process.kill)  # a worker blocked on the open stdin would hang the test
        watchdog.start()
        try:
            out = process.stdout.read()  # ends when every worker has exited, with stdin still open
            err = process.stderr.read()
            process.wait()
        finally:
            watchdog.cancel()
            for stream in (process.stdin, process.stdout, process.stderr):
                stream.close()
        self.assertEqual(process.returncode, 0, err[-2000:])
        self.assertEqual(out.count("INPUT ''"), 2, out)

    def test_workers_that_closed_their_output_cost_tandem_no_cpu(self):
        script = "import os, time; os.close(1); os.close(2); time.sleep(3)"
        process = subprocess.Popen([TANDEM, "run", self.write("custom.yaml", custom_manifest(script))],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        self.assertEqual(process.returncode, 0)
        # tandem, its workers and their children: a supervisor spinning on waitpid for 3 s would use ~3 s.
        self.assertLess(usage.ru_utime + usage.ru_stime, 1.0)

    def test_progress_and_summary_with_missing_or_null_numbers(self):
        # A NaN loss travels as JSON null; a custom command may print anything after '@'.
        script = ("import json, os\n"
                  "if os.environ['RANK'] == '0':\n"
                  "    print('@progress ' + json.dumps({'step': 1, 'totalSteps': 2, 'loss': None}))\n"
                  "    print('@progress ' + json.dumps({'step': 'two'}))\n"
                  "    print('@progress [1, 2]')\n"
                  "    print('@summary ' + json.dumps({'testLoss': None, 'steps': 2}))\n")
        result = subprocess.run([TANDEM, "run", self.write("custom.yaml", custom_manifest(script))],
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assertIn("loss nan", result.stdout)
        self.assertRegex(result.stdout, r"summary: default/custom  test accuracy nan%  test loss nan  steps 2 ")

    def test_worker_flags_that_a_custom_command_ignores_are_named(self):
        result = subprocess.run([TANDEM, "run", self.write("custom.yaml", custom_manifest("pass")), "--max-steps", "5",
                                 "--grace-seconds", "10"], capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assertIn("tandem: --max-steps has no effect in custom mode", result.stderr)
        self.assertNotIn("--grace-seconds has no effect", result.stderr)  # it sets tandem's own wait

    def test_a_worker_that_cannot_be_started_ends_the_run_and_its_started_peers(self):
        # Too few file descriptors for every worker's output pipes: this machine's limit, retryable (150).
        limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (12, 12))
        script = "import time; time.sleep(30)"
        started = time.monotonic()
        result = subprocess.run([TANDEM, "run", self.write("custom.yaml", custom_manifest(script, workers=8))],
                                capture_output=True, text=True, timeout=60, preexec_fn=limit)
        self.assertLess(time.monotonic() - started, 10, "the started workers were waited for")
        self.assertEqual(result.returncode, 150, result.stderr[-2000:])
        self.assertRegex(result.stderr, r"tandem: cannot start worker rank [1-7]: pipe: Too many open files")


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
