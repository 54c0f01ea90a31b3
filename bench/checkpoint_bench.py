"""Checkpoint and recovery benchmark, all in one run on one machine:

1. the disk's sequential write bandwidth (dd, 256 MiB, fdatasync) next to durable checkpoint writes of
   the same size through CheckpointStore (bench/checkpoint_throughput);
2. the step-time overhead of asynchronous checkpointing: `tandem run` of the example (1 worker, 2000
   steps) and of a wider MLP (784-2048-2048-10, 5.8M parameters, 70 MB per checkpoint, 150 steps)
   without checkpoints and with a checkpoint every N steps, interleaved and repeated, median samples/s;
3. recovery time: SIGKILL of a worker of a 2-worker run to the first step completed after the restart
   (the loss log's next line), repeated.

    python3 bench/checkpoint_bench.py [--build build] [--dir /var/tmp/tandem-bench] [--repeats 3]
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def job_yaml(name, hidden, ckpt_dir, every, workers=1):
    checkpoint = f"  checkpoint: {{dir: {ckpt_dir}, everySteps: {every}, keep: 2}}\n" if every else ""
    return f"""apiVersion: tandem.dev/v1alpha1
kind: DistributedTrainingJob
metadata: {{name: {name}}}
spec:
  workers: {workers}
  model: {{kind: mlp, mlp: {{hidden: [{", ".join(map(str, hidden))}], activation: relu}}}}
  data: {{kind: fashion-mnist, path: /usr/share/datasets/fashion-mnist}}
  optimizer: {{kind: adamw, lr: 1.0e-3}}
  training: {{globalBatchSize: 256, epochs: 10, seed: 1}}
{checkpoint}  runPolicy: {{restartPolicy: OnFailure, backoffLimit: 5}}
"""


def samples_per_second(tandem, config, steps):
    result = subprocess.run([tandem, "run", config, "--max-steps", str(steps), "--quiet"], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(result.stderr[-3000:])
    return float(re.search(r"([0-9.]+) samples/s", result.stdout).group(1))


def recovery_seconds(tandem, workdir, every):
    """SIGKILL of rank 1 once training runs; seconds until tandem reports the resumed generation's
    first finished step (read live from its stderr, timed here from the kill)."""
    ckpt = os.path.join(workdir, "recovery-ckpt")
    shutil.rmtree(ckpt, ignore_errors=True)
    config = os.path.join(workdir, "recovery.yaml")
    with open(config, "w") as f:
        f.write(job_yaml("recovery", [256, 128], ckpt, every, workers=2))
    loss_log = os.path.join(workdir, "recovery.loss")
    process = subprocess.Popen([tandem, "run", config, "--max-steps", "2000", "--quiet", "--loss-log", loss_log],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        while not os.path.exists(loss_log) or os.path.getsize(loss_log) < 300 * 8:
            time.sleep(0.01)
        children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
        os.kill(int(children[-1]), signal.SIGKILL)
        killed = time.monotonic()
        for line in process.stderr:
            if line.startswith("tandem: recovered:"):
                return time.monotonic() - killed
        sys.exit("the run never recovered")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", default=os.path.join(ROOT, "build"))
    parser.add_argument("--dir", default="/var/tmp/tandem-bench")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tandem = os.path.join(args.build, "bin", "tandem")
    os.makedirs(args.dir, exist_ok=True)
    workdir = tempfile.mkdtemp(dir=args.dir)
    try:
        print(f"# Checkpoint benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, directory {args.dir}")
        # Overhead first, on a quiet page cache; the bandwidth runs leave gigabytes of dirty pages.
        os.sync()
        time.sleep(2)
        print("\n## Step-time overhead of asynchronous checkpoints (1 worker, median of %d)\n" % args.repeats)
        print("| model | checkpoint size | every N steps | samples/s | overhead |\n|---|---|---|---|---|")
        for name, hidden, steps, everies in (("example", [256, 128], 2000, (0, 100, 500)),
                                              ("wide", [2048, 2048], 150, (0, 50, 200))):
            speeds = {}
            for _ in range(args.repeats):
                for every in everies:
                    ckpt = os.path.join(workdir, f"{name}-{every}")
                    shutil.rmtree(ckpt, ignore_errors=True)
                    config = os.path.join(workdir, f"{name}-{every}.yaml")
                    with open(config, "w") as f:
                        f.write(job_yaml(name, hidden, ckpt, every))
                    speeds.setdefault(every, []).append(samples_per_second(tandem, config, steps))
            parameters = 784 * hidden[0] + hidden[0] + sum(a * b + b for a, b in zip(hidden, hidden[1:] + [10]))
            size_mb = parameters * 12 / 1e6
            base = statistics.median(speeds[0])
            for every in everies:
                median = statistics.median(speeds[every])
                label = "none" if every == 0 else str(every)
                overhead = "—" if every == 0 else f"{(base / median - 1) * 100:+.1f}%"
                print(f"| mlp {'-'.join(map(str, [784] + hidden + [10]))} | {size_mb:.1f} MB | {label} | {median:,.0f} | {overhead} |")

        dd_speeds, ckpt_speeds = [], []
        for _ in range(args.repeats):
            dd = subprocess.run(["dd", "if=/dev/zero", f"of={workdir}/dd.bin", "bs=1M", "count=256", "conv=fdatasync"],
                                capture_output=True, text=True)
            seconds = float(re.search(r"([0-9.]+) s,", dd.stderr).group(1))
            dd_speeds.append(256 * 1024 * 1024 / seconds / 1e6)
            os.remove(f"{workdir}/dd.bin")
            out = subprocess.run([os.path.join(args.build, "bin", "checkpoint_throughput"), "--dir",
                                  os.path.join(workdir, "throughput"), "--megabytes", "256", "--repeats", "1"],
                                 capture_output=True, text=True, check=True).stdout
            ckpt_speeds.append(json.loads(out.splitlines()[0])["megabytesPerSecond"])
        print("\n## Write bandwidth, 256 MiB, durable (median of %d)\n" % args.repeats)
        print("| writer | MB/s |\n|---|---|")
        print(f"| dd bs=1M conv=fdatasync | {statistics.median(dd_speeds):,.0f} |")
        print(f"| CheckpointStore::write (SHA-256, fsync, rename, latest) | {statistics.median(ckpt_speeds):,.0f} |")

        print("\n## Recovery: SIGKILL of a worker to the first step completed after resume (2 workers)\n")
        recoveries = [recovery_seconds(tandem, workdir, 50) for _ in range(args.repeats)]
        print("| runs | median s | max s |\n|---|---|---|")
        print(f"| {len(recoveries)} | {statistics.median(recoveries):.2f} | {max(recoveries):.2f} |")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
