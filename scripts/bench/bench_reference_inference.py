"""Inference throughput of the reference stack (transformers on PyTorch, CPU), the counterpart
of crates/whet/examples/bench_inference.rs. Run by scripts/bench/bench_inference.sh."""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, BertModel


def ids(b, t, vocab):
    x = 12345
    out = []
    for _ in range(b * t):
        x = (x * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        out.append(1000 + (x >> 33) % (vocab - 1000))
    return torch.tensor(out, dtype=torch.long).reshape(b, t)


def timed(reps, f):
    f()
    start = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - start) / reps


def main():
    minilm, smollm, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    with torch.inference_mode():
        bert = BertModel.from_pretrained(minilm).eval()
        b, t = 8, 128
        x = ids(b, t, bert.config.vocab_size)
        mask = torch.ones_like(x)
        secs = timed(5, lambda: bert(input_ids=x, attention_mask=mask).last_hidden_state)
        minilm_tps = b * t / secs

        import os
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(smollm), gguf_file=os.path.basename(smollm), torch_dtype=torch.float32
        ).eval()
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(os.path.dirname(smollm), gguf_file=os.path.basename(smollm))
        t = 128
        x = ids(1, t, model.config.vocab_size)
        secs = timed(3, lambda: model(input_ids=x).logits)
        fwd_tps = t / secs

        prompt = tok("The history of the Roman Empire begins with", return_tensors="pt")
        n = 64
        secs = timed(2, lambda: model.generate(**prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False))
        gen_tps = n / secs
    print(json.dumps({
        "impl": "transformers " + __import__("transformers").__version__ + " / torch " + torch.__version__,
        "minilm_forward_tokens_per_s": minilm_tps,
        "smollm2_forward_tokens_per_s": fwd_tps,
        "smollm2_generate_tokens_per_s": gen_tps,
    }))


if __name__ == "__main__":
    main()
