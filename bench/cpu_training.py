"""CPU benchmark of the foundation, all in one run on one machine (so both sides see the same noise):

1. the GEMM-only bound of the example's step (bench/gemm_bound, OpenBLAS, 1 and all threads);
2. the Gloo communicator's all-reduce bandwidth for 1 KiB - 64 MiB (bench/allreduce_bandwidth, 2 ranks);
3. training the example (MLP 784-256-128-10, AdamW 1e-3, batch 256, seed 1) to the end with
   `tandem run` and with PyTorch (bench/torch_mlp.py: a 1-process loop, and DDP over gloo with 2
   processes), 1 and 2 workers, with the same threads per worker on both sides; repeated and
   interleaved, the median reported, with the test accuracy each reached.

    python3 bench/cpu_training.py [--build build] [--epochs 10] [--repeats 2]
Prints markdown tables for BENCHMARKS.md and writes bench/results/cpu_training.json.
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "manifests", "examples", "fashion-mnist.yaml")
CORES = os.cpu_count() or 1


def json_lines(command, env=None):
    full_env = dict(os.environ)
    full_env.update(env or {})
    out = subprocess.run(command, capture_output=True, text=True, env=full_env, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def tandem_run(build, workers, threads, epochs):
    command = [os.path.join(build, "bin", "tandem"), "run", EXAMPLE, "--workers", str(workers), "--quiet"]
    if epochs != 10:
        command += ["--max-steps", str(epochs * 234)]
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads))
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"tandem run failed:\n{result.stderr[-3000:]}")
    match = re.search(r"test accuracy ([0-9.]+)%.*?([0-9]+) samples/s", result.stdout)
    return {"samplesPerSecond": float(match.group(2)), "testAccuracy": float(match.group(1)) / 100}


def torch_run(processes, threads, epochs):
    command = ["/usr/bin/python3", os.path.join(ROOT, "bench", "torch_mlp.py"), "--processes", str(processes),
               "--threads", str(threads), "--epochs", str(epochs)]
    return json_lines(command)[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", default=os.path.join(ROOT, "build"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    bench_bin = os.path.join(args.build, "bin")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())

    print(f"# CPU benchmark, {started}, {platform.processor() or platform.machine()}, {CORES} cores", flush=True)
    gemm = [json_lines([os.path.join(bench_bin, "gemm_bound"), "--threads", str(t), "--seconds", "3"])[0]
            for t in sorted({1, CORES})]
    allreduce = json_lines([os.path.join(bench_bin, "allreduce_bandwidth"), "--ranks", "2",
                            "--seconds-per-size", "0.5"])

    # (label, workers, threads per worker); tandem 1 worker also with 1 thread, for the GEMM bound.
    configurations = [(1, CORES), (2, max(1, CORES // 2))]
    runs = {}
    for repeat in range(args.repeats):
        for workers, threads in configurations:
            for side in ("tandem", "torch"):
                print(f"  repeat {repeat + 1}: {side} {workers} worker(s) x {threads} thread(s)", file=sys.stderr, flush=True)
                result = (tandem_run(args.build, workers, threads, args.epochs) if side == "tandem"
                          else torch_run(workers, threads, args.epochs))
                runs.setdefault((side, workers, threads), []).append(result)
        print(f"  repeat {repeat + 1}: tandem 1 worker x 1 thread", file=sys.stderr, flush=True)
        runs.setdefault(("tandem", 1, 1), []).append(tandem_run(args.build, 1, 1, args.epochs))

    def median(side, workers, threads, key):
        return statistics.median(r[key] for r in runs[(side, workers, threads)])

    print("\n## GEMM-only bound (OpenBLAS, the example's step GEMMs at batch 256)\n")
    print("| threads | GFLOP/s | samples/s |\n|---|---|---|")
    for g in gemm:
        print(f"| {g['threads']} | {g['gflops']:.1f} | {g['samplesPerSecond']:,.0f} |")

    print("\n## Training the example to the end: tandem vs PyTorch\n")
    print("| workers x threads | tandem samples/s | PyTorch samples/s | ratio | tandem accuracy | PyTorch accuracy |")
    print("|---|---|---|---|---|---|")
    for workers, threads in configurations:
        t = median("tandem", workers, threads, "samplesPerSecond")
        p = median("torch", workers, threads, "samplesPerSecond")
        ta = median("tandem", workers, threads, "testAccuracy")
        pa = median("torch", workers, threads, "testAccuracy")
        peer = "1-process loop" if workers == 1 else "DDP over gloo"
        print(f"| {workers} x {threads} ({peer}) | {t:,.0f} | {p:,.0f} | {t / p:.2f}x | {ta:.2%} | {pa:.2%} |")
    one_thread = median("tandem", 1, 1, "samplesPerSecond")
    bound = next(g for g in gemm if g["threads"] == 1)["samplesPerSecond"]
    print(f"\nOne worker, one thread: {one_thread:,.0f} samples/s = {one_thread / bound:.0%} of the one-thread GEMM bound "
          f"({bound:,.0f} samples/s).")

    print("\n## Gloo communicator all-reduce, 2 ranks on loopback\n")
    print("| bytes | µs per all-reduce | algorithm GB/s | bus GB/s |\n|---|---|---|---|")
    for a in allreduce:
        print(f"| {a['bytes']:,} | {a['microseconds']:,.0f} | {a['algorithmGBps']:.3f} | {a['busGBps']:.3f} |")

    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "cpu_training.json"), "w") as f:
        json.dump({"started": started, "cores": CORES, "gemm": gemm, "allreduce": allreduce,
                   "runs": {f"{k[0]}-{k[1]}x{k[2]}": v for k, v in runs.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
