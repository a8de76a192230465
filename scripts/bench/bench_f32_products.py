"""PyTorch's side of scripts/bench/bench_f32_products.sh: the products whet timed (read from
its JSON lines, so both sides time the same list), each as PyTorch computes it in a training
step: `a @ b` with transposed views where whet has them, and the LM head's loss as
transformers computes it (logits, cross-entropy, backward). One JSON line per product."""
import json, sys, time

import torch

threads, reps, whet_lines = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(threads)


def timed(f, reps):
    f()
    t = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t) / reps


for line in open(whet_lines):
    p = json.loads(line)
    m, k, n = p["m"], p["k"], p["n"]
    if p["name"] == "lm head loss":
        h = torch.randn(m, k, requires_grad=True)
        w = (torch.randn(n, k) * 0.05).requires_grad_()
        targets = torch.tensor([(i * 7919) % n for i in range(m)])

        def run():
            loss = torch.nn.functional.cross_entropy(h @ w.t(), targets, reduction="sum")
            loss.backward()
            h.grad = w.grad = None

        dt = timed(run, max(1, (reps + 3) // 4))
    else:
        a = torch.randn(k, m).t() if p["a_t"] else torch.randn(m, k)
        b = torch.randn(n, k).t() if p["b_t"] else torch.randn(k, n)
        with torch.inference_mode():
            dt = timed(lambda: a @ b, reps)
    print(json.dumps({**p, "gflops": round(p["flops"] / dt / 1e9, 1)}))
