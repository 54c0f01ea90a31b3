"""Checkpoints and fault tolerance through `tandem run` with real processes: a run that is killed
(SIGKILL, SIGTERM, mid-checkpoint) or whose newest checkpoint is damaged ends bitwise identical to an
uninterrupted run, with the same loss log; a full or unwritable checkpoint directory does not stop
training; restart policies and backoffLimit are honoured; a hung peer is detected within the
collective timeout."""

import datetime
import glob
import os
import random
import re
import signal
import subprocess
import threading
import time
import unittest

from tandem_testlib import TANDEM, TempDirTest, children_of, manifest, rank_of, read_floats, relative_error, wait_for

STEPS = 300
EVERY = 25


def job(ckpt_dir, workers=4, restart_policy="OnFailure", backoff_limit=3, data_path=None):
    extra = (f"  checkpoint: {{dir: {ckpt_dir}, everySteps: {EVERY}, keep: 3}}\n"
             f"  runPolicy: {{restartPolicy: {restart_policy}, backoffLimit: {backoff_limit}}}\n")
    kwargs = {"data_path": data_path} if data_path else {}
    return manifest(name="ft", workers=workers, epochs=2, extra_spec=extra, **kwargs)


def last_logged_step(path):
    try:
        with open(path) as f:
            lines = f.read().splitlines()
        return int(lines[-1].split()[0]) if lines else 0
    except (OSError, ValueError, IndexError):
        return 0


