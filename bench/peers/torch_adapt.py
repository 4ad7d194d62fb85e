"""PyTorch peer of the head adaptation step.

The same step selfclass takes on the device: weight-normalised linear heads (w_c = g_c v_c /
|v_c|) score two views of a replay batch of L2-normalised embeddings; the uniform-prior
cross-entropy of each ordered pair of views (target: column softmax at the column
temperature, rows renormalised; prediction: row softmax at the row temperature, columns
renormalised and scaled by N/C) is averaged over the two pairs and over heads; backward;
one Adam update of every head's v and g.

Reads one JSON request per line on standard input and answers one JSON line each:
  {"cmd": "time", "dim": D, "classes": [C...], "batch": N, "threads": T, "warmup": W, "iters": K}
      -> {"ok": true, "median_s": ..., "loss": ...}
  {"cmd": "versions"} -> {"ok": true, "torch": ...}
"""
import math
import statistics
import time

import torch

from serve import serve

ROW_T, COL_T, LR = 0.1, 0.05, 0.01


def uniform_prior_pair(target_logits, pred_logits):
    n, c = pred_logits.shape
    target = torch.softmax(torch.log_softmax(target_logits / COL_T, dim=0), dim=1)
    log_pred = torch.log_softmax(torch.log_softmax(pred_logits / ROW_T, dim=1), dim=0) + math.log(n / c)
    return -(target * log_pred).sum() / n


def step(heads, opt, z1, z2):
    loss = 0.0
    for v, g in heads:
        w = g[:, None] * v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        l1, l2 = z1 @ w.t(), z2 @ w.t()
        loss = loss + 0.5 * (uniform_prior_pair(l1, l2) + uniform_prior_pair(l2, l1))
    loss = loss / len(heads)
    opt.zero_grad(set_to_none=False)
    loss.backward()
    opt.step()
    return loss


def time_steps(req):
    torch.set_num_threads(int(req["threads"]))
    gen = torch.Generator().manual_seed(0)
    dim, batch = int(req["dim"]), int(req["batch"])
    heads = []
    for c in req["classes"]:
        v = torch.randn(int(c), dim, generator=gen).requires_grad_()
        g = torch.ones(int(c)).requires_grad_()
        heads.append((v, g))
    opt = torch.optim.Adam([p for h in heads for p in h], lr=LR)
    z1 = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1)
    z2 = torch.nn.functional.normalize(z1 + 0.1 * torch.randn(batch, dim, generator=gen), dim=1)
    for _ in range(int(req["warmup"])):
        step(heads, opt, z1, z2)
    times = []
    loss = None
    for _ in range(int(req["iters"])):
        t = time.perf_counter()
        loss = step(heads, opt, z1, z2)
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "loss": float(loss.detach())}


def main():
    serve({
        "time": time_steps,
        "versions": lambda _req: {
            "torch": torch.__version__,
            "threads_default": torch.get_num_threads(),
        },
    })


if __name__ == "__main__":
    main()
