"""PyTorch's side of bench/gpu_mlp_step.cc on the same GPU: the same MLP (Linear+ReLU, 10 classes), batch,
AdamW (lr 1e-3) and cross-entropy, timed eagerly, as one captured CUDA graph of the whole step (forward,
backward, optimizer with capturable=True), and with torch.compile (unless --no-compile). bf16 uses
autocast with fp32 master weights, as Tandem does.

    python3 bench/torch_gpu_step.py --hidden 256,128 --batch 256 --precision fp32
Prints one JSON line like gpu_mlp_step's.
"""

import argparse
import json
import time

import torch


def build(widths, device):
    layers = []
    for i in range(len(widths) - 1):
        layers.append(torch.nn.Linear(widths[i], widths[i + 1]))
        if i + 2 < len(widths):
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers).to(device)


def timed(fn, steps):
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000.0 / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", default="256,128")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # Tandem's fp32 GEMMs are true fp32
    device = torch.device("cuda")
    widths = [784] + [int(w) for w in args.hidden.split(",")] + [10]
    x = torch.randn(args.batch, 784, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    dtype = torch.bfloat16 if args.precision == "bf16" else None

    def make(capturable):
        model = build(widths, device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, capturable=capturable)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype is not None):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
            return loss
        return model, optimizer, step

    result = {"impl": "pytorch " + torch.__version__, "model": "-".join(map(str, widths)), "batch": args.batch,
              "precision": args.precision, "gpu": torch.cuda.get_device_name()}
    _, _, eager = make(capturable=False)
    for _ in range(5):
        eager()
    result["eager_ms"] = round(timed(eager, args.steps), 4)

    _, _, graphed = make(capturable=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(5):
            graphed()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed()
    result["graph_ms"] = round(timed(graph.replay, args.steps), 4)

    if not args.no_compile:
        _, _, plain = make(capturable=False)
        compiled = torch.compile(plain)
        started = time.perf_counter()
        for _ in range(5):
            compiled()
        result["compile_seconds"] = round(time.perf_counter() - started, 1)
        result["compile_ms"] = round(timed(compiled, args.steps), 4)

    flops = sum(2.0 * args.batch * widths[i] * widths[i + 1] * (2 if i == 0 else 3) for i in range(len(widths) - 1))
    best = min(v for k, v in result.items() if k in ("eager_ms", "graph_ms", "compile_ms"))
    result["samples_per_s"] = round(args.batch / (best / 1000.0))
    result["tflops"] = round(flops / (best / 1000.0) / 1e12, 1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
