"""Pipeline benchmark: measured bubble ratio per schedule, stages and microbatches next to the
theoretical (P-1)/(M+P-1), and peak activation memory per stage for GPipe and 1F1B.

Model: mlp 784-3072-521-3072-521-10. A step costs each linear layer 3 x its multiply-adds (forward,
weight gradient, input gradient), except the first, which needs no input gradient: so a first layer of
784 x 3072 and three of ~1.6M multiply-adds cost the same, and P=2 and P=4 stages are balanced as the
theory assumes; fashion-mnist, D=1. The microbatch
size is fixed (64 samples), so the global batch is 64 x M: per-microbatch work stays the same, as the
theory assumes, and activation memory shows what a schedule keeps alive.
Bubble ratio of a stage = time blocked on its neighbours / (that + its forward and backward compute);
the table gives the mean over stages.

    python3 bench/pipeline_bench.py [--build build] [--steps 30]
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def job(stages, micro_batches, schedule):
    return f"""apiVersion: tandem.dev/v1alpha1
kind: DistributedTrainingJob
metadata: {{name: bubble}}
spec:
  workers: {stages}
  parallelism: {{pipelineStages: {stages}, microBatches: {micro_batches}, schedule: {schedule}}}
  model: {{kind: mlp, mlp: {{hidden: [3072, 521, 3072, 521], activation: relu}}}}
  data: {{kind: fashion-mnist, path: /usr/share/datasets/fashion-mnist}}
  optimizer: {{kind: adamw, lr: 1.0e-4}}
  training: {{globalBatchSize: {64 * micro_batches}, epochs: 1, seed: 1}}
"""


def measure(tandem, workdir, stages, micro_batches, schedule, steps):
    path = os.path.join(workdir, "job.yaml")
    with open(path, "w") as f:
        f.write(job(stages, micro_batches, schedule))
    result = subprocess.run([tandem, "run", path, "--max-steps", str(steps), "--quiet"], capture_output=True, text=True,
                            env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    if result.returncode != 0:
        sys.exit(result.stderr[-3000:])
    stats = re.findall(r"stage (\d+): forward ([0-9.e-]+) s, backward ([0-9.e-]+) s, idle ([0-9.e-]+) s, bubble ratio "
                       r"([0-9.e-]+), peak activations (\d+) microbatches \((\d+) bytes\)", result.stderr)
    samples = float(re.search(r"([0-9.]+) samples/s", result.stdout).group(1))
    return {int(s[0]): {"bubble": float(s[4]), "peak": int(s[5]), "bytes": int(s[6])} for s in stats}, samples


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", default=os.path.join(ROOT, "build"))
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    tandem = os.path.join(args.build, "bin", "tandem")
    workdir = tempfile.mkdtemp(prefix="tandem-pipeline-bench-")
    print(f"# Pipeline benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
          f"{args.steps} steps per point, 1 GEMM thread per stage")
    print("\n## Bubble ratio (mean over stages) against theory (P-1)/(M+P-1)\n")
    print("| P | M | theory | GPipe | 1F1B | GPipe samples/s | 1F1B samples/s |\n|---|---|---|---|---|---|---|")
    memory = {}
    for stages in (2, 4):
        for micro in (1, 2, 4, 8, 16):
            row = {}
            for schedule in ("GPipe", "1F1B"):
                stats, samples = measure(tandem, workdir, stages, micro, schedule, args.steps)
                row[schedule] = (statistics.mean(s["bubble"] for s in stats.values()), samples)
                memory[(stages, micro, schedule)] = stats
            theory = (stages - 1) / (micro + stages - 1)
            print(f"| {stages} | {micro} | {theory:.1%} | {row['GPipe'][0]:.1%} | {row['1F1B'][0]:.1%} | "
                  f"{row['GPipe'][1]:,.0f} | {row['1F1B'][1]:,.0f} |", flush=True)
    print("\n## Peak activation memory per stage (P=4): microbatches in flight and bytes\n")
    print("| M | schedule | stage 0 | stage 1 | stage 2 | stage 3 |\n|---|---|---|---|---|---|")
    for micro in (1, 2, 4, 8, 16):
        for schedule in ("GPipe", "1F1B"):
            stats = memory[(4, micro, schedule)]
            cells = " | ".join(f"{stats[s]['peak']} ({stats[s]['bytes'] / 1024:,.0f} KiB)" for s in range(4))
            print(f"| {micro} | {schedule} | {cells} |")


if __name__ == "__main__":
    main()
