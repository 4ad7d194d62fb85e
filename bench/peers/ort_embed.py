"""onnxruntime peer of the embedding comparison.

Reads one JSON request per line on standard input and answers one JSON line each:
  {"cmd": "load", "model": PATH, "threads": [1, 2]}       one session per thread count
  {"cmd": "time", "threads": T, "batch": B, "warmup": W, "iters": K}
      -> {"ok": true, "median_s": ...}   median seconds per run over K timed runs
  {"cmd": "versions"} -> {"ok": true, "onnxruntime": ..., "numpy": ...}
Errors are answered as {"ok": false, "error": TEXT}.
"""
import statistics
import time

import numpy as np
import onnxruntime as ort

from serve import serve

sessions = {}
shape = None


def load(req):
    global shape
    for t in req["threads"]:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(t)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sessions[int(t)] = ort.InferenceSession(req["model"], opts, providers=["CPUExecutionProvider"])
    first = next(iter(sessions.values())).get_inputs()[0]
    shape = [d if isinstance(d, int) else None for d in first.shape]
    return {"input": first.name, "shape": [d if d is not None else -1 for d in shape]}


def time_runs(req):
    sess = sessions[int(req["threads"])]
    name = sess.get_inputs()[0].name
    batch = int(req["batch"])
    x = np.random.default_rng(0).random((batch, *shape[1:]), dtype=np.float32)
    for _ in range(int(req["warmup"])):
        sess.run(None, {name: x})
    times = []
    for _ in range(int(req["iters"])):
        t = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times)}


def main():
    serve({
        "load": load,
        "time": time_runs,
        "versions": lambda _req: {"onnxruntime": ort.__version__, "numpy": np.__version__},
    })


if __name__ == "__main__":
    main()
