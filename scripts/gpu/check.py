"""The driver of scripts/gpu_check.sh (read that first): makes the models and data, runs the
tiny-model parity tests on the device, greedy generation and training side by side with
transformers (+ peft), and writes a summary table. Every stage has a time limit taken from one
budget; a stage that cannot finish in what is left is recorded as skipped, and the summary is
rewritten after each stage, so a run stopped from outside still leaves its numbers.

  python3 scripts/gpu/check.py --whet BIN --work DIR --out DIR [--mode gpu|cpu-dry-run]
      [--budget SECONDS] [--tests MANIFEST.json] [--only-train smollm2,...] [--dtypes f32,tf32,bf16]
      [--ref-python PY]
      [--skip parity,generate-cpu,train-cpu,train,generate]

Outputs in --out: summary.md (also printed), results.json (every record), logs.tar.gz (each
command's output).
"""
import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpumem  # noqa: E402

HERE = Path(__file__).resolve().parent

# Per mode: the workloads. Training rows: model, task, seq, batch, steps, steady_from, seconds a
# whet run may take (model load and the first step's kernel compilation included).
PLAN = {
    "gpu": {
        "sizes": "real",
        "assets": ["--lm-lines", "2000", "--line-words", "200", "--cls-rows", "2000", "--cls-words", "160"],
        "train": [
            ("smollm2", "causal-lm", 512, 8, 20, 5, 75),
            ("llama-1b", "causal-lm", 512, 4, 12, 4, 120),
            ("minilm", "sequence-classification", 128, 32, 30, 5, 60),
        ],
        "generate": [("smollm2", 128, 60), ("llama-1b", 128, 90)],
        "generate_cpu": [("smollm2", 64, 60)],
        # The host CPU's training rows (CPU_THREADS a side, f32 and bf16): issue 16's CPU
        # targets on an Intel CPU with AMX, which PyTorch's bf16 uses and whet's kernel does not.
        "train_cpu": [("minilm", "sequence-classification", 128, 16, 8, 3, 60)],
        "device": "cuda",
    },
    "cpu-dry-run": {
        "sizes": "tiny",
        "assets": ["--lm-lines", "60", "--line-words", "40", "--cls-rows", "40", "--cls-words", "40"],
        "train": [
            ("smollm2", "causal-lm", 32, 2, 4, 1, 60),
            ("llama-1b", "causal-lm", 32, 2, 4, 1, 60),
            ("minilm", "sequence-classification", 32, 4, 4, 1, 60),
        ],
        "generate": [("smollm2", 16, 60), ("llama-1b", 16, 60)],
        "generate_cpu": [("smollm2", 16, 60)],
        "train_cpu": [("minilm", "sequence-classification", 32, 4, 4, 1, 60)],
        "device": "cpu",
    },
}
LORA = {
    "causal-lm": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
                  "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
    "sequence-classification": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
                                "target_modules": ["query", "value"]},
}
LR = {"lora": 2e-4, "full": 2e-5}
# whet's switch for bf16 training, as TrainingArguments names it.
BF16_SET = os.environ.get("WHET_BF16_SET", "training.bf16=true")
SUMMARY_RESERVE_S = 8
# Threads a side for the CPU generation row: the 2 cores of the machines whet is developed on.
CPU_THREADS = 2


