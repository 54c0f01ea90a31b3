"""Pipeline model parallelism and hybrid pipeline x data parallelism through `tandem run`:
equivalence with one worker (bitwise, for both schedules), validation of bad layouts, the 1F1B
activation bound, the debug timeline, and a SIGKILL of a middle stage resumed from its checkpoint."""

import os
import random
import re
import signal
import subprocess
import sys
import threading
import unittest

from tandem_testlib import TANDEM, TempDirTest, children_of, rank_of, read_floats, relative_error, tandem, wait_for

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
import pipeline_bench  # noqa: E402  (the benchmark's manifests)
import pipeline_timeline  # noqa: E402  (the benchmark's reader of the same logs)

HIDDEN = "[512, 512, 512, 512]"  # the example mlp with extra hidden layers: 784-512-512-512-512-10
# Equal GEMM threading on every side: OpenBLAS' blocking (hence float rounding) depends on it.
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1"}


def pipeline_job(workers, stages, micro_batches, schedule="1F1B", hidden=HIDDEN, extra=""):
    return f"""apiVersion: tandem.dev/v1alpha1
kind: DistributedTrainingJob
metadata: {{name: pipe}}
spec:
  workers: {workers}
  parallelism: {{pipelineStages: {stages}, microBatches: {micro_batches}, schedule: {schedule}}}
  model: {{kind: mlp, mlp: {{hidden: {hidden}, activation: relu}}}}
  data: {{kind: fashion-mnist, path: /usr/share/datasets/fashion-mnist}}
  optimizer: {{kind: adamw, lr: 1.0e-3}}
  training: {{globalBatchSize: 256, epochs: 1, seed: 1}}
{extra}"""


class PipelineEquivalence(TempDirTest):
    """50 steps of the same global batch: a pipeline (P=2, P=4) and a hybrid (P=2 x D=2) end with the very
    parameters of one worker that accumulates the same microbatches (bitwise, so well within 1e-5)."""

    def parameters(self, name, text, env=None):
        path = os.path.join(self.tmp, f"{name}.bin")
        result = tandem("run", self.write(f"{name}.yaml", text), "--max-steps", "50", "--dump-params", path, "--quiet",
                        env=dict(ONE_THREAD, **(env or {})))
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        return read_floats(path), result.stderr

    def check(self, workers, stages, micro_batches, reference_micro_batches, partition=()):
        reference, _ = self.parameters("single", pipeline_job(1, 1, reference_micro_batches))
        self.assertEqual(len(reference), 784 * 512 + 512 + 3 * (512 * 512 + 512) + 512 * 10 + 10)
        for schedule in ("GPipe", "1F1B"):
            values, log = self.parameters(f"p{stages}-{schedule}", pipeline_job(workers, stages, micro_batches, schedule))
            self.assertIn(f"pipeline of {stages} stages x {workers // stages} replicas", log)
            self.assertIn(f"{schedule}; partition by estimated FLOPs:", log)
            for line in partition:
                self.assertIn(line + " MFLOP per sample (forward + backward, estimated)", log)
            relative, largest = relative_error(values, reference)
            print(f"P={stages} D={workers // stages} M={micro_batches} {schedule} vs 1 worker with "
                  f"{reference_micro_batches} microbatches: relative error {relative:.3g}, largest {largest:.3g}")
            self.assertEqual(values.tobytes(), reference.tobytes())
            self.assertLessEqual(relative, 1e-5)

    def test_two_stages(self):
        self.check(workers=2, stages=2, micro_batches=4, reference_micro_batches=4)

    def test_fewer_microbatches_than_stages(self):
        # M < P: 1F1B's warm-up is cut short (every stage holds min(P - stage, M) microbatches) and the
        # buffer slots wrap around less than once.
        self.check(workers=4, stages=4, micro_batches=2, reference_micro_batches=2)

    def test_four_stages(self):
        # Per sample, a linear layer costs forward + weight gradient + input gradient multiply-adds, the
        # first no input gradient: 2 x 784 x 512, then 3 x 512 x 512 three times, then 3 x 512 x 10. The
        # least largest stage puts the last two together; a FLOP is 2 multiply-adds.
        self.check(workers=4, stages=4, micro_batches=4, reference_micro_batches=4, partition=(
            "stage 0: linear layers 0-0, 401920 parameters, 1.60563",     # 4 x 784 x 512 / 1e6
            "stage 1: linear layers 1-1, 262656 parameters, 1.57286",     # 6 x 512 x 512 / 1e6
            "stage 2: linear layers 2-2, 262656 parameters, 1.57286",
            "stage 3: linear layers 3-4, 267786 parameters, 1.60358"))    # 6 x (512 x 512 + 512 x 10) / 1e6

    def test_two_stages_by_two_replicas(self):
        # Each replica takes half the batch in 4 microbatches: 8 microbatches of 32 in all.
        self.check(workers=4, stages=2, micro_batches=4, reference_micro_batches=8)

    def test_gradient_sums_on_the_training_thread_are_the_same_bits(self):
        # TANDEM_GRADIENT_SUMS=inline (for measurements): the same tree, summed as each microbatch arrives.
        reference, _ = self.parameters("single", pipeline_job(1, 1, 4))
        values, _ = self.parameters("p2-inline", pipeline_job(2, 2, 4, "1F1B"), env={"TANDEM_GRADIENT_SUMS": "inline"})
        self.assertEqual(values.tobytes(), reference.tobytes())
        wrong = tandem("run", self.write("bad.yaml", pipeline_job(2, 2, 4)), "--max-steps", "1", "--quiet",
                       env=dict(ONE_THREAD, TANDEM_GRADIENT_SUMS="later"))
        self.assertNotEqual(wrong.returncode, 0)
        self.assertIn('TANDEM_GRADIENT_SUMS: expected background or inline, got "later"', wrong.stderr)

    def test_one_microbatch_pipeline_equals_the_unsplit_step(self):
        reference, _ = self.parameters("single-m1", pipeline_job(1, 1, 1))
        values, _ = self.parameters("p2-m1", pipeline_job(2, 2, 1))
        self.assertEqual(values.tobytes(), reference.tobytes())


