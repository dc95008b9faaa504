"""`run_clip.py` in a subprocess, timed from the outside.

`metrics.jsonl` has no timestamps, so the time of each step is taken from the outside: the child runs with
`TQDM_MININTERVAL=0 TQDM_MINITERS=1` (tqdm's environment overrides), so that its progress bars print after every
step, and `run_clip_timed` timestamps each print and each log line as they arrive on the pipe.
"""

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

RUN_CLIP = Path(__file__).resolve().parent.parent / "run_clip.py"
# A tqdm status line: "desc:  40%|████      | 2/5 [00:00<00:00, 78.13it/s]" (the bar itself may be absent).
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ - ")  # run_clip.py's logging format
PROGRESS = re.compile(r"^(?P<desc>[^:\r\n]+):\s+\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\s*\[")


def child_env(workdir: Path, threads: int | None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "TQDM_MININTERVAL": "0", "TQDM_MINITERS": "1",  # a progress print after every step, to timestamp
           "HF_DATASETS_CACHE": str(workdir / "hf_cache"), "MPLCONFIGDIR": str(workdir / "matplotlib")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_clip_timed(argv: list[str], env: dict, timeout: float | None = None) -> dict:
    """Run `python run_clip.py argv...`, timestamping every progress-bar print on its stderr as it arrives.

    Returns `wall_s` (the whole run), `progress` {bar description: [(n, seconds since start)]} with the first time
    each count was shown, `lines` [(seconds since start, text)] of the other stderr lines (the log), `metrics`
    (the lines of `metrics.jsonl` in `--output_dir`), `peak_rss_bytes` (`PeakRss`: the training process's peak
    resident memory over its whole life) and `training_rss_growth_bytes` (its peak from the first training step on,
    less its resident memory at that step: what training adds to the loaded data and model); both None where /proc
    is missing."""
    output_dir = Path(argv[argv.index("--output_dir") + 1])
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(RUN_CLIP), *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env, cwd=RUN_CLIP.parent)
    stdout = []
    drain = threading.Thread(target=lambda: stdout.append(process.stdout.read()), daemon=True)
    drain.start()
    peak_rss = PeakRss(process)
    progress, seen, lines, pending = {}, set(), [], ""
    timer = threading.Timer(timeout, process.kill) if timeout else None
    if timer:
        timer.start()
    try:
        while chunk := os.read(process.stderr.fileno(), 1 << 16):
            now = time.perf_counter() - start
            pending += chunk.decode("utf-8", errors="replace")
            pieces = re.split(r"[\r\n]", pending)
            pending = pieces.pop()  # maybe incomplete; a complete status line is parsed now and again later
            for number, piece in enumerate([*pieces, pending]):
                # A log line written while a bar is shown continues the bar's (unterminated) line: split it off.
                log = LOG_LINE.search(piece)
                bar, text = (piece[: log.start()], piece[log.start() :]) if log else (piece, "")
                match = PROGRESS.match(bar.strip())
                key = match and (match["desc"].strip(), int(match["n"]))
                if key and key not in seen:
                    if key[0] == "train" and not any(k[0] == "train" for k in seen):
                        peak_rss.start_training()
                    seen.add(key)
                    progress.setdefault(key[0], []).append((key[1], now))
                text = text or ("" if match else bar)
                if number < len(pieces) and text.strip():  # complete lines only
                    lines.append((now, text.strip()))
        returncode = process.wait()
    finally:
        if timer:
            timer.cancel()
    wall = time.perf_counter() - start
    drain.join()
    peak_rss.stop()
    if returncode != 0:
        log = "\n".join(text for _, text in lines[-30:])
        raise RuntimeError(f"run_clip.py {' '.join(argv)} failed ({returncode}):\n{log}")
    metrics_path = output_dir / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    return {"wall_s": wall, "progress": progress, "lines": lines, "metrics": metrics, "peak_rss_bytes": peak_rss.peak,
            "training_rss_growth_bytes": peak_rss.training_growth()}  # fmt: skip


class PeakRss(threading.Thread):
    """The peak resident set size of a running child process (its kernel high-water mark `VmHWM`, read every
    `interval` seconds until it exits; the last read before the exit stands). The child alone: DataLoader worker
    processes are not counted. `start_training` resets the high-water mark to the current resident size (writing 5
    to the child's `/proc/PID/clear_refs`, as `common.PeakMemory` does for its own process), so that the peak of the
    training phase can be told from that of loading. `peak` stays None where /proc is missing (not Linux)."""

    def __init__(self, process: subprocess.Popen, interval: float = 0.2):
        super().__init__(daemon=True)
        self.proc = Path(f"/proc/{process.pid}")
        self.process, self.interval = process, interval
        self.peak = self.training_start = self.training_peak = None
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.start()

    def read(self, field: str) -> int:
        fields = dict(line.split(":", 1) for line in (self.proc / "status").read_text().splitlines() if ":" in line)
        return int(fields[field].split()[0]) * 1024  # reported in kB

    def run(self) -> None:
        while self.process.poll() is None and not self.stopped.is_set():
            with self.lock:
                try:
                    high_water = self.read("VmHWM")
                    self.peak = max(self.peak or 0, high_water)
                    if self.training_start is not None:
                        self.training_peak = max(self.training_peak or 0, high_water)
                except (OSError, KeyError, ValueError):
                    pass  # not Linux, or the process is exiting
            self.stopped.wait(self.interval)

    def start_training(self) -> None:
        with self.lock:
            try:
                self.peak = max(self.peak or 0, self.read("VmHWM"))  # the loading phase's peak, before the reset
                (self.proc / "clear_refs").write_text("5")
                self.training_start = self.read("VmRSS")
            except (OSError, KeyError, ValueError):
                self.training_start = None  # cannot reset the mark: no training-phase number

    def training_growth(self) -> int | None:
        if self.training_start is None or self.training_peak is None:
            return None
        return max(0, self.training_peak - self.training_start)

    def stop(self) -> int | None:
        self.stopped.set()
        self.join()
        return self.peak


def step_epochs(metrics: list[dict]) -> dict[int, int]:
    """{optimizer step: epoch} from the training lines of `metrics.jsonl` (logged every step)."""
    return {record["step"]: record["epoch"] for record in metrics if "loss" in record}
