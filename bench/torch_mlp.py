"""The PyTorch peer of the CPU benchmark: the example's training (MLP 784-256-128-10, AdamW lr 1e-3 without
weight decay, global batch 256, seeded shuffle per epoch, last partial batch dropped, Fashion-MNIST
normalised with mean 0.2860 and std 0.3530) as a plain 1-process loop or DistributedDataParallel over
gloo with N processes, each taking its slice of every global batch.

    python3 bench/torch_mlp.py --processes 1 --threads 2 --epochs 10
Prints one JSON line from rank 0: samples/s of the training loop (evaluation excluded) and test accuracy.
Uses Debian's python3-torch; data is read from the same IDX files tandem reads, held in memory.
"""

import argparse
import gzip
import json
import os
import socket
import struct
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MEAN, STD = 0.2860, 0.3530


def read_idx(path):
    with gzip.open(path, "rb") as f:
        content = f.read()
    dims = content[3]
    shape = struct.unpack(">" + "I" * dims, content[4:4 + 4 * dims])
    return np.frombuffer(content, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(directory, prefix):
    images = read_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz")).reshape(-1, 784)
    labels = read_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"))
    x = (torch.from_numpy(images.astype(np.float32)) / 255.0 - MEAN) / STD
    return x, torch.from_numpy(labels.astype(np.int64))


def train(rank, args, port):
    torch.set_num_threads(args.threads)
    if args.processes > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=args.processes)
    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128),
                                torch.nn.ReLU(), torch.nn.Linear(128, 10))
    if args.processes > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    loss_fn = torch.nn.CrossEntropyLoss()
    x_train, y_train = load(args.data, "train")
    x_test, y_test = load(args.data, "t10k")
    local = args.batch // args.processes
    steps_per_epoch = len(x_train) // args.batch
    total = steps_per_epoch * args.epochs if args.max_steps == 0 else min(args.max_steps, steps_per_epoch * args.epochs)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    step = 0
    while step < total:
        order = torch.randperm(len(x_train), generator=generator)
        for s in range(steps_per_epoch):
            if step == total:
                break
            indices = order[s * args.batch + rank * local: s * args.batch + (rank + 1) * local]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x_train[indices]), y_train[indices])
            loss.backward()
            optimizer.step()
            step += 1
    seconds = time.perf_counter() - start
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    if rank == 0:
        print(json.dumps({"processes": args.processes, "threads": args.threads, "steps": total,
                          "trainSeconds": round(seconds, 3), "samplesPerSecond": round(total * args.batch / seconds),
                          "testAccuracy": accuracy, "torch": torch.__version__}), flush=True)
    if args.processes > 1:
        dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=0)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if args.processes == 1:
        train(0, args, port)
    else:
        mp.spawn(train, args=(args, port), nprocs=args.processes)


if __name__ == "__main__":
    main()