class Check:
    def __init__(self, args):
        self.args = args
        self.mode = args.mode
        self.plan = PLAN[args.mode]
        self.start = time.time()
        self.deadline = self.start + args.budget
        self.work = Path(args.work)
        self.out = Path(args.out)
        self.logs = self.work / "logs"
        for d in (self.work, self.out, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        self.records = {"meta": {}, "parity": [], "generate": [], "train": []}
        self.device_dead = None
        self.watcher = gpumem.Watcher()
        # gpu_check.sh finds the CUDA libraries whet opens at run time; only whet's processes
        # get them, so PyTorch keeps its own.
        rust_env = dict(os.environ)
        if os.environ.get("WHET_LD_LIBRARY_PATH"):
            rust_env["LD_LIBRARY_PATH"] = os.environ["WHET_LD_LIBRARY_PATH"]
        self.rust_env = rust_env
        self.whet_env = dict(rust_env, WHET_CACHE=str(self.work / "whet-cache"),
                             WHET_DEVICE=self.plan["device"], NO_COLOR="1")

    # -- helpers ---------------------------------------------------------------------------
    def left(self):
        return self.deadline - time.time() - SUMMARY_RESERVE_S

    def log(self, msg):
        print(f"[{time.time() - self.start:6.1f}s] {msg}", flush=True)

    def run(self, name, cmd, limit, env=None, watch=False):
        """Runs `cmd` with at most `limit` seconds (and what the budget has left); its output goes
        to logs/NAME.log. Returns (rc or 'timeout' or 'skipped', seconds, output, peak MiB)."""
        limit = min(limit, self.left())
        if limit < 3:
            self.log(f"{name}: skipped (time budget)")
            return "skipped", 0.0, "", None
        self.log(f"{name}: {' '.join(map(str, cmd))}  (limit {limit:.0f}s)")
        logf = self.logs / (re.sub(r"[^A-Za-z0-9._-]", "-", name) + ".log")
        if watch:
            self.watcher.start()
        t = time.perf_counter()
        with open(logf, "w") as f:
            try:
                p = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT,
                                   env=env, timeout=limit, cwd=self.work)
                rc = p.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        secs = time.perf_counter() - t
        peak = self.watcher.stop() if watch else None
        text = logf.read_text(errors="replace")
        self.log(f"{name}: {'rc ' + str(rc) if rc != 'timeout' else 'TIMEOUT'} in {secs:.1f}s"
                 + (f", device peak {peak} MiB" if peak is not None else ""))
        return rc, secs, text, peak

    def whet(self, *args):
        dev = [] if self.device_flag is None else ["--device", self.plan["device"]]
        return [self.args.whet, *dev, *args]

    # -- stages ----------------------------------------------------------------------------
    def meta(self):
        m = self.records["meta"]
        m["mode"] = self.mode
        m["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        m["host"] = platform.node()
        m["cpus"] = os.cpu_count()
        try:
            info = Path("/proc/cpuinfo").read_text()
            m["cpu_model"] = re.search(r"^model name\s*:\s*(.*)$", info, re.M)[1]
            flags = set(re.search(r"^flags\s*:\s*(.*)$", info, re.M)[1].split())
            m["cpu_flags"] = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)
        except (OSError, TypeError):
            pass
        if shutil.which("nvidia-smi"):
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                "--format=csv,noheader"], capture_output=True, text=True)
            m["gpu"] = q.stdout.strip()
        if self.args.tests and Path(self.args.tests).is_file():
            m["bundle"] = json.loads(Path(self.args.tests).read_text()).get("built", {})
        v = subprocess.run([self.args.whet, "--version"], capture_output=True, text=True, env=self.whet_env)
        m["whet"] = (v.stdout or v.stderr).strip()
        h = subprocess.run([self.args.whet, "--help"], capture_output=True, text=True, env=self.whet_env).stdout
        # The --device flag (global) may not exist in an older whet: then WHET_DEVICE alone
        # asks for the device, and a whet that knows neither computes on the CPU, where the
        # real-size runs would only burn the budget.
        self.device_flag = "--device" if "--device" in h else None
        m["whet_device_flag"] = self.device_flag is not None
        self.whet_off = None
        if self.mode == "gpu" and self.device_flag is None:
            self.whet_off = "this whet has no --device flag (built before it?): whet runs skipped"
        m["watcher"] = self.watcher.source
        self.log(f"meta: {json.dumps(m)}")

    def start_assets(self):
        cmd = [self.args.ref_python, HERE / "make_assets.py", "--out", self.work / "assets",
               "--sizes", self.plan["sizes"], *self.plan["assets"]]
        self.log(f"assets: {' '.join(map(str, cmd))} (in the background)")
        self.assets_log = open(self.logs / "assets.log", "w")
        self.assets_t = time.perf_counter()
        self.assets = subprocess.Popen([str(c) for c in cmd], stdout=self.assets_log,
                                       stderr=subprocess.STDOUT)

    def wait_assets(self):
        try:
            rc = self.assets.wait(timeout=max(self.left(), 1))
        except subprocess.TimeoutExpired:
            self.assets.kill()
            rc = "timeout"
        self.assets_log.close()
        secs = time.perf_counter() - self.assets_t
        self.records["meta"]["assets"] = {"rc": rc, "seconds": round(secs, 1)}
        self.log(f"assets: rc {rc} in {secs:.1f}s")
        if rc != 0:
            print((self.logs / "assets.log").read_text()[-3000:])
            return False
        self.models = {m["name"]: m for m in
                       json.loads((self.work / "assets" / "assets.json").read_text())["models"]}
        self.records["meta"]["models"] = {k: v["params"] for k, v in self.models.items()}
        return True

    def parity(self):
        if not self.args.tests or not Path(self.args.tests).is_file():
            self.records["parity"].append({"name": "parity tests", "status": "skipped",
                                           "error": "no test manifest (scripts/gpu/prepare.sh makes it)"})
            return
        manifest = json.loads(Path(self.args.tests).read_text())
        root = Path(self.args.tests).parent
        env = dict(self.rust_env, WHET_TEST_DEVICE=self.plan["device"], RUST_BACKTRACE="0")
        for t in manifest["tests"]:
            rec = {"name": t["name"], "filter": t["filter"]}
            rc, secs, text, _ = self.run(f"parity-{t['name']}", [root / t["file"], t["filter"]],
                                         self.args.parity_limit, env=env)
            totals = [0, 0, 0]
            for m in re.finditer(r"test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored", text):
                totals = [a + int(b) for a, b in zip(totals, m.groups())]
            failed = re.findall(r"^test (\S+) \.\.\. FAILED", text, re.M)
            rec.update(rc=rc, seconds=round(secs, 1), passed=totals[0], failed=totals[1],
                       ignored=totals[2], failures=failed[:20],
                       status="ok" if rc == 0 else ("timeout" if rc == "timeout" else "failed"))
            if rc not in (0, "timeout") and not any(totals):
                rec["error"] = text.strip().splitlines()[-1][:300] if text.strip() else "no output"
            self.records["parity"].append(rec)
            # A device that cannot be opened fails every test the same way (device::for_tests
            # panics with this prefix): the rest of the check would only spend device time on
            # reference runs with nothing to compare against, so it stops here with the reason.
            if rc != 0 and totals[0] == 0 and "WHET_TEST_DEVICE:" in text:
                reason = re.search(r"WHET_TEST_DEVICE: (.*)", text)
                self.device_dead = reason[1][:500] if reason else "the device cannot be opened"
                self.records["meta"]["device_error"] = self.device_dead
                self.log(f"parity: the device cannot be opened ({self.device_dead}); stopping")
                return

    def generate(self, on_cpu=False):
        """Greedy generation on the device; with `on_cpu`, on the machine's CPU instead, both sides
        held to CPU_THREADS threads (the issue's CPU target is 'on every CPU', and this machine's
        CPU is another one)."""
        prompt = " ".join(f"w{i}" for i in range(10, 26))  # 16 words, in every vocabulary
        rows = self.plan["generate"] if not on_cpu else self.plan.get("generate_cpu", [])
        whet_env, ref_env, dev = self.whet_env, None, []
        if on_cpu:
            (whet_env, ref_env), dev = self.cpu_envs(), ["--device", "cpu"]
        for name, new, limit in rows:
            if name not in self.models:
                continue
            model = self.models[name]["path"]
            rec = {"name": name if not on_cpu else f"{name}, CPU ({CPU_THREADS} threads)", "new_tokens": new}
            for i in (1, 2):
                if self.whet_off:
                    rec[f"whet_{i}"] = {"status": "skipped", "error": self.whet_off}
                    continue
                args = ("generate", "--model", model, "--prompt", prompt, "--max-new-tokens", new)
                cmd = [self.args.whet, *dev, *args] if on_cpu else self.whet(*args)
                rc, secs, text, peak = self.run(
                    f"generate-{name}{'-cpu' if on_cpu else ''}-whet-{i}", cmd,
                    limit, env=whet_env, watch=not on_cpu)
                m = re.search(r"\[(\d+) prompt tokens, (\d+) new tokens in ([\d.]+)s, ([\d.]+) tokens/s\]", text)
                if m:
                    rec[f"whet_{i}"] = {"tokens_per_s": float(m[4]), "new_tokens": int(m[2]),
                                        "seconds": float(m[3]), "wall_s": round(secs, 1),
                                        "device_peak_mib": peak}
                    if i == 1:
                        # The streamed text: the prompt, then the generated words.
                        body = text[:m.start()]
                        rec["whet_ids"] = [int(w) for w in re.findall(r"w(\d+)", body)][16:]
                else:
                    rec[f"whet_{i}"] = {"status": str(rc), "error": last_line(text)}
            ref_out = self.work / f"generate-{name}{'-cpu' if on_cpu else ''}-ref.json"
            rc, secs, text, peak = self.run(
                f"generate-{name}{'-cpu' if on_cpu else ''}-ref",
                [self.args.ref_python, HERE / "reference_generate.py", model, prompt, new, ref_out],
                limit + 30, env=ref_env, watch=not on_cpu)
            if rc == 0 and ref_out.is_file():
                r = json.loads(ref_out.read_text())
                r["device_peak_mib"] = peak
                ids = r.pop("generated_ids")
                w = rec.get("whet_ids", [])
                same = next((k for k, (a, b) in enumerate(zip(w, ids)) if a != b), min(len(w), len(ids)))
                rec["same_greedy_prefix"] = same
                rec["ref"] = r
            else:
                rec["ref"] = {"status": str(rc), "error": last_line(text)}
            rec.pop("whet_ids", None)
            self.records["generate"].append(rec)
            self.write()

    def jobs(self, model, task, seq, batch, steps, steady_from, on_cpu=False):
        dtypes = ("f32", "bf16") if on_cpu else self.args.dtypes.split(",")
        where = "-cpu" if on_cpu else ""
        for dtype in dtypes:
            for method in ("lora", "full"):
                yield {"id": f"{model}-{method}-{dtype}{where}",
                       "name": f"{model}, CPU ({CPU_THREADS} threads)" if on_cpu else model,
                       "model": self.models[model]["path"],
                       "task": task, "method": method, "dtype": dtype, "steps": steps, "batch": batch,
                       "seq": seq, "lr": LR[method], "lora": LORA[task], "steady_from": steady_from,
                       "data": str(self.work / "assets" / "data" / ("lm.txt" if task == "causal-lm" else "cls.jsonl")),
                       "workdir": str(self.work / "ref" / f"{model}-{method}-{dtype}{where}")}

    def recipe(self, job):
        d = Path(job["workdir"]).parent.parent / "whet" / job["id"]
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        lora = job["lora"]
        lines = [f'model = "{job["model"]}"', f'task = "{job["task"]}"', f'method = "{job["method"]}"',
                 "", "[data]", f'train = "{job["data"]}"']
        if job["task"] == "causal-lm":
            lines.append(f"block_size = {job['seq']}")
        else:
            lines += ['text_column = "text"', 'label_column = "label"', f"max_length = {job['seq']}"]
        if job["method"] == "lora":
            lines += ["", "[lora]", f"r = {lora['r']}", f"lora_alpha = {lora['lora_alpha']}",
                      f"lora_dropout = {lora['lora_dropout']}",
                      "target_modules = [" + ", ".join(f'"{m}"' for m in lora["target_modules"]) + "]"]
        lines += ["", "[training]", f'output_dir = "{d / "out"}"', f"learning_rate = {job['lr']}",
                  f"per_device_train_batch_size = {job['batch']}", f"max_steps = {job['steps']}",
                  "num_train_epochs = 1", 'eval_strategy = "no"', 'save_strategy = "no"',
                  "logging_steps = 1", "max_grad_norm = 1.0", "weight_decay = 0.0",
                  'lr_scheduler_type = "linear"', "warmup_steps = 0", "seed = 42"]
        (d / "recipe.toml").write_text("\n".join(lines) + "\n")
        return d

    def cpu_envs(self):
        """whet's and the reference's environments for a CPU row: CPU_THREADS threads a side."""
        threads = str(CPU_THREADS)
        return (dict(self.whet_env, WHET_DEVICE="cpu", RAYON_NUM_THREADS=threads),
                dict(os.environ, WHET_REF_DEVICE="cpu", OMP_NUM_THREADS=threads, CUDA_VISIBLE_DEVICES=""))

    def whet_train(self, job, limit, on_cpu=False):
        if self.whet_off:
            self.records["train"].append({"stack": "whet", **{k: job[k] for k in (
                "id", "name", "task", "method", "dtype", "steps", "batch", "seq")},
                "status": "skipped", "error": self.whet_off})
            return
        d = self.recipe(job)
        extra = {"bf16": ["--set", BF16_SET], "tf32": ["--set", "training.tf32=true"]}.get(job["dtype"], [])
        args = ("train", d / "recipe.toml", "--no-memory-check", *extra)
        cmd = [self.args.whet, "--device", "cpu", *args] if on_cpu else self.whet(*args)
        rc, secs, text, peak = self.run(f"train-{job['id']}-whet", cmd, limit,
                                        env=self.cpu_envs()[0] if on_cpu else self.whet_env,
                                        watch=not on_cpu)
        rec = {"stack": "whet", **{k: job[k] for k in ("id", "name", "task", "method", "dtype", "steps",
                                                       "batch", "seq")}, "wall_s": round(secs, 1)}
        dev = re.search(r"^device: (.*)$", text, re.M)
        rec["device"] = dev[1].split(" (")[0] if dev else ("cpu (flex)" if self.plan["device"] == "cpu" else "not printed")
        results = d / "out" / "all_results.json"
        if rc == 0 and results.is_file():
            r = json.loads(results.read_text())
            tokens_per_step = job["batch"] * job["seq"]
            log = [e for e in json.loads((d / "out" / "trainer_state.json").read_text())["log_history"]
                   if "samples_per_second" in e]
            # Cumulative samples/s at each step gives the time since the loop began; one row per
            # step of `batch` samples (blocks and classification rows alike).
            at = {e["step"]: e["step"] * job["batch"] / e["samples_per_second"] for e in log
                  if e["samples_per_second"] > 0}
            steps = r.get("train_steps", job["steps"])
            w = min(job["steady_from"], steps - 1)
            steady = None
            if steps in at and w in at and at[steps] > at[w]:
                steady = tokens_per_step * (steps - w) / (at[steps] - at[w])
            rec.update(status="ok", steps_run=steps, train_runtime=r.get("train_runtime"),
                       tokens_per_s=r.get("train_tokens_per_second"), steady_tokens_per_s=steady,
                       first_step_s=round(at[1], 3) if 1 in at else None,
                       train_loss=r.get("train_loss"), trainable_params=r.get("trainable_params"),
                       host_peak_rss_mib=r.get("train_peak_rss_mb"), device_peak_mib=peak,
                       tokens_counted=r.get("train_tokens_per_second", 0) * r.get("train_runtime", 0))
            if abs(rec["tokens_counted"] - tokens_per_step * steps) > 0.01 * tokens_per_step * steps:
                rec["note"] = f"whet counted {rec['tokens_counted']:.0f} tokens, batch x seq x steps is {tokens_per_step * steps}"
        else:
            rec.update(status="skipped" if rc == "skipped" else ("timeout" if rc == "timeout" else "error"),
                       error="time budget" if rc == "skipped" else last_line(text))
        self.records["train"].append(rec)
        self.write()

    def train(self, on_cpu=False):
        """Training rows on the device; with `on_cpu`, the plan's CPU rows on the machine's CPU,
        both sides held to CPU_THREADS threads."""
        only = self.args.only_train.split(",") if self.args.only_train and not on_cpu else None
        rows = self.plan.get("train_cpu", []) if on_cpu else self.plan["train"]
        for model, task, seq, batch, steps, steady_from, limit in rows:
            if model not in self.models or (only and model not in only):
                continue
            jobs = list(self.jobs(model, task, seq, batch, steps, steady_from, on_cpu))
            for job in jobs:
                self.whet_train(job, limit, on_cpu)
            for job in jobs:
                job["min_seconds"] = 10
                Path(job["workdir"]).mkdir(parents=True, exist_ok=True)
            where = "-cpu" if on_cpu else ""
            jobs_file = self.work / f"ref-jobs-{model}{where}.json"
            jobs_file.write_text(json.dumps(jobs, indent=1))
            results = self.work / f"ref-results-{model}{where}.jsonl"
            results.unlink(missing_ok=True)
            rc, secs, text, _ = self.run(
                f"train-{model}{where}-ref",
                [self.args.ref_python, HERE / "reference_train.py", jobs_file, results,
                 "--deadline", self.deadline - SUMMARY_RESERVE_S],
                len(jobs) * limit, env=self.cpu_envs()[1] if on_cpu else None)
            done = {}
            if results.is_file():
                for line in results.read_text().splitlines():
                    r = json.loads(line)
                    done[r["id"]] = r
            for job in jobs:
                status = {"timeout": "timeout", "skipped": "skipped"}.get(rc, "error")
                r = done.get(job["id"]) or {"stack": "reference", "id": job["id"], "name": model,
                                            "method": job["method"], "dtype": job["dtype"],
                                            "status": status,
                                            "error": "time budget" if rc == "skipped" else last_line(text)}
                self.records["train"].append(r)
            self.write()

    # -- output ----------------------------------------------------------------------------
    def write(self):
        (self.out / "results.json").write_text(json.dumps(self.records, indent=1))
        (self.out / "summary.md").write_text(summary(self.records))

    def finish(self):
        self.records["meta"]["seconds"] = round(time.time() - self.start, 1)
        self.write()
        with tarfile.open(self.out / "logs.tar.gz", "w:gz") as tar:
            for f in sorted(self.logs.glob("*.log")):
                tar.add(f, arcname=f"logs/{f.name}")
        print()
        print(summary(self.records))


