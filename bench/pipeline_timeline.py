"""Reads pipeline runs' debug logs (`TANDEM_LOG_LEVEL=debug`, e.g. `pipeline_bench.py --logs DIR`) and
says how big each run's bubble was and what its ops looked like:

- bubble: from each stage's step timeline and the log's timestamps, a stage's step spans from its
  start to the end of the pipeline's flush (when the last stage has logged its step), and its bubble is
  the part of that span it did not compute: the theory's (P-1)/(M+P-1) for equal, steady ops. (The
  engine counts the same since 2026-11-27; this recomputes it for logs of earlier runs as well.)
- replayed: the bubble the very ops of each step (their order and measured durations) would leave if
  messages took no time and the stages began the step together. It is the theory's figure for the ops
  the machine really ran: bubble - replayed is what the engine itself added (messages, wake-ups, the
  start of a step), replayed - theory what unequal and unsteady ops cost.
- stage imbalance: the slowest stage's compute over the mean stage's;
- forward / backward imbalance: the slowest stage's median forward (backward) over the fastest's. Stages
  balanced in total can still differ in each: GPipe, which runs all forwards and then all backwards, pays
  for both, 1F1B mostly for the total;
- backward spread: over microbatch indices, the largest median backward over the smallest. Ops that
  take longer at some microbatches than at others make the neighbours wait even when stages are equal.

Logs of repeated runs (`pipeline_bench.py --repeats`, named P2-M8-GPipe-r1.log ...) get a second table:
each point's median over its runs.

    python3 bench/pipeline_timeline.py LOG|DIR [...]     (the first logged step is left out as warm-up)
"""

import datetime
import glob
import os
import re
import statistics
import sys

LINE = re.compile(r"(\d{4}-\d\d-\d\dT[\d:.]+Z) DEBUG .*? step=(\d+) stage (\d+) timeline[^:]*:(.*); sends done ([0-9.]+)")
REPETITION = re.compile(r"(.*)-r\d+\.log")
OP = re.compile(r"([FB])(\d+) ([0-9.]+)-([0-9.]+) \(waited ([0-9.]+)\)")


def milliseconds(stamp):
    return datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp() * 1000


def parse_timelines(text):
    """Every stage step timeline in a log's text, in order: (timestamp, step, stage, ops, sends done ms),
    where ops are (kind "F"/"B", microbatch, compute start ms, compute end ms, waited ms)."""
    return [(stamp, int(step), int(stage),
             [(kind, int(m), float(a), float(b), float(waited)) for kind, m, a, b, waited in OP.findall(ops)],
             float(done))
            for stamp, step, stage, ops, done in LINE.findall(text)]


def read_steps(path):
    """{step: {stage: (start ms, end ms, [(kind, microbatch, duration ms)])}} from one run's log."""
    steps = {}
    with open(path) as f:
        for stamp, step, stage, ops, done in parse_timelines(f.read()):
            end = milliseconds(stamp)  # logged as the stage's sends complete (1 ms resolution)
            durations = [(kind, m, b - a) for kind, m, a, b, _ in ops]
            steps.setdefault(step, {})[stage] = (end - done, end, durations)
    return steps


def replay(ops_by_stage):
    """(idle, total) stage-milliseconds of one step replayed: ops_by_stage[stage] is that stage's
    [(kind, microbatch, duration ms)] in the order it ran them. A forward waits for the previous stage's
    forward of its microbatch, a backward for the next stage's backward; nothing else waits."""
    stages = len(ops_by_stage)
    ends = {}  # (stage, kind, microbatch): when it ends
    clock = [0.0] * stages
    position = [0] * stages
    progressed = True
    while progressed:
        progressed = False
        for stage in range(stages):
            ops = ops_by_stage[stage]
            while position[stage] < len(ops):
                kind, micro_batch, duration = ops[position[stage]]
                neighbour = stage - 1 if kind == "F" else stage + 1
                start = clock[stage]
                if 0 <= neighbour < stages:
                    if (neighbour, kind, micro_batch) not in ends:
                        break
                    start = max(start, ends[(neighbour, kind, micro_batch)])
                clock[stage] = ends[(stage, kind, micro_batch)] = start + duration
                position[stage] += 1
                progressed = True
    if any(position[stage] < len(ops_by_stage[stage]) for stage in range(stages)):
        raise ValueError("the stages' logged op orders wait on each other forever")
    flush = max(clock)
    busy = sum(duration for ops in ops_by_stage for _, _, duration in ops)
    return stages * flush - busy, stages * flush