class PipelineValidation(TempDirTest):
    def rejected(self, text, expected):
        result = tandem("validate", self.write("job.yaml", text), timeout=60)
        self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
        self.assertIn(expected, result.stderr)

    def test_workers_not_divisible_by_stages(self):
        self.rejected(pipeline_job(3, 2, 4), "spec.parallelism.pipelineStages: 2 does not divide spec.workers (3)")

    def test_more_stages_than_layers(self):
        self.rejected(pipeline_job(4, 4, 4, hidden="[64, 32]"),
                      "spec.parallelism.pipelineStages: 4 stages but the mlp model has only 3 layers")

    def test_batch_not_divisible_by_data_parallel_times_microbatches(self):
        self.rejected(pipeline_job(4, 2, 6),
                      "spec.training.globalBatchSize: 256 is not divisible by data-parallel degree (2) x microBatches (6) = 12")


class ActivationMemory(TempDirTest):
    """Each stage reports its peak of microbatches in flight and the activation bytes it holds: GPipe all
    M, 1F1B at most P - stage. The bytes are the stage's buffers, not a count: a 1F1B stage's peak
    resident memory is lower than GPipe's by at least most of the difference."""

    def peaks(self, schedule, stages=4, micro_batches=8, hidden=HIDDEN, extra=""):
        text = pipeline_job(stages, stages, micro_batches, schedule, hidden=hidden, extra=extra)
        result = tandem("run", self.write("job.yaml", text), "--max-steps", "3", "--quiet", env=ONE_THREAD)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        found = {int(stage): (int(micro), int(size), int(resident)) for stage, micro, size, resident in re.findall(
            r"stage (\d+): forward .* peak activations (\d+) microbatches \((\d+) bytes\), "
            r"peak resident memory (\d+) bytes", result.stderr)}
        self.assertEqual(sorted(found), list(range(stages)), result.stderr[-3000:])
        return found

    def test_one_f_one_b_bounds_activations_by_stages(self):
        one_f_one_b, gpipe = self.peaks("1F1B"), self.peaks("GPipe")
        for stage in range(4):
            micro, size, _ = one_f_one_b[stage]
            self.assertEqual(micro, 4 - stage, f"stage {stage}")
            self.assertEqual(gpipe[stage][0], 8, f"stage {stage}")
            # The same bytes per microbatch held, times the microbatches in flight.
            self.assertGreater(size, 0)
            self.assertEqual(size * 8, gpipe[stage][1] * micro, f"stage {stage}")

    def test_one_f_one_b_holds_less_memory_than_gpipe(self):
        # Stage 0 of 784-1024x4-10 with M = 16 microbatches of 256: 4 MiB of activations each.
        peaks = {}
        for schedule in ("GPipe", "1F1B"):
            text = pipeline_job(2, 2, 16, schedule, hidden="[1024, 1024, 1024, 1024]").replace(
                "globalBatchSize: 256", "globalBatchSize: 4096")
            result = tandem("run", self.write(f"{schedule}.yaml", text), "--max-steps", "2", "--quiet", env=ONE_THREAD)
            self.assertEqual(result.returncode, 0, result.stderr[-3000:])
            found = re.search(r"stage 0: forward .* peak activations (\d+) microbatches \((\d+) bytes\), "
                              r"peak resident memory (\d+) bytes", result.stderr)
            self.assertIsNotNone(found, result.stderr[-3000:])
            peaks[schedule] = [int(value) for value in found.groups()]
        (gpipe_micro, gpipe_bytes, gpipe_resident), (micro, held, resident) = peaks["GPipe"], peaks["1F1B"]
        self.assertEqual((gpipe_micro, micro), (16, 2))
        self.assertEqual(gpipe_bytes, 16 * 4 << 20)
        self.assertEqual(held, 2 * 4 << 20)
        # Received buffers shrink too, so the saving in resident memory is at least the activations'.
        self.assertGreater(gpipe_resident - resident, 0.9 * (gpipe_bytes - held), peaks)


