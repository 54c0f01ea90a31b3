"""Operator benchmark against a real control plane (the kube tier's fixture: etcd, kube-apiserver 1.20.2 and
kube-controller-manager on loopback), with tandem-operator as a separate process and no pod runner (pods stay
Pending: what is measured is the operator and the API server, not training):

1. time from creating a DistributedTrainingJob to all of its worker pods existing, for 1, 16, 128 and 512
   workers (repeated, median and max);
2. 100 jobs of 8 workers created at once (from 8 client threads): time until all 800 pods exist;
3. the operator's resident memory (VmRSS) holding those 100 jobs and 800 pods in its caches, and the CPU
   seconds it used for the whole run.

    python3 bench/operator_bench.py [--build build] [--repeats 3]

Prints a Markdown table for BENCHMARKS.md and a JSON line. Targets (the operator issue): the 512-worker job
fully created in under 10 s; operator RSS under 50 MB with 100 jobs.
"""

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "kube"))


def job(name, workers):
    return {"apiVersion": "tandem.dev/v1alpha1", "kind": "DistributedTrainingJob", "metadata": {"name": name},
            "spec": {"workers": workers, "model": {"kind": "mlp", "mlp": {"hidden": [64]}},
                     "data": {"kind": "synthetic", "samples": 1 << 16},
                     "training": {"globalBatchSize": 8 * workers, "epochs": 1}}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", default=os.path.join(ROOT, "build"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ["TANDEM_BIN_DIR"] = os.path.join(os.path.abspath(args.build), "bin")
    import kube_fixture
    from operator_process import OperatorProcess

    plane = kube_fixture.ControlPlane(controller_manager=True).start()
    operator = None
    try:
        plane.kubectl("apply", "-f", os.path.join(ROOT, "manifests", "crd"), check=True)
        jobs_path = "/apis/tandem.dev/v1alpha1/namespaces/{ns}/distributedtrainingjobs"

        def wait(predicate, timeout, what):
            deadline = time.monotonic() + timeout
            while not predicate():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{what}: not within {timeout} s")
                time.sleep(0.02)

        def namespace(name):
            plane.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
            wait(lambda: plane.request("GET", f"/api/v1/namespaces/{name}/serviceaccounts/default")[0] == 200, 60,
                 f"default ServiceAccount in {name}")
            return name

        def pod_count(ns, selector=""):
            query = f"?labelSelector={selector}" if selector else ""
            status, body = plane.request("GET", f"/api/v1/namespaces/{ns}/pods{query}", timeout=60)
            return len(body["items"]) if status == 200 else -1

        wait(lambda: plane.request("GET", jobs_path.format(ns="default"), raw=True)[0] == 200, 30, "CRD established")
        operator = OperatorProcess(plane, "--workers=4", name="bench-operator").start()
        operator.wait_ready()
        cpu_start = operator.cpu_seconds()
        idle_rss = operator.rss_bytes()

        results = {"gang": {}, "concurrent": {}}
        for workers in (1, 16, 128, 512):
            times = []
            for repeat in range(args.repeats):
                ns = namespace(f"gang-{workers}-{repeat}")
                start = time.monotonic()
                status, body = plane.request("POST", jobs_path.format(ns=ns), job("j", workers))
                assert status == 201, body
                wait(lambda: pod_count(ns) >= workers, 120, f"{workers} pods")
                times.append(time.monotonic() - start)
                plane.request("DELETE", f"/api/v1/namespaces/{ns}")  # frees the API server for the next one
            results["gang"][workers] = {"median_s": statistics.median(times), "max_s": max(times)}
            print(f"{workers:4d} workers: median {statistics.median(times):.2f} s, max {max(times):.2f} s", flush=True)

        ns = namespace("concurrent")
        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda i: plane.request("POST", jobs_path.format(ns=ns), job(f"j{i:03d}", 8))[0],
                                     range(100)))
        assert all(s == 201 for s in statuses), statuses
        wait(lambda: pod_count(ns) >= 800, 300, "800 pods of 100 jobs")
        took = time.monotonic() - start
        time.sleep(3)  # let the last status writes and events settle before reading memory
        rss = operator.rss_bytes()
        time.sleep(30)  # steady state: the operator returns freed heap to the system every 30 s
        steady_rss = operator.rss_bytes()
        cpu = operator.cpu_seconds() - cpu_start
        results["concurrent"] = {"jobs": 100, "workers_each": 8, "all_pods_s": took}
        results["operator"] = {"rss_mb_idle": idle_rss / 2**20, "rss_mb_with_100_jobs": rss / 2**20,
                               "rss_mb_with_100_jobs_after_30s": steady_rss / 2**20, "cpu_seconds_whole_run": cpu}
        print(f"100 x 8-worker jobs: all 800 pods in {took:.2f} s; operator RSS {rss / 2**20:.1f} MB, "
              f"CPU {cpu:.1f} s over the run", flush=True)

        print("\n| job | time to all pods created (median / max of %d) |" % args.repeats)
        print("|---|---|")
        for workers, r in results["gang"].items():
            print(f"| 1 job, {workers} workers | {r['median_s']:.2f} s / {r['max_s']:.2f} s |")
        print(f"| 100 jobs x 8 workers, created at once | {took:.2f} s |")
        print(f"\noperator RSS: idle {idle_rss / 2**20:.1f} MB; with 100 jobs / 800 pods cached {rss / 2**20:.1f} MB "
              f"right after creating them, {steady_rss / 2**20:.1f} MB 30 s later; CPU over the run: {cpu:.1f} s")
        print(json.dumps(results))
    finally:
        if operator:
            operator.stop()
        plane.stop()


if __name__ == "__main__":
    main()
