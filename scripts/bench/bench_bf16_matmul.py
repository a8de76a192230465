"""PyTorch's side of scripts/bench/bench_bf16_matmul.sh: f32 and bf16 matmul throughput at the
shapes of crates/whet/examples/bf16_matmul_bench.rs, one JSON line per shape and type."""
import json, sys, time

import torch

SHAPES = [(1, 2048, 384, 384), (1, 2048, 384, 1536), (1, 2048, 1536, 384), (1, 1024, 576, 1536),
          (1, 1024, 1536, 576), (1, 1024, 576, 8192), (48, 256, 64, 256)]
threads, reps = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
for batch, m, k, n in SHAPES:
    a = torch.randn(batch, m, k)
    b = torch.randn(batch, k, n)
    for dtype in ["f32", "bf16"]:
        # As autocast does: the operands cast to bf16 each time, the product in bf16.
        def run():
            if dtype == "f32":
                return torch.matmul(a, b)
            return torch.matmul(a.bfloat16(), b.bfloat16()).float()
        with torch.inference_mode():
            run()
            t = time.perf_counter()
            for _ in range(reps):
                run()
            dt = (time.perf_counter() - t) / reps
        print(json.dumps({"shape": f"{m}x{k}x{n}", "batch": batch, "dtype": dtype,
                          "gflops": round(2 * batch * m * k * n / dt / 1e9, 1)}))