class FaultTolerance(TempDirTest):
    reference = None  # (params, loss log) of the uninterrupted run, shared by the tests of this class

    def run_job(self, name, config_text, steps=STEPS, env=None, interfere=None, timeout=300):
        """Runs `tandem run` to the end; `interfere(process, loss_log)` runs alongside. Returns
        (completed process, parameters, loss log text)."""
        config = self.write(f"{name}.yaml", config_text)
        params = os.path.join(self.tmp, f"{name}.params")
        loss_log = os.path.join(self.tmp, f"{name}.loss")
        full_env = dict(os.environ, **(env or {}))
        process = subprocess.Popen([TANDEM, "run", config, "--max-steps", str(steps), "--dump-params", params,
                                    "--loss-log", loss_log, "--quiet", "--collective-timeout", "5"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                                   start_new_session=True)
        output = {}
        reader = threading.Thread(target=lambda: output.update(zip(("stdout", "stderr"), process.communicate())))
        reader.start()
        try:
            if interfere:
                interfere(process, loss_log)
            reader.join(timeout)
            self.assertFalse(reader.is_alive(), "tandem run did not finish")
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            reader.join()
        process.stdout_text, process.stderr_text = output.get("stdout", ""), output.get("stderr", "")
        loss = ""
        if os.path.exists(loss_log):
            with open(loss_log) as f:
                loss = f.read()
        values = read_floats(params) if os.path.exists(params) else None
        return process, values, loss

    def uninterrupted(self):
        if FaultTolerance.reference is None:
            process, params, loss = self.run_job("reference", job(os.path.join(self.tmp, "ref-ckpt")))
            self.assertEqual(process.returncode, 0, process.stderr_text[-3000:])
            self.assertEqual(len(loss.splitlines()), STEPS)
            FaultTolerance.reference = (params, loss)
        return FaultTolerance.reference

    def assert_same_as_uninterrupted(self, process, params, loss):
        self.assertEqual(process.returncode, 0, process.stderr_text[-4000:])
        reference_params, reference_loss = self.uninterrupted()
        self.assertIsNotNone(params)
        self.assertEqual(params.tobytes(), reference_params.tobytes(), "parameters must be bitwise identical")
        self.assertEqual(loss.splitlines(), reference_loss.splitlines(), "loss log must match line for line")

    def workers_of(self, process):
        assert wait_for(lambda: len(children_of(process.pid)) >= 1, 30)
        return {rank_of(pid): pid for pid in children_of(process.pid)}

    def test_sigkill_at_a_random_step_resumes_exactly(self):
        kill_step = random.Random().randint(40, 260)
        victim_rank = random.Random().randint(0, 3)
        print(f"SIGKILL of rank {victim_rank} at step {kill_step}")

        def interfere(process, loss_log):
            self.assertTrue(wait_for(lambda: last_logged_step(loss_log) >= kill_step, 120))
            os.kill(self.workers_of(process)[victim_rank], signal.SIGKILL)

        process, params, loss = self.run_job("killed", job(os.path.join(self.tmp, "ckpt")), interfere=interfere)
        self.assert_same_as_uninterrupted(process, params, loss)
        self.assertIn("restarts 1 (0 preemptions)", process.stdout_text)
        resumed = int(re.search(r"generation 1 resumed from step (\d+)", process.stderr_text).group(1))
        self.assertEqual(resumed % EVERY, 0)
        self.assertGreater(resumed, 0)
        lost = int(re.search(r"steps lost (\d+)", process.stdout_text).group(1))
        self.assertGreaterEqual(lost, kill_step - resumed)
        self.assertLess(lost, EVERY + 40, "a failure costs the steps since the last checkpoint")

    def preempt(self, name, target_step):
        """SIGTERM to rank 2 once the loss log reaches target_step; returns the run and the step the ranks
        agreed to stop after (the signal lands a step or more later on a loaded machine)."""
        def interfere(process, loss_log):
            self.assertTrue(wait_for(lambda: last_logged_step(loss_log) >= target_step, 120))
            os.kill(self.workers_of(process)[2], signal.SIGTERM)

        process, params, loss = self.run_job(name, job(os.path.join(self.tmp, "ckpt"), backoff_limit=0),
                                             interfere=interfere)
        self.assert_same_as_uninterrupted(process, params, loss)
        self.assertIn("preempted (SIGTERM)", process.stderr_text)
        self.assertIn("restarts 1 (1 preemptions)", process.stdout_text, "a preemption does not count")
        stop = int(re.search(r"stopped by request after step (\d+)", process.stderr_text).group(1))
        return process, stop

    def assert_stop_checkpoint_rule(self, process, stop):
        """Rank 0 checkpoints at the stop when the last checkpoint is more than everySteps/2 old; the steps
        lost are then 0, otherwise they are the steps since that checkpoint."""
        last_periodic = stop // EVERY * EVERY
        lost = int(re.search(r"steps lost (\d+)", process.stdout_text).group(1))
        if stop - last_periodic > EVERY // 2:
            self.assertIn(f"stop requested: writing a checkpoint of step {stop}", process.stderr_text)
            self.assertEqual(lost, 0)
        else:
            self.assertNotIn("stop requested: writing a checkpoint", process.stderr_text)
            self.assertEqual(lost, stop - last_periodic)
            self.assertLessEqual(lost, EVERY // 2)

    def test_sigterm_checkpoints_and_restarts_without_counting(self):
        # Far enough past a periodic checkpoint (more than everySteps/2) that the stop writes its own.
        target = EVERY * random.Random().randint(2, 9) + EVERY // 2 + 2
        process, stop = self.preempt("preempted", target)
        self.assert_stop_checkpoint_rule(process, stop)

    def test_sigterm_soon_after_a_checkpoint_skips_the_stop_checkpoint(self):
        target = EVERY * random.Random().randint(2, 9) + 1
        process, stop = self.preempt("preempted-early", target)
        self.assert_stop_checkpoint_rule(process, stop)

    def test_kill_during_checkpoint_write_ignores_the_partial_one(self):
        ckpt = os.path.join(self.tmp, "ckpt")
        root = os.path.join(ckpt, "ft")

        def interfere(process, loss_log):
            # Wait for a complete checkpoint and a write in progress after it, then kill the writer.
            self.assertTrue(wait_for(lambda: glob.glob(os.path.join(root, "step-*")) and
                                     glob.glob(os.path.join(root, ".tmp-step-*")), 120, interval=0.01))
            complete = sorted(glob.glob(os.path.join(root, "step-*")))
            os.kill(self.workers_of(process)[0], signal.SIGKILL)
            self.partial = sorted(glob.glob(os.path.join(root, ".tmp-step-*")))
            self.complete_at_kill = complete

        process, params, loss = self.run_job("mid-write", job(ckpt), env={"TANDEM_FAULT_CHECKPOINT_DELAY_MS": "700"},
                                             interfere=interfere)
        self.assert_same_as_uninterrupted(process, params, loss)
        self.assertTrue(self.partial, "the kill must have hit a checkpoint in progress")
        resumed = int(re.search(r"generation 1 resumed from step (\d+)", process.stderr_text).group(1))
        newest_complete = int(os.path.basename(self.complete_at_kill[-1])[5:])
        partial_step = int(re.search(r"step-(\d+)", self.partial[-1]).group(1))
        self.assertEqual(resumed, newest_complete)
        self.assertGreater(partial_step, resumed)
        self.assertFalse(glob.glob(os.path.join(root, ".tmp-*")), "debris of the killed write is cleaned up")

    def resume_after(self, damage, env=None):
        """Runs half-way (a stop right after a checkpoint), damages the newest checkpoint with `damage`,
        then runs to the end (with `env`): the result must equal the uninterrupted run."""
        ckpt = os.path.join(self.tmp, "ckpt")
        first, _, _ = self.run_job("first-half", job(ckpt), steps=150)
        self.assertEqual(first.returncode, 0, first.stderr_text[-3000:])
        root = os.path.join(ckpt, "ft")
        with open(os.path.join(root, "latest")) as f:
            self.assertEqual(f.read().strip(), "step-00000150")
        damage(root)
        # The loss log of the first half is the second run's to continue.
        os.replace(os.path.join(self.tmp, "first-half.loss"), os.path.join(self.tmp, "second-half.loss"))
        return self.run_job("second-half", job(ckpt), env=env)

    def flip_byte(self, root, step=150):
        shard = os.path.join(root, f"step-{step:08d}", "stage-0.bin")
        with open(shard, "r+b") as f:
            f.seek(1000)
            byte = f.read(1)
            f.seek(1000)
            f.write(bytes([byte[0] ^ 0x40]))

    def test_flipped_byte_in_newest_checkpoint_falls_back(self):
        process, params, loss = self.resume_after(self.flip_byte)
        self.assert_same_as_uninterrupted(process, params, loss)
        self.assertIn("skipping checkpoint step-00000150", process.stderr_text)
        self.assertIn("SHA-256 does not match", process.stderr_text)
        self.assertIn("resumed from step 125", process.stderr_text)

    def test_only_the_newest_checkpoint_is_read_when_it_verifies(self):
        # Resume reads newest first and stops at the first that verifies: a damaged older one (kept, keep 3)
        # is never read, so never reported, and costs no time while the other ranks wait to hear the step.
        process, params, loss = self.resume_after(lambda root: self.flip_byte(root, step=100))
        self.assert_same_as_uninterrupted(process, params, loss)
        self.assertIn("resumed from step 150", process.stderr_text)
        self.assertNotIn("skipping checkpoint", process.stderr_text)

    def test_a_resume_waits_for_checkpoint_reads_slower_than_the_collective_timeout(self):
        # Storage as slow as a network volume holding a large shard: each read takes 6 s, and the damaged
        # newest one makes rank 0 read twice, while ranks 1-3 wait 12 s to hear the step, beyond the 5 s
        # collective timeout (run_job). Resume exchanges have a deadline of their own, sized for reads.
        process, params, loss = self.resume_after(self.flip_byte, env={"TANDEM_FAULT_CHECKPOINT_READ_DELAY_MS": "6000"})
        self.assert_same_as_uninterrupted(process, params, loss)
        # Rank 0's log: the second read (step 125) took its 6 s after the first was skipped.
        def logged_at(needle):
            line = next((line for line in process.stderr_text.splitlines() if needle in line), None)
            self.assertIsNotNone(line, f"no log line with {needle!r}")
            return datetime.datetime.fromisoformat(re.search(r"\d{4}-\d\d-\d\dT[\d:.]+(?=Z)", line).group(0))
        second_read = logged_at("resuming from") - logged_at("skipping checkpoint step-00000150")
        self.assertGreaterEqual(second_read.total_seconds(), 5.9, "the reads were not slowed")
        self.assertIn("resumed from step 125", process.stderr_text)
        self.assertIn("restarts 0 (0 preemptions)", process.stdout_text)
        self.assertNotIn("did not answer in time", process.stderr_text)

    def test_a_job_resumed_with_fewer_workers_continues_its_trajectory(self):
        # A cluster that lost nodes: the job resumes with 2 data-parallel workers instead of 4. The global batch
        # and its sample order stay the same, so it continues the 4-worker trajectory; only the order of the
        # gradient sums, hence float rounding, differs (measured: 6e-6 relative after 150 steps).
        ckpt = os.path.join(self.tmp, "ckpt")
        first, _, _ = self.run_job("first-half", job(ckpt), steps=150)
        self.assertEqual(first.returncode, 0, first.stderr_text[-3000:])
        os.replace(os.path.join(self.tmp, "first-half.loss"), os.path.join(self.tmp, "second-half.loss"))
        process, params, loss = self.run_job("second-half", job(ckpt, workers=2))
        self.assertEqual(process.returncode, 0, process.stderr_text[-3000:])
        self.assertIn("resumed from step 150", process.stderr_text)
        self.assertIn("with a changed training configuration (allowed: workers, learning rate, steps, ...): "
                      "workers 4 -> 2\n", process.stderr_text)
        reference_params, reference_loss = self.uninterrupted()
        relative, _ = relative_error(params, reference_params)
        self.assertLess(relative, 5e-5)
        lines, reference_lines = loss.splitlines(), reference_loss.splitlines()
        self.assertEqual(len(lines), STEPS)
        self.assertEqual(lines[:150], reference_lines[:150], "the 4-worker half is the reference's, bitwise")
        last, reference_last = float(lines[-1].split()[1]), float(reference_lines[-1].split()[1])
        self.assertLess(abs(last - reference_last) / reference_last, 1e-4)

    def test_truncated_newest_checkpoint_falls_back(self):
        def truncate(root):
            shard = os.path.join(root, "step-00000150", "stage-0.bin")
            os.truncate(shard, os.path.getsize(shard) // 3)

        process, params, loss = self.resume_after(truncate)
        self.assert_same_as_uninterrupted(process, params, loss)
        self.assertIn("stage-0.bin", process.stderr_text)
        self.assertIn("(truncated?)", process.stderr_text)
        self.assertIn("resumed from step 125", process.stderr_text)

    def test_deleted_latest_still_resumes_from_the_newest(self):
        process, params, loss = self.resume_after(lambda root: os.remove(os.path.join(root, "latest")))
        self.assert_same_as_uninterrupted(process, params, loss)
        self.assertIn("resumed from step 150", process.stderr_text)

    def test_changed_model_shape_is_refused(self):
        ckpt = os.path.join(self.tmp, "ckpt")
        first, _, _ = self.run_job("small", job(ckpt), steps=30)
        self.assertEqual(first.returncode, 0, first.stderr_text[-3000:])
        other = job(ckpt, restart_policy="ExitCode").replace("hidden: [256, 128]", "hidden: [64]")
        process, _, _ = self.run_job("other-shape", other, steps=60)
        self.assertNotEqual(process.returncode, 0)
        self.assertIn('holds model "mlp 784-256-128-10 relu" but this job trains "mlp 784-64-10 relu"',
                      process.stderr_text)
        # The other ranks hear of the refusal from rank 0 at once, instead of timing out waiting for a step.
        self.assertIn("rank=1 FAILED_PRECONDITION: the checkpoint writers refused to resume", process.stderr_text)
        self.assertNotIn("did not answer in time", process.stderr_text)

    def test_unwritable_checkpoint_directory_keeps_training(self):
        blocker = self.write("not-a-directory", "a file where the checkpoint directory should be")
        process, params, _ = self.run_job("unwritable", job(os.path.join(blocker, "ckpt"), workers=2), steps=60)
        self.assertEqual(process.returncode, 0, process.stderr_text[-3000:])
        self.assertIn("cannot create checkpoint directory", process.stderr_text)
        self.assertIn("training continues", process.stderr_text)
        self.assertIn("steps 60", process.stdout_text)

    def test_full_disk_keeps_training_and_the_older_checkpoint(self):
        mount_point = os.path.join(self.tmp, "small-disk")
        os.mkdir(mount_point)
        # Room for one checkpoint (2.8 MB) but not a second one beside it.
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", mount_point],
                                 capture_output=True, text=True)
        self.assertEqual(mounted.returncode, 0, "the test needs root to mount a small tmpfs: " + mounted.stderr)
        try:
            self.check_full_disk(mount_point)
        finally:
            subprocess.run(["umount", "-l", mount_point])

    def check_full_disk(self, mount_point):
        process, _, _ = self.run_job("full", job(mount_point, workers=2), steps=80)
        self.assertEqual(process.returncode, 0, process.stderr_text[-3000:])
        self.assertIn("No space left on device", process.stderr_text)
        self.assertIn("the last good checkpoint is step-00000025", process.stderr_text)
        self.assertIn("steps 80", process.stdout_text)
        root = os.path.join(mount_point, "ft")
        self.assertEqual(sorted(os.listdir(root)), ["latest", "step-00000025"])
        # And it is still a good checkpoint: a new run resumes from it.
        again, _, _ = self.run_job("full-again", job(mount_point, workers=2), steps=30)
        self.assertIn("resumed from step 25", again.stderr_text)


    def test_hung_checkpoint_storage_fails_the_run_within_the_checkpoint_timeout(self):
        # Every checkpoint write stalls for 120 s (an NFS server gone): training must neither wait for it
        # nor stall its peers, and must fail, naming the storage, once the write is past the timeout.
        ckpt = os.path.join(self.tmp, "ckpt")
        # Enough epochs to train well past the timeout (about 4 ms a step here).
        extra = (f"  checkpoint: {{dir: {ckpt}, everySteps: {EVERY}, keep: 3}}\n"
                 f"  runPolicy: {{restartPolicy: Never}}\n")
        config = self.write("hung.yaml", manifest(name="ft", workers=2, epochs=100, extra_spec=extra))
        started = time.monotonic()
        process = subprocess.run([TANDEM, "run", config, "--max-steps", "100000", "--quiet", "--checkpoint-timeout", "4",
                                  "--collective-timeout", "3"],
                                 capture_output=True, text=True, timeout=100,
                                 env=dict(os.environ, TANDEM_FAULT_CHECKPOINT_DELAY_MS="120000"))
        elapsed = time.monotonic() - started
        # Rank 0's own storage is the cause: its exit code says so, unlike its peer's "peer lost" (129) after it.
        self.assertEqual(process.returncode, 150, process.stderr[-3000:])
        self.assertIn("tandem: worker rank 0 exited with code 150; stopping the other workers", process.stderr)
        # Step 25's write hangs; later checkpoints are skipped while training goes on (longer than the
        # collective timeout: no peer waits for rank 0), until the write is 4 s old.
        self.assertIn("skipping the checkpoint of step 50: step-00000025 is still being written", process.stderr)
        self.assertRegex(process.stderr, f"rank=0 step=\\d+ RESOURCE_UNAVAILABLE: checkpoint step-00000025 is being written to "
                                         f"{ckpt}/ft \\(for \\d+\\.\\d s\\), longer than the checkpoint timeout \\(4\\.0 s\\): "
                                         f"the storage does not answer; the last durable checkpoint is none")
        # No peer waited for rank 0 into its collective timeout (Tandem's words for it, and Gloo's).
        self.assertNotIn("did not answer in time", process.stderr)
        self.assertNotIn("timed out", process.stderr.lower())
        self.assertLess(elapsed, 60, "the run waited for the stalled write")
        self.assertFalse(glob.glob(os.path.join(ckpt, "ft", "step-*")), "nothing was published half-written")


class RestartPolicies(TempDirTest):
    def start(self, text, steps=2000, env=None):
        config = self.write("job.yaml", text)
        process = subprocess.Popen([TANDEM, "run", config, "--max-steps", str(steps), "--quiet"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                   env=dict(os.environ, **(env or {})))
        self.addCleanup(lambda: process.poll() is None and os.killpg(process.pid, signal.SIGKILL))
        return process

    def kill_a_worker_once_training(self, process, generation_workers=None):
        self.assertTrue(wait_for(lambda: len(children_of(process.pid)) == 2, 60))
        time.sleep(1.0)  # past start-up, into training
        pids = children_of(process.pid)
        os.kill(max(pids, key=rank_of), signal.SIGKILL)
        return pids

    def test_never_fails_on_the_first_death(self):
        process = self.start(job(os.path.join(self.tmp, "ckpt"), workers=2, restart_policy="Never"))
        self.kill_a_worker_once_training(process)
        out, err = process.communicate(timeout=60)
        self.assertEqual(process.returncode, 137, err[-2000:])
        self.assertIn("worker rank 1 was killed by signal 9", err)
        self.assertIn("restartPolicy Never: not restarting", err)
        self.assertNotIn("restarting as generation", err)

    def test_exit_code_policy_restarts_a_signal_death(self):
        process = self.start(job(os.path.join(self.tmp, "ckpt"), workers=2, restart_policy="ExitCode"), steps=700)
        self.kill_a_worker_once_training(process)
        out, err = process.communicate(timeout=120)
        self.assertEqual(process.returncode, 0, err[-2000:])
        self.assertIn("restarting as generation 1", err)
        self.assertIn("restarts 1 (0 preemptions)", out)

    def broken_dataset(self):
        directory = os.path.join(self.tmp, "broken")
        os.mkdir(directory)
        for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                     "t10k-labels-idx1-ubyte.gz"):
            with open(os.path.join(directory, name), "wb") as f:
                f.write(b"\x00\x00\x08\x03")  # an IDX header cut short: exit code 3, permanent
        return directory

    def test_exit_code_policy_does_not_restart_a_permanent_error(self):
        process = self.start(job(os.path.join(self.tmp, "ckpt"), workers=2, restart_policy="ExitCode",
                                 data_path=self.broken_dataset()))
        out, err = process.communicate(timeout=60)
        self.assertEqual(process.returncode, 3, err[-2000:])
        self.assertIn("restartPolicy ExitCode: exit code 3 is permanent (1-127), not restarting", err)
        self.assertNotIn("restarting as generation", err)

    def test_backoff_limit_is_honoured_and_reported(self):
        process = self.start(job(os.path.join(self.tmp, "ckpt"), workers=2, restart_policy="OnFailure",
                                 backoff_limit=2, data_path=self.broken_dataset()))
        out, err = process.communicate(timeout=120)
        self.assertEqual(process.returncode, 3, err[-2000:])
        self.assertEqual(err.count("restarting as generation"), 2)
        self.assertIn("backoffLimit 2 reached", err)
        self.assertIn("restarts 2 of backoffLimit 2", err)

    def test_hung_peer_is_detected_within_the_collective_timeout(self):
        config = self.write("job.yaml", job(os.path.join(self.tmp, "ckpt"), workers=2))
        loss_log = os.path.join(self.tmp, "loss")
        process = subprocess.Popen([TANDEM, "run", config, "--max-steps", "700", "--quiet", "--collective-timeout", "3",
                                    "--loss-log", loss_log],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.addCleanup(lambda: process.poll() is None and os.killpg(process.pid, signal.SIGKILL))
        # Past the rendezvous (which has its own, longer deadline), into training.
        self.assertTrue(wait_for(lambda: last_logged_step(loss_log) >= 20, 60))
        hung = max(children_of(process.pid), key=rank_of)
        hung_rank = rank_of(hung)
        os.kill(hung, signal.SIGSTOP)  # alive but silent: no connection closes, only a timeout can tell
        stopped_at = time.monotonic()
        self.assertTrue(wait_for(lambda: hung not in children_of(process.pid), 20),
                        "the hung worker's generation must be torn down")
        detected = time.monotonic() - stopped_at
        out, err = process.communicate(timeout=120)
        self.assertEqual(process.returncode, 0, err[-2000:])
        # The collective timeout (3 s, counted from the survivor's next collective), then tandem's 5 s grace
        # before SIGKILL of the stopped worker, plus slack for a loaded 2-core machine.
        self.assertLess(detected, 3 + 5 + 5, "timeout, then the grace period before SIGKILL")
        self.assertIn("did not answer in time", err)
        # Heartbeats through rank 0's rendezvous server name the culprit, not just "a peer".
        self.assertRegex(err, rf"while that collective waited, rank {hung_rank} has been silent for over 1\.5 s "
                              r"\(stopped, hung or cut off\)")
        self.assertIn("restarts 1", out)

    def test_hung_peer_during_a_slow_resume_is_detected_within_the_collective_timeout(self):
        # A resume's exchanges may wait several collective timeouts for the checkpoint writers' reads (12 s
        # here). A peer that hangs meanwhile is named and the wait given up once it has been silent for one
        # collective timeout (3 s), not at the resume's own deadline; the next generation resumes.
        ckpt = os.path.join(self.tmp, "ckpt")
        config = self.write("job.yaml", job(ckpt, workers=2))
        first = subprocess.run([TANDEM, "run", config, "--max-steps", "50", "--quiet"], capture_output=True, text=True,
                               timeout=120)
        self.assertEqual(first.returncode, 0, first.stderr[-2000:])
        process = subprocess.Popen([TANDEM, "run", config, "--max-steps", "100", "--collective-timeout", "3"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                   env=dict(os.environ, TANDEM_FAULT_CHECKPOINT_READ_DELAY_MS="12000"))
        self.addCleanup(lambda: process.poll() is None and os.killpg(process.pid, signal.SIGKILL))
        self.addCleanup(process.stdout.close)
        self.addCleanup(process.stderr.close)
        lines = []  # (arrival, line) of tandem's stderr, read as it comes
        reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), line) for line in process.stderr))
        reader.start()
        threading.Thread(target=process.stdout.read, daemon=True).start()
        # Rank 0 logs the model once the initial parameters are shared; it then reads for 12 s while rank 1
        # waits to hear the step: stop rank 1 a second into that wait.
        self.assertTrue(wait_for(lambda: any("[rank 0]" in line and "model mlp:" in line for _, line in list(lines)),
                                 60), "rank 0 never got past sharing the initial parameters")
        time.sleep(1)
        hung = next(pid for pid in children_of(process.pid) if rank_of(pid) == 1)
        os.kill(hung, signal.SIGSTOP)
        stopped_at = time.monotonic()
        process.wait(timeout=120)
        reader.join(10)
        err = "".join(line for _, line in lines)
        self.assertEqual(process.returncode, 0, err[-3000:])
        self.assertIn("while resuming from the checkpoint, rank 1 has been silent for over 3 s (stopped, hung or cut "
                      "off): giving up the resume", err)
        detected = next(at for at, line in lines if "stopping the other workers" in line) - stopped_at
        # One collective timeout of silence, then tandem's stop of the group; the resume's own deadline
        # (3 x (3 s + reads)) and rank 0's 12 s read would both come later.
        self.assertLess(detected, 3 + 5, err[-3000:])
        self.assertIn("generation 1 resumed from step 50", err)


if __name__ == "__main__":
    unittest.main()
