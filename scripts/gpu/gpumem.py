"""Peak device memory of whatever runs on GPU 0 while a `Watcher` is on, read from the driver
(NVML through `pynvml`, else `nvidia-smi -lms`), so whet and PyTorch are measured the same way:
memory in use on the device, the CUDA context and every allocator's reserve included, minus what
was in use when the watcher started. Without a GPU, `peak_mib()` is None."""
import shutil
import subprocess
import threading
import time


class Watcher:
    def __init__(self, interval_s=0.05):
        self.interval_s = interval_s
        self.baseline = None
        self.peak = None
        self._stop = threading.Event()
        self._thread = None
        self._proc = None
        self._nvml = None
        try:
            import pynvml
            pynvml.nvmlInit()
            self._nvml = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(0))
        except Exception:
            self._nvml = None
        self.available = self._nvml is not None or shutil.which("nvidia-smi") is not None
        self.source = "nvml" if self._nvml else ("nvidia-smi" if self.available else None)

    def _used_nvml(self):
        pynvml, h = self._nvml
        return pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**20

    def _used_smi(self):
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                              "-i", "0"], capture_output=True, text=True, timeout=10).stdout
        return float(out.split()[0])

    def used_mib(self):
        if not self.available:
            return None
        return self._used_nvml() if self._nvml else self._used_smi()

    def _see(self, v):
        if v is not None and (self.peak is None or v > self.peak):
            self.peak = v

    def start(self, baseline=None):
        """Starts polling; the peak is reported above `baseline` (MiB), by default what is in
        use now."""
        if not self.available:
            return self
        self.baseline = self.used_mib() if baseline is None else baseline
        self.peak = self.used_mib()
        self._stop.clear()
        if self._nvml:
            def loop():
                while not self._stop.is_set():
                    self._see(self._used_nvml())
                    time.sleep(self.interval_s)
            self._thread = threading.Thread(target=loop, daemon=True)
        else:
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0",
                 f"-lms={max(int(self.interval_s * 1000), 50)}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

            def loop():
                for line in self._proc.stdout:
                    try:
                        self._see(float(line.split()[0]))
                    except (ValueError, IndexError):
                        pass
            self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Stops polling; returns the peak above the baseline in MiB (None without a GPU)."""
        if not self.available or self._thread is None:
            return None
        self._see(self.used_mib())
        self._stop.set()
        if self._proc:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        self._thread.join(timeout=5)
        self._thread = None
        return self.peak_mib()

    def peak_mib(self):
        if self.peak is None or self.baseline is None:
            return None
        return round(self.peak - self.baseline, 1)