def analyse(path, warmup_steps=1):
    steps = {step: by for step, by in read_steps(path).items() if step > warmup_steps}
    if not steps:
        return None
    stages = max(len(by) for by in steps.values())
    idle = total = replayed_idle = replayed_total = 0.0
    compute = [0.0] * stages
    backward = {}
    by_stage = {}  # (stage, kind): durations
    counted = 0
    for by in steps.values():
        if len(by) != stages:
            continue
        try:
            step_idle, step_total = replay([by[stage][2] for stage in range(stages)])
        except ValueError:  # a truncated or garbled line: leave the step out rather than the run
            continue
        counted += 1
        replayed_idle += step_idle
        replayed_total += step_total
        flush = max(end for _, end, _ in by.values())
        for stage, (start, _, durations) in by.items():
            busy = sum(d for _, _, d in durations)
            idle += flush - start - busy
            total += flush - start
            compute[stage] += busy
            for kind, m, d in durations:
                by_stage.setdefault((stage, kind), []).append(d)
                if kind == "B":
                    backward.setdefault(m, []).append(d)
    medians = [statistics.median(v) for v in backward.values()]
    micro_batches = len(backward)

    def across_stages(kind):  # the slowest stage's median op over the fastest's
        per_stage = [statistics.median(by_stage[(stage, kind)]) for stage in range(stages)]
        return max(per_stage) / min(per_stage)
    return {"stages": stages, "micro_batches": micro_batches, "steps": counted,
            "forward_imbalance": across_stages("F"), "backward_imbalance": across_stages("B"),
            "theory": (stages - 1) / (micro_batches + stages - 1), "bubble": idle / total,
            "replayed": replayed_idle / replayed_total,
            "imbalance": max(compute) / statistics.mean(compute), "spread": max(medians) / min(medians)}


def run_order(path):
    """P2-M4-GPipe.log before P2-M16-GPipe.log: numbers compared as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", os.path.basename(path))]


def main():
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        sys.exit(__doc__)
    paths = []
    for argument in sys.argv[1:]:
        if not os.path.exists(argument):
            sys.exit(f"pipeline_timeline: {argument}: no such log or directory")
        paths += glob.glob(os.path.join(argument, "*.log")) if os.path.isdir(argument) else [argument]
    if not paths:
        sys.exit(f"pipeline_timeline: no *.log in {' '.join(sys.argv[1:])}")
    print("| run | P | M | steps | theory | bubble | over theory | replayed | engine's part | stage imbalance | "
          "forward / backward imbalance | backward spread |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    repeated = {}  # point (the name without -rN) -> results of its runs
    for path in sorted(paths, key=run_order):
        result = analyse(path)
        if result is None:
            print(f"| {os.path.basename(path)} | no timelines: run with TANDEM_LOG_LEVEL=debug | | | | | | | | | | |")
            continue
        repetition = REPETITION.fullmatch(os.path.basename(path))
        if repetition:
            repeated.setdefault(repetition.group(1), []).append(result)
        excess = 100 * (result["bubble"] - result["theory"])
        print(f"| {os.path.basename(path)} | {result['stages']} | {result['micro_batches']} | {result['steps']} | "
              f"{result['theory']:.1%} | {result['bubble']:.1%} | {excess:+.1f} | {result['replayed']:.1%} | "
              f"{100 * (result['bubble'] - result['replayed']):+.1f} | {result['imbalance']:.2f} | "
              f"{result['forward_imbalance']:.2f} / {result['backward_imbalance']:.2f} | {result['spread']:.2f} |")
    if repeated:
        print("\n| point | runs | theory | bubble, median (range) | over theory | engine's part, median |\n"
              "|---|---|---|---|---|---|")
        for point, results in sorted(repeated.items(), key=lambda item: run_order(item[0])):
            bubbles = [r["bubble"] for r in results]
            median = statistics.median(bubbles)
            engine = statistics.median(r["bubble"] - r["replayed"] for r in results)
            print(f"| {point} | {len(results)} | {results[0]['theory']:.1%} | {median:.1%} ({min(bubbles):.1%}-"
                  f"{max(bubbles):.1%}) | {100 * (median - results[0]['theory']):+.1f} | {100 * engine:+.1f} |")


if __name__ == "__main__":
    main()
