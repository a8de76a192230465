"""The reference half of scripts/gpu_check.sh's generation comparison: greedy
`transformers.generate` (KV cache, f32, batch 1) on the same prompt ids whet generates from.

  python3 scripts/gpu/reference_generate.py MODEL_DIR PROMPT NEW_TOKENS RESULT.json

PROMPT is text for the model's tokenizer.json (encoded without special tokens, as `whet
generate` encodes a plain prompt with this tokenizer, which adds none). Times three calls, each
after a device synchronisation: the first (cold: kernel selection, cache allocation) and two more;
tokens/s counts new tokens over the whole call, prefill included, as `whet generate` reports."""
import json
import os
import sys
import time


def main():
    model_dir, prompt, new_tokens, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    import torch
    import transformers
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    # WHET_REF_DEVICE=cpu: the CPU row of the check (its threads set by OMP_NUM_THREADS).
    device = os.environ.get("WHET_REF_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    ids = Tokenizer.from_file(f"{model_dir}/tokenizer.json").encode(prompt, add_special_tokens=False).ids
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    load_s = time.perf_counter() - t
    x = torch.tensor([ids], device=device)
    calls = []
    with torch.inference_mode():
        for _ in range(3):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=model.config.pad_token_id)
            if device == "cuda":
                torch.cuda.synchronize()
            s = time.perf_counter() - t
            n = y.shape[1] - x.shape[1]
            calls.append({"new_tokens": n, "seconds": round(s, 4), "tokens_per_s": n / s})
    res = {"stack": "reference", "impl": f"transformers {transformers.__version__} / torch {torch.__version__}",
           "device": device, "threads": torch.get_num_threads(), "prompt_tokens": len(ids), "load_s": round(load_s, 2), "calls": calls,
           "cold_tokens_per_s": calls[0]["tokens_per_s"],
           "warm_tokens_per_s": max(c["tokens_per_s"] for c in calls[1:]),
           "new_tokens": calls[-1]["new_tokens"], "generated_ids": y[0, len(ids):].tolist()}
    json.dump(res, open(out, "w"))
    print(json.dumps({k: v for k, v in res.items() if k != "generated_ids"}))


if __name__ == "__main__":
    main()