class StageTimeline(TempDirTest):
    """TANDEM_LOG_LEVEL=debug logs every step's timeline per stage: the schedule's ops in order, each
    with its wait on a neighbour and its compute, in ms from the step's start."""

    def test_debug_level_logs_each_stage_step_in_schedule_order(self):
        env = dict(ONE_THREAD, TANDEM_LOG_LEVEL="debug")
        result = tandem("run", self.write("job.yaml", pipeline_job(2, 2, 2, "GPipe")), "--max-steps", "3", "--quiet",
                        env=env)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        # Read by the bench's own reader, so a change of the format breaks this test, not the benchmark.
        lines = pipeline_timeline.parse_timelines(result.stderr)
        self.assertEqual(sorted((step, stage) for _, step, stage, _, _ in lines),
                         [(step, stage) for step in (1, 2, 3) for stage in (0, 1)], result.stderr[-3000:])
        for _, step, stage, ops, sends_done in lines:
            self.assertEqual([f"{kind}{micro}" for kind, micro, *_ in ops], ["F0", "F1", "B0", "B1"], ops)
            previous_end = 0.0
            for kind, micro, start, end, waited in ops:
                self.assertLessEqual(previous_end, start - waited + 0.2, ops)  # rounded to 0.1 ms
                self.assertLessEqual(start, end, ops)
                previous_end = end
            self.assertLessEqual(previous_end, sends_done, ops)
        # The last stage starts each step waiting for the first microbatch's activations.
        self.assertTrue(any(ops[0][4] > 0 for _, _, stage, ops, _ in lines if stage == 1))

    def test_info_level_logs_no_timeline_and_a_bad_level_is_named(self):
        result = tandem("run", self.write("job.yaml", pipeline_job(2, 2, 2)), "--max-steps", "1", "--quiet",
                        env=ONE_THREAD)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertNotIn("timeline", result.stderr)
        result = tandem("run", self.write("job.yaml", pipeline_job(2, 2, 2)), "--max-steps", "1", "--quiet",
                        env=dict(ONE_THREAD, TANDEM_LOG_LEVEL="loud"))
        self.assertNotEqual(result.returncode, 0)
        self.assertIn('TANDEM_LOG_LEVEL: expected debug, info, warning or error, got "loud"', result.stderr)