def last_line(text):
    """The error line of a command's output, shortened for a table cell."""
    lines = [l for l in text.strip().splitlines() if l.strip()]
    errs = [l for l in lines if l.startswith("error") or "Error" in l]
    line = errs[-1] if errs else lines[-1] if lines else "no output"
    line = re.sub(r"^error: (recipe )?\S+\.toml: ", "error: ", line)
    return line.split(" (valid keys")[0][:160]


def fmt(v, digits=0):
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


def summary(rec):
    m = rec["meta"]
    b = m.get("bundle", {})
    out = [f"## whet GPU check, {m.get('date', '')} ({m.get('mode', '')})", ""]
    out.append(f"- device: {m.get('gpu') or 'no GPU (CPU)'}; {m.get('cpus')} CPUs"
               f" ({m.get('cpu_model', '?')}; {m.get('cpu_flags', '?')}); memory by {m.get('watcher') or 'none'}")
    out.append(f"- whet: {m.get('whet', '?')}"
               + (f", built from {b.get('commit', '?')}{' (+ uncommitted changes)' if b.get('dirty') else ''}"
                  f" with `{b.get('cargo', '')}`" if b else "")
               + ("" if m.get("whet_device_flag", True) else "; this whet has no --device flag (WHET_DEVICE only)"))
    if "models" in m:
        shapes = "real shapes" if m.get("mode") == "gpu" else "tiny shapes (dry run)"
        out.append(f"- models (random weights at {shapes}, made from configs by transformers): "
                   + ", ".join(f"{k} {v / 1e6:.1f}M parameters" for k, v in m["models"].items()))
    if "seconds" in m:
        out.append(f"- total {m['seconds']:.0f} s")
    for e in rec.get("stage_errors", []):
        out.append(f"- stage failed: {e}")
    out.append("")
    out.append("### Parity tests on the device (tiny models against transformers fixtures)")
    out.append("")
    if not rec["parity"]:
        out.append("- not run")
    for p in rec["parity"]:
        if p.get("status") == "skipped":
            out.append(f"- {p['name']}: skipped ({p.get('error')})")
            continue
        line = (f"- `{p['name']} {p.get('filter', '')}`: {p.get('passed', 0)} passed, {p.get('failed', 0)} failed, "
                f"{p.get('ignored', 0)} ignored in {p.get('seconds', 0):.1f} s ({p.get('status')})")
        if p.get("failures"):
            line += "; failed: " + ", ".join(p["failures"])
        if p.get("error"):
            line += f"; {p['error']}"
        out.append(line)
    out.append("")
    out.append("### Training: train tokens/s and peak device memory, whet against transformers (+ peft)")
    out.append("")
    out.append("Tokens/s: steady (after the first steps) and, in brackets, over the whole loop, first step "
               "(kernel compilation) included. Memory: peak device memory in use (driver's view, CUDA "
               "context included) above the idle device; for the reference also torch's peak allocated."
               + ("" if m.get("watcher") else " No GPU here: memory is each process's peak RSS (host)."))
    optims = sorted({r["optim"].split(".")[-1].lower() for r in rec["train"] if r.get("optim")})
    if optims:
        out.append(f"The reference trains with Trainer's default optimizer ({', '.join(optims)}); "
                   "bf16 is Trainer's `bf16=True` (autocast over f32 weights).")
    out.append("")
    if not rec["train"]:
        out.append("Not run.")
        out.append("")
    out.append("| model | method | dtype | batch x seq, steps | whet tokens/s | reference tokens/s | whet / ref | "
               "whet peak MiB | ref peak MiB (torch alloc) | notes |")
    out.append("|---|---|---|---|---:|---:|---:|---:|---:|---|")
    by = {}
    for r in rec["train"]:
        by.setdefault(r["id"], {})[r["stack"]] = r
    for key, pair in by.items():
        w, r = pair.get("whet", {}), pair.get("reference", {})
        any_ = w or r
        notes = []
        for side, x in (("whet", w), ("ref", r)):
            if x and x.get("status") != "ok":
                notes.append(f"{side} {x.get('status')}: {x.get('error', '')}")
            if x and x.get("note"):
                notes.append(f"{side}: {x['note']}")
        if w.get("device") and w.get("status") == "ok":
            notes.append(f"whet on {w['device']}")

        def tps(x):
            if x.get("status") != "ok":
                return "-"
            return f"{fmt(x.get('steady_tokens_per_s'))} ({fmt(x.get('tokens_per_s'))})"
        ref_mem = fmt(r.get("device_peak_mib") if r.get("device_peak_mib") is not None else r.get("process_max_rss_mib"))
        if r.get("torch_peak_allocated_mib") is not None:
            ref_mem += f" ({fmt(r['torch_peak_allocated_mib'])})"
        whet_mem = fmt(w.get("device_peak_mib") if w.get("device_peak_mib") is not None else w.get("host_peak_rss_mib"))
        out.append(f"| {any_.get('name')} | {any_.get('method')} | {any_.get('dtype')} | "
                   f"{any_.get('batch', '')} x {any_.get('seq', '')}, {any_.get('steps', '')} | {tps(w)} | {tps(r)} | "
                   f"{ratio(w.get('steady_tokens_per_s'), r.get('steady_tokens_per_s'))} | {whet_mem} | {ref_mem} | "
                   f"{'; '.join(n.replace('|', '/') for n in notes)} |")
    out.append("")
    out.append("### Greedy generation, batch 1, f32, KV cache: new tokens/s (prefill included)")
    out.append("")
    if not rec["generate"]:
        out.append("Not run.")
        out.append("")
    out.append("| model | new tokens | whet (1st / 2nd process) | transformers.generate (cold / warm) | "
               "whet 2nd / ref warm | same greedy tokens | whet / ref peak MiB |")
    out.append("|---|---:|---:|---:|---:|---:|---:|")
    for g in rec["generate"]:
        w1, w2, r = g.get("whet_1", {}), g.get("whet_2", {}), g.get("ref", {})
        whet_s = f"{fmt(w1.get('tokens_per_s'), 1)} / {fmt(w2.get('tokens_per_s'), 1)}"
        if "error" in w1:
            whet_s = f"{w1.get('status')}: {w1['error']}".replace("|", "/")
        ref_s = f"{fmt(r.get('cold_tokens_per_s'), 1)} / {fmt(r.get('warm_tokens_per_s'), 1)}"
        if "error" in r:
            ref_s = f"{r.get('status')}: {r['error']}".replace("|", "/")
        same = g.get("same_greedy_prefix")
        out.append(f"| {g['name']} | {g['new_tokens']} | {whet_s} | {ref_s} | "
                   f"{ratio(w2.get('tokens_per_s'), r.get('warm_tokens_per_s'))} | "
                   f"{'-' if same is None else str(same) + ' of ' + str(g['new_tokens'])} | "
                   f"{fmt(w1.get('device_peak_mib'))} / {fmt(r.get('device_peak_mib'))} |")
    impl = next((r.get("impl") for r in rec["train"] if r.get("impl")), None) or \
        next((g["ref"].get("impl") for g in rec["generate"] if g.get("ref", {}).get("impl")), None)
    if impl:
        out.append("")
        out.append(f"Reference: {impl}.")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--whet", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", choices=list(PLAN), default="gpu")
    ap.add_argument("--budget", type=float, default=450)
    ap.add_argument("--tests", default=None, help="the bundle's manifest.json (test binaries)")
    ap.add_argument("--parity-limit", type=float, default=100)
    ap.add_argument("--only-train", default=None, help="models to train, e.g. llama-1b,minilm")
    ap.add_argument("--dtypes", default="f32,bf16",
                    help="training precisions, of f32 (no TF32 on either side), tf32 (transformers' "
                         "tf32=True, whet's training.tf32), bf16")
    ap.add_argument("--skip", default="", help="stages to leave out: parity,generate-cpu,train-cpu,train,generate")
    ap.add_argument("--ref-python", default=sys.executable)
    args = ap.parse_args()
    unknown = set(args.dtypes.split(",")) - {"f32", "tf32", "bf16"}
    if unknown:
        ap.error(f"--dtypes: unknown {', '.join(sorted(unknown))} (f32, tf32, bf16)")
    c = Check(args)
    c.meta()
    c.start_assets()
    # A stage that breaks is reported and the next one runs: device time is too dear to lose
    # the rest of a run to one stage.
    skip = set(filter(None, args.skip.split(",")))
    if "parity" not in skip:
        stage(c, c.parity)
    c.write()
    if c.device_dead:
        c.assets.kill()
    elif stage(c, c.wait_assets):
        # The host CPU's generation row first (short, and the only Intel CPU with AMX whet is
        # measured on: issue 16's "generation on every CPU"), then training, then generation
        # on the device.
        if "generate-cpu" not in skip:
            stage(c, lambda: c.generate(on_cpu=True))
        if "train-cpu" not in skip:
            stage(c, lambda: c.train(on_cpu=True))
        if "train" not in skip:
            stage(c, c.train)
        if "generate" not in skip:
            stage(c, c.generate)
    c.finish()


def stage(c, fn):
    try:
        return fn()
    except Exception:
        import traceback
        traceback.print_exc()
        c.records.setdefault("stage_errors", []).append(f"{getattr(fn, '__name__', 'stage')}: {traceback.format_exc().splitlines()[-1]}")
        c.log(f"stage {getattr(fn, '__name__', 'stage')} failed; going on")
        return False


if __name__ == "__main__":
    main()