def schedule_order(schedule, stages, stage, micro_batches):
    """A stage's ops in the order the engine runs them (parallel::pipelineSchedule)."""
    forwards = [("F", m) for m in range(micro_batches)]
    backwards = [("B", m) for m in range(micro_batches)]
    if schedule == "GPipe":
        return forwards + backwards
    warmup = min(stages - stage - 1, micro_batches)
    order = forwards[:warmup]
    for m in range(micro_batches - warmup):
        order += [forwards[warmup + m], backwards[m]]
    return order + backwards[micro_batches - warmup:]


class BenchmarkManifest(unittest.TestCase):
    """bench/pipeline_bench.py asks for --steps steps; on fashion-mnist (60,000 samples an epoch) a large
    global batch must get enough epochs, or tandem run ends early and the figures cover fewer steps."""

    def test_every_run_holds_the_steps_asked_for(self):
        for micro_batch_size in (64, 256, 1024):
            for micro_batches in (1, 2, 4, 8, 16):
                global_batch = micro_batch_size * micro_batches
                for steps in (1, 12, 16, 32, 100):
                    epochs = pipeline_bench.epochs_for("fashion-mnist", global_batch, steps)
                    self.assertGreaterEqual(epochs * (60000 // global_batch), steps + 1, (global_batch, steps))
                    self.assertIn(f"epochs: {epochs},", pipeline_bench.job(2, micro_batches, "1F1B", "fashion-mnist",
                                                                         micro_batch_size, steps))


class BenchmarkRepeats(TempDirTest):
    """bench/pipeline_bench.py --repeats N runs every point N times, keeps each run's log, and reports the
    median with the runs' range; pipeline_timeline.py reads those logs back as one point."""

    def test_each_point_runs_n_times_and_reads_back_as_one(self):
        logs = os.path.join(self.tmp, "logs")
        bench = os.path.join(os.path.dirname(pipeline_bench.__file__), "pipeline_bench.py")
        result = subprocess.run([sys.executable, bench, "--build", os.path.dirname(os.path.dirname(TANDEM)),
                                 "--data", "synthetic", "--stages", "2", "--micro-batches", "4", "--steps", "3",
                                 "--micro-batch-size", "8", "--repeats", "2", "--logs", logs],
                                capture_output=True, text=True, timeout=300,
                                env=dict(os.environ, TANDEM_LOG_LEVEL="debug"))
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertEqual(sorted(os.listdir(logs)), [f"P2-M4-{schedule}-r{run}.log"
                                                    for schedule in ("1F1B", "GPipe") for run in (1, 2)])
        self.assertEqual(len(re.findall(r"^run [12]/2: P=2 M=4 (GPipe|1F1B): bubble", result.stderr, re.M)), 4)
        # The row: theory, then each schedule's median and range.
        self.assertRegex(result.stdout, r"\| 2 \| 4 \| 20\.0% \| [0-9.]+% \([0-9.]+%-[0-9.]+%\) \| "
                                        r"[0-9.]+% \([0-9.]+%-[0-9.]+%\) \|")
        self.assertRegex(result.stdout, r"Within 5 points of theory at M >= 4: [0-2] of 2 points\.")
        timeline = subprocess.run([sys.executable, os.path.join(os.path.dirname(bench), "pipeline_timeline.py"), logs],
                                  capture_output=True, text=True, timeout=60)
        self.assertEqual(timeline.returncode, 0, timeline.stderr)
        self.assertRegex(timeline.stdout, r"\| P2-M4-GPipe \| 2 \| 20\.0% \| [0-9.]+% \(")
        self.assertRegex(timeline.stdout, r"\| P2-M4-1F1B \| 2 \| 20\.0% \| [0-9.]+% \(")


class TimelineReplay(unittest.TestCase):
    """bench/pipeline_timeline.py's replay: the bubble a step's ops would leave with instant messages. For
    equal ops it is the theory's (P-1)/(M+P-1), for both schedules; a slow stage makes it larger."""

    def replayed(self, schedule, stages, micro_batches, duration):
        idle, total = pipeline_timeline.replay(
            [[(kind, m, duration(stage, kind)) for kind, m in schedule_order(schedule, stages, stage, micro_batches)]
             for stage in range(stages)])
        return idle / total

    def test_equal_ops_give_the_theory(self):
        for schedule in ("GPipe", "1F1B"):
            for stages in (2, 4):
                for micro_batches in (1, 2, 4, 8, 16):
                    bubble = self.replayed(schedule, stages, micro_batches, lambda stage, kind: 1.0 if kind == "F" else 2.0)
                    self.assertAlmostEqual(bubble, (stages - 1) / (micro_batches + stages - 1), places=9,
                                           msg=f"{schedule} P={stages} M={micro_batches}")

    def test_a_slow_stage_leaves_more_bubble(self):
        # P=2, M=4, GPipe, stage 1 twice as slow: the flush ends at 1 + 4*2 + 4*4 + 2 = 27 (stage 0's first
        # forward, stage 1's forwards and backwards, stage 0's last backward); the stages computed 12 and
        # 24. Bubble 1/3, where equal stages leave the theory's 1/5.
        bubble = self.replayed("GPipe", 2, 4, lambda stage, kind: (1.0 if kind == "F" else 2.0) * (stage + 1))
        self.assertAlmostEqual(bubble, (2 * 27 - 12 - 24) / (2 * 27), places=9)

    def test_orders_that_wait_on_each_other_are_refused(self):
        with self.assertRaises(ValueError):
            pipeline_timeline.replay([[("B", 0, 1.0), ("F", 0, 1.0)], [("F", 0, 1.0), ("B", 0, 1.0)]])


class ResumeWithAnotherNumberOfStages(TempDirTest):
    """Each stage's shards hold its own layers: a job whose spec.parallelism.pipelineStages changed since
    its checkpoints were written is refused, naming the field and the directory, instead of silently
    starting over (every layout looks only in its own directories); the same number of stages resumes."""

    def run_job(self, stages, steps):
        extra = (f"  checkpoint: {{dir: {self.tmp}/ckpt, everySteps: 5, keep: 2}}\n"
                 f"  runPolicy: {{restartPolicy: ExitCode}}\n")
        text = pipeline_job(stages, stages, 2, extra=extra)
        return tandem("run", self.write(f"p{stages}.yaml", text), "--max-steps", str(steps), "--quiet", env=ONE_THREAD)

    def check_refused(self, stages, where):
        result = self.run_job(stages, 20)
        self.assertNotEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn(f"but spec.parallelism.pipelineStages is {stages}: a job cannot resume with another number "
                      f"of stages", result.stderr)
        self.assertIn(os.path.join(self.tmp, "ckpt", "pipe", where), result.stderr)
        self.assertNotIn("resuming from", result.stderr)

    def test_more_stages_than_the_checkpoints_is_refused(self):
        self.assertEqual(self.run_job(2, 10).returncode, 0)
        self.check_refused(4, "stage-0/step-00000010")  # stage 0 of 2's shard
        self.check_refused(1, "stage-0/step-00000010")
        resumed = self.run_job(2, 15)
        self.assertEqual(resumed.returncode, 0, resumed.stderr[-3000:])
        self.assertIn("resumed from step 10", resumed.stderr)

    def test_fewer_stages_than_the_checkpoints_is_refused(self):
        self.assertEqual(self.run_job(4, 10).returncode, 0)
        self.check_refused(2, "stage-2/step-00000010")

    def test_stages_where_a_job_without_them_wrote_is_refused(self):
        self.assertEqual(self.run_job(1, 10).returncode, 0)
        self.check_refused(2, "step-00000010")


class PipelineFaultTolerance(TempDirTest):
    def run_to_end(self, name, text, interfere=None):
        config = self.write(f"{name}.yaml", text)
        params = os.path.join(self.tmp, f"{name}.bin")
        loss_log = os.path.join(self.tmp, f"{name}.loss")
        process = subprocess.Popen([TANDEM, "run", config, "--max-steps", "150", "--dump-params", params, "--loss-log",
                                    loss_log, "--quiet", "--collective-timeout", "5"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True)
        output = {}
        reader = threading.Thread(target=lambda: output.update(zip(("out", "err"), process.communicate())))
        reader.start()
        try:
            if interfere:
                interfere(process, loss_log)
            reader.join(300)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            reader.join()
        self.assertEqual(process.returncode, 0, output.get("err", "")[-4000:])
        with open(loss_log) as f:
            return read_floats(params), f.read(), output["out"], output["err"]

    def test_sigkill_of_a_middle_stage_resumes_exactly(self):
        extra = f"  checkpoint: {{dir: {self.tmp}/CKPT, everySteps: 20, keep: 2}}\n"
        reference = self.run_to_end("reference", pipeline_job(4, 4, 4, extra=extra.replace("CKPT", "ref")))
        kill_step = random.Random().randint(30, 120)
        print(f"SIGKILL of stage 2 at step {kill_step}")

        def interfere(process, loss_log):
            def reached():
                try:
                    with open(loss_log) as f:
                        lines = f.read().splitlines()
                    return bool(lines) and int(lines[-1].split()[0]) >= kill_step
                except (OSError, ValueError):
                    return False
            self.assertTrue(wait_for(reached, 120))
            for pid in children_of(process.pid):
                if rank_of(pid) == 2:
                    os.kill(pid, signal.SIGKILL)

        params, loss, out, err = self.run_to_end("killed", pipeline_job(4, 4, 4, extra=extra.replace("CKPT", "ckpt")),
                                                 interfere)
        self.assertIn("restarts 1", out, err[-6000:])
        self.assertRegex(err, r"generation 1 resumed from step [1-9]\d*")
        self.assertEqual(params.tobytes(), reference[0].tobytes())
        self.assertEqual(loss.splitlines(), reference[1].splitlines())
        for stage in range(4):
            self.assertTrue(os.listdir(os.path.join(self.tmp, "ckpt", "pipe", f"stage-{stage}")))

    def test_a_hybrid_job_resumes_exactly_after_a_preemption_and_after_a_kill(self):
        # P=2 x D=2. A SIGTERM to replica 1's stage 0: every rank votes to stop after the same step and each
        # stage's writer checkpoints it; a SIGKILL of replica 1's stage 1: the group restarts from the last
        # periodic checkpoint. Either way the restored state reaches replica 1 by broadcast, and the run
        # ends on the uninterrupted run's parameters and losses, bitwise.
        extra = f"  checkpoint: {{dir: {self.tmp}/CKPT, everySteps: 20, keep: 2}}\n"
        reference = self.run_to_end("reference", pipeline_job(4, 2, 2, extra=extra.replace("CKPT", "ref")))
        rng = random.Random()
        # More than everySteps/2 past a periodic checkpoint, so that the stop writes its own.
        cases = (("preempted", signal.SIGTERM, 2, 20 * rng.randint(1, 5) + 12), ("killed", signal.SIGKILL, 3,
                                                                               rng.randint(30, 120)))
        for name, signum, rank, at_step in cases:
            print(f"{signal.Signals(signum).name} of rank {rank} at step {at_step}")

            def interfere(process, loss_log, rank=rank, signum=signum, at_step=at_step):
                def reached():
                    try:
                        with open(loss_log) as f:
                            lines = f.read().splitlines()
                        return bool(lines) and int(lines[-1].split()[0]) >= at_step
                    except (OSError, ValueError):
                        return False
                self.assertTrue(wait_for(reached, 120))
                for pid in children_of(process.pid):
                    if rank_of(pid) == rank:
                        os.kill(pid, signum)

            params, loss, out, err = self.run_to_end(name, pipeline_job(4, 2, 2, extra=extra.replace("CKPT", name)),
                                                     interfere)
            self.assertEqual(params.tobytes(), reference[0].tobytes(), name)
            self.assertEqual(loss.splitlines(), reference[1].splitlines(), name)
            resumed = int(re.search(r"generation 1 resumed from step (\d+)", err).group(1))
            if signum == signal.SIGTERM:
                self.assertIn("restarts 1 (1 preemptions)", out, err[-6000:])
                stop = int(re.search(r"stopped by request after step (\d+)", err).group(1))
                for writer in (0, 1):  # replica 0's stages
                    self.assertRegex(err, rf"rank={writer} .*stop requested: writing a checkpoint of step {stop}")
                self.assertEqual(resumed, stop)
            else:
                self.assertIn("restarts 1 (0 preemptions)", out, err[-6000:])
                self.assertEqual(resumed % 20, 0)
                self.assertGreater(resumed, 0)

    def test_a_hybrid_job_resumed_with_one_replica_continues_its_trajectory(self):
        # P=2 x D=2 for 20 steps, then resumed as P=2 x D=1 (half the workers): each stage's writer reads its
        # own shard, and the same global batches continue the 4-worker run's trajectory up to the order of
        # the gradient sums (measured: 2e-6 relative after 20 more steps).
        def run_steps(name, workers, steps, checkpoints):
            extra = f"  checkpoint: {{dir: {self.tmp}/{checkpoints}, everySteps: 10, keep: 2}}\n"
            params = os.path.join(self.tmp, f"{name}.bin")
            result = tandem("run", self.write(f"{name}.yaml", pipeline_job(workers, 2, 2, extra=extra)), "--max-steps",
                            str(steps), "--dump-params", params, "--quiet", env=ONE_THREAD)
            self.assertEqual(result.returncode, 0, result.stderr[-4000:])
            return read_floats(params), result.stderr

        reference, _ = run_steps("reference", 4, 40, "ref")
        run_steps("first", 4, 20, "ckpt")
        resumed, err = run_steps("second", 2, 40, "ckpt")
        self.assertIn("resumed from step 20", err)
        for writer in (0, 1):
            self.assertRegex(err, rf"rank={writer} resuming step-00000020 with a changed training configuration "
                                  r"\(allowed: workers, learning rate, steps, \.\.\.\): workers 4 -> 2\n")
        relative, _ = relative_error(resumed, reference)
        self.assertLess(relative, 5e-5)

    def test_a_stage_whose_writes_keep_failing_still_shares_a_step_with_the_others(self):
        # Stage 1's disk is full from step 30 on: its writes fail while stage 0's succeed. Each stage prunes
        # its own directory (keep 2); stage 0 must spare step 20, the newest step both hold, or the next run
        # would begin again at step 0.
        extra = f"  checkpoint: {{dir: {self.tmp}/ckpt, everySteps: 10, keep: 2}}\n"
        config = self.write("full.yaml", pipeline_job(2, 2, 2, extra=extra))
        env = dict(ONE_THREAD, TANDEM_FAULT_CHECKPOINT_FAIL_STAGE="1", TANDEM_FAULT_CHECKPOINT_FAIL_FROM_STEP="30")
        first = tandem("run", config, "--max-steps", "70", "--quiet", env=env)
        self.assertEqual(first.returncode, 0, first.stderr[-3000:])
        self.assertRegex(first.stderr, r"rank=1 .*checkpoint step-00000030 not written: injected failure")
        held = [{name for name in os.listdir(os.path.join(self.tmp, "ckpt", "pipe", f"stage-{stage}"))
                 if name.startswith("step-")} for stage in (0, 1)]
        print("checkpoints held by stage 0 and stage 1:", sorted(held[0]), sorted(held[1]))
        self.assertEqual(held[1], {"step-00000010", "step-00000020"})
        self.assertEqual(held[0], {"step-00000020", "step-00000060", "step-00000070"})
        second = tandem("run", config, "--max-steps", "80", "--quiet", env=ONE_THREAD)
        self.assertEqual(second.returncode, 0, second.stderr[-3000:])
        self.assertRegex(second.stderr, r"resuming from \S+/stage-1/step-00000020")
        self.assertIn("the newest checkpoint every stage holds and can read is step-00000020", second.stderr)

    def test_a_shard_one_stage_cannot_read_sends_every_stage_to_an_older_step(self):
        extra = f"  checkpoint: {{dir: {self.tmp}/ckpt, everySteps: 20, keep: 3}}\n"
        config = self.write("fallback.yaml", pipeline_job(2, 2, 2, extra=extra))
        first = tandem("run", config, "--max-steps", "60", "--quiet")
        self.assertEqual(first.returncode, 0, first.stderr[-3000:])
        shard = os.path.join(self.tmp, "ckpt", "pipe", "stage-1", "step-00000060", "stage-1.bin")
        with open(shard, "r+b") as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 0x01]))
        # Stage 0's step 60 verifies, stage 1's does not: both resume from 40, the newest both can read.
        second = tandem("run", config, "--max-steps", "80", "--quiet")
        self.assertEqual(second.returncode, 0, second.stderr[-3000:])
        self.assertRegex(second.stderr, r"rank=1 skipping checkpoint step-00000060: .*SHA-256 does not match")
        self.assertIn("the newest checkpoint every stage holds and can read is step-00000040", second.stderr)
        self.assertIn("resumed from step 40", second.stderr)

    def test_stages_keep_the_same_checkpoints_while_one_stage_writes_slowly(self):
        # Stage 1's disk takes 400 ms per checkpoint, far longer than the 5 steps between checkpoints. A stage
        # skips a checkpoint while its last is in flight; the other must skip it too, or the two would hold
        # different steps and pruning (keep 1, which a pipeline raises to 2) could leave none in common.
        extra = f"  checkpoint: {{dir: {self.tmp}/ckpt, everySteps: 5, keep: 1}}\n"
        result = tandem("run", self.write("slow.yaml", pipeline_job(2, 2, 2, extra=extra)), "--max-steps", "60",
                        "--quiet", timeout=300,
                        env={"TANDEM_FAULT_CHECKPOINT_DELAY_MS": "400", "TANDEM_FAULT_CHECKPOINT_DELAY_STAGE": "1"})
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn("spec.checkpoint.keep 1: each pipeline stage keeps 2", result.stderr)
        self.assertRegex(result.stderr, r"rank=0 step=\d+ skipping the checkpoint of step \d+: another stage's previous "
                                        r"checkpoint is still being written")
        written = [set(re.findall(rf"rank={rank} step=\d+ checkpoint (step-\d+) written", result.stderr)) for rank in (0, 1)]
        self.assertEqual(written[0], written[1], "the stages wrote different steps")
        held = [sorted(name for name in os.listdir(os.path.join(self.tmp, "ckpt", "pipe", f"stage-{stage}"))
                       if name.startswith("step-")) for stage in (0, 1)]
        print("checkpoints held by stage 0 and stage 1:", held)
        self.assertEqual(held[0], held[1])
        # keep 2, and at most one more: the newest step known to be on every stage, spared while the
        # stages have not yet heard of a newer one (the last writes' reports come a step later).
        self.assertIn(len(held[0]), (2, 3))
        self.assertEqual(held[0][-1], "step-00000060")


if __name__ == "__main__":
    unittest.main()
