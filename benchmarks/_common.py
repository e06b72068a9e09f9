"""Shared machinery of the mvsnb benchmarks (`make bench`): the machine, timing, peak memory, tables, JSON.

Every `bench_*.py` script written on top of this module has the same shape and command line:

    python benchmarks/bench_X.py [--full] [--smoke] [--device cpu|cuda|auto] [--repeats N] [--threads N]
                                 [--isolate] [--out FILE]

* a list of **cases** (plain dicts, so they travel as JSON) and a `run_case(spec, bench) -> rows` function;
* **timing**: `Bench.measure` runs a callable `warmup` times untimed (skipped when one call is slow), then
  `repeats` timed calls, and reports the median (and min) wall time; on a GPU it synchronises around each call;
* **peak memory per case**: on Linux the process's resident high-water mark (`VmHWM`) is reset before each
  measurement through `/proc/self/clear_refs` (Linux >= 4.0), so `peak_rss_mb` is the case's own peak and
  `rss_delta_mb` its working memory above what was resident before it started (imports, inputs). Where the reset
  is not possible, or with `--isolate`, every case runs in a fresh subprocess, where `ru_maxrss` is that case's
  own; on a GPU `torch.cuda.max_memory_allocated` is reported (`gpu_peak_mb`) after `reset_peak_memory_stats`;
* **the hardware limit**: `bench_probe.py` measures the memory bandwidth (a large tensor copy) and the matmul
  FLOP rate once per run (`benchmarks/out/bench_probe.json`); rows that give the bytes they must move or the
  FLOPs they must do get `bw_frac` / `flop_frac`, the fraction of that limit they reach (when the probe file is
  missing or was taken on another device, a short probe runs in-process);
* **output**: a table on stdout and one JSON file per script in `benchmarks/out/` (git-ignored), with the machine
  (CPU model, cores, torch threads, GPU, load average before and after, `uptime`).
"""
from __future__ import annotations
import argparse, json, os, platform, resource, socket, statistics, subprocess, sys, textwrap, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))  # run from a fresh clone without an install


# ------------------------------------------------------------------------------------------------ the machine
def cpu_model() -> str:
    "CPU model name from /proc/cpuinfo (platform's answer elsewhere)."
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"): return line.split(":", 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()


def uptime_text() -> str:
    try: return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception: return ""


def git_commit() -> str|None:
    try:
        p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return (p.stdout.strip() + ("+dirty" if dirty else "")) if p.returncode == 0 else None
    except Exception: return None


def machine_info(device: str="cpu") -> dict:
    "What the numbers were measured on: CPU, cores, threads, GPU, library versions and the current load."
    import numpy, torch
    info = dict(host=socket.gethostname(), cpu_model=cpu_model(), cores=os.cpu_count(),
                cores_usable=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                torch_threads=torch.get_num_threads(), omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                mem_total_gb=_mem_total_gb(), python=platform.python_version(), torch=str(torch.__version__),
                numpy=numpy.__version__, device=device, gpu=None, loadavg=list(os.getloadavg()), uptime=uptime_text(),
                date=time.strftime("%Y-%m-%d %H:%M:%S"), git=git_commit())
    try:
        import mvsnb; info["mvsnb"] = mvsnb.__version__
    except Exception: pass
    if device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = dict(name=p.name, memory_gb=round(p.total_memory / 2 ** 30, 1), cuda=torch.version.cuda)
    return info


def _mem_total_gb() -> float|None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"): return round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError: return None


def print_machine(info: dict, title: str):
    gpu = f", GPU {info['gpu']['name']} ({info['gpu']['memory_gb']} GB)" if info.get("gpu") else ", no GPU used"
    print(f"== {textwrap.shorten(title, 200)}")
    print(f"   CPU {info['cpu_model']}, {info['cores']} cores ({info['cores_usable']} usable), torch {info['torch']} on "
          f"{info['torch_threads']} thread(s){gpu}; device {info['device']}")
    print(f"   load average {' '.join(f'{x:.2f}' for x in info['loadavg'])}  ({info['uptime']})", flush=True)


# ------------------------------------------------------------------------------------------------ memory
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(key: str) -> int|None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"): return int(line.split()[1])
    except OSError: pass
    return None


def rss_mb() -> float:
    "Current resident memory of this process, MB."
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else peak_rss_mb()


def peak_rss_mb() -> float:
    "Peak resident memory of this process, MB (VmHWM, resettable; else `ru_maxrss`)."
    kb = _status_kb("VmHWM")
    if kb is None: kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024


def reset_peak_rss() -> bool:
    "Reset this process's resident high-water mark to its current RSS (Linux `clear_refs` 5); False if impossible."
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError: return False


def can_reset_peak() -> bool:
    return _status_kb("VmHWM") is not None and reset_peak_rss()


# ------------------------------------------------------------------------------------------------ devices and threads
def resolve_device(name: str) -> str:
    import torch
    if name == "auto": return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available(): raise SystemExit(f"--device {name}: CUDA is not available")
    return name


def sync(device: str):
    if str(device).startswith("cuda"):
        import torch; torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ the hardware limit
def probe_bandwidth(device: str="cpu", mb: int=256, repeats: int=5) -> dict:
    "Copy bandwidth: `dst.copy_(src)` of `mb` MB float32 tensors, counting the read and the write (GB/s, median)."
    import torch
    n = mb * 2 ** 20 // 4
    src = torch.rand(n, device=device); dst = torch.empty_like(src)
    dst.copy_(src); sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter(); dst.copy_(src); sync(device); times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return dict(copy_mb=mb, copy_s=med, bandwidth_gbps=2 * n * 4 / med / 1e9, bandwidth_best_gbps=2 * n * 4 / min(times) / 1e9)


def probe_flops(device: str="cpu", n: int=1024, repeats: int=5, dtype: str="float32") -> dict:
    "Matmul rate: (n,n) @ (n,n) in `dtype`, 2n³ FLOPs per product (GFLOP/s, median)."
    import torch
    dt = getattr(torch, dtype)
    a = torch.rand(n, n, device=device, dtype=dt); b = torch.rand(n, n, device=device, dtype=dt)
    a @ b; sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter(); a @ b; sync(device); times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return dict(matmul_n=n, matmul_dtype=dtype, matmul_s=med, gflops=2 * n ** 3 / med / 1e9, gflops_best=2 * n ** 3 / min(times) / 1e9)


def hardware_bounds(device: str="cpu") -> dict:
    "The probe of this run (`out/bench_probe.json` when it was taken on this host and device), else a quick probe now."
    import torch
    p = OUT / "bench_probe.json"
    if p.is_file():
        try:
            d = json.loads(p.read_text())
            b = d.get("bounds", {}).get(device.split(":")[0])
            if b and d["machine"]["host"] == socket.gethostname() and b.get("torch_threads") == torch.get_num_threads():
                return dict(b, source=str(p.relative_to(ROOT)))
        except (ValueError, KeyError): pass
    b = dict(probe_bandwidth(device, mb=64, repeats=3), **probe_flops(device, n=512 if device == "cpu" else 4096, repeats=3))
    if device == "cpu": b.update(probe_gather(mb=1, repeats=3))
    return dict(b, torch_threads=torch.get_num_threads(), source="quick in-process probe")


_GATHER_C = r"""
#include <stdint.h>
void probe_gather(int64_t n, const float *restrict src, const int32_t *restrict idx, float *restrict out) {
    for (int64_t i = 0; i < n; i++) out[i] = src[idx[i]];  /* vectorised into AVX2/AVX-512 gathers at -O3 -march=native */
}
"""


def gather_kernel(mb: float=1, n: int=1 << 24):
    """`run()` doing `out[i] = src[idx[i]]` for n random int32 indices into an `mb` MB float32 array, in C
    (`mvsnb.native`, AVX2/AVX-512 gathers at -O3 -march=native) on torch's threads, and `check()`; None without a
    C compiler."""
    import ctypes, torch
    from mvsnb.native import build_native, parallel_map, pointer, NativeBuildError
    try: fn = build_native("probe_gather", _GATHER_C).probe_gather
    except NativeBuildError: return None
    fn.restype = None; fn.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    m = int(mb * 2 ** 20 // 4)
    src = torch.rand(m); idx = torch.randint(0, m, (n,), dtype=torch.int32); out = torch.empty(n)
    step = -(-n // torch.get_num_threads())
    ps, pi, po = pointer(src, torch.float32), pointer(idx, torch.int32), pointer(out, torch.float32)
    run = lambda: parallel_map(lambda a: fn(min(step, n - a), ps, pi + 4 * a, po + 4 * a), range(0, n, step))
    return run, lambda: torch.equal(out, src[idx.long()])


def probe_gather(mb: float=1, n: int=1 << 24, repeats: int=5) -> dict:
    """Gather rate of the CPU (G elements/s, median; see `gather_kernel`): the limit of kernels made of gathers (the
    cross-view check reads four source depths per (pixel, source) pair). {} without a C compiler."""
    k = gather_kernel(mb, n)
    if k is None: return {}
    run, check = k
    run(); assert check()
    times = []
    for _ in range(repeats):
        t = time.perf_counter(); run(); times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return dict(gather_mb=mb, gather_s=med, gather_geps=n / med / 1e9, gather_best_geps=n / min(times) / 1e9)


# ------------------------------------------------------------------------------------------------ timing and the runner
def _fmt_bytes(x) -> str: return f"{x / 1e6:.0f} MB" if x < 1e9 else f"{x / 1e9:.2f} GB"


class Bench:
    "One benchmark script's run: arguments, machine, hardware bounds, the measured rows, the table and the JSON."

    def __init__(self, name: str, args, describe: str=""):
        import torch
        self.name, self.args, self.describe = name, args, describe
        if args.threads: torch.set_num_threads(args.threads)
        self.device = resolve_device(args.device)
        self.rows: list[dict] = []
        self.reset_ok = can_reset_peak()
        self.t0 = time.perf_counter()
        self.machine = machine_info(self.device)
        self.bounds = None

    # -- measurement
    def measure(self, fn, repeats: int|None=None, warmup: int=1, setup=None, max_warm_s: float=0.25) -> dict:
        """Run `fn()` (after `setup()` each time when given, untimed): warm-up calls, then `repeats` timed ones.
        A warm-up call slower than `max_warm_s` counts as the first timed repeat (the big cases stay affordable; on
        the CPU nothing is cached between calls, so the first call is representative)."""
        import torch
        repeats = repeats or self.args.repeats
        cuda = self.device.startswith("cuda")
        self.last_output = None  # the previous measurement's result is not kept alive through this one
        gc_collect()
        if cuda: torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); gpu0 = torch.cuda.memory_allocated()
        rss0 = rss_mb(); reset = reset_peak_rss() if self.reset_ok else False
        times, out, i = [], None, 0
        while len(times) < repeats:
            out = None  # drop the previous result before the next call (its memory is not this call's)
            arg = setup() if setup is not None else None
            sync(self.device)
            t = time.perf_counter()
            out = fn(arg) if setup is not None else fn()
            sync(self.device)
            dt = time.perf_counter() - t
            if i >= warmup or dt > max_warm_s: times.append(dt)
            i += 1
        res = dict(times=times, median_s=statistics.median(times), min_s=min(times), repeats=len(times),
                   peak_rss_mb=peak_rss_mb(), rss_before_mb=rss0)
        res["rss_delta_mb"] = res["peak_rss_mb"] - rss0 if (reset or not self.reset_ok) else None
        if not reset and self.reset_ok: res["peak_rss_mb"] = None  # the reset failed this time: no per-case number
        if cuda:
            res["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
            res["gpu_delta_mb"] = (torch.cuda.max_memory_allocated() - gpu0) / 2 ** 20
        self.last_output = out
        return res

    def add(self, measured: dict|None=None, **fields) -> dict:
        """Record a row. Derived fields: `throughput` = `work` / median (unit `unit`), and with `bytes` / `flops`
        the achieved GB/s / GFLOP/s and their fraction of the probe's limit (`bw_frac`, `flop_frac`)."""
        row = dict(fields)
        if measured: row.update({k: v for k, v in measured.items()})
        med = row.get("median_s")
        if med:
            if row.get("work") is not None: row["throughput"] = row["work"] / med
            b = self.hw()
            if not b: pass  # the probe itself: no bound yet
            elif row.get("bytes"):
                row["gbps"] = row["bytes"] / med / 1e9
                row["bw_frac"] = row["gbps"] / b["bandwidth_gbps"]
            if b and row.get("flops"):
                row["gflops"] = row["flops"] / med / 1e9
                row["flop_frac"] = row["gflops"] / b["gflops"]
        self.rows.append(row)
        return row

    def hw(self) -> dict:
        if self.bounds is None: self.bounds = hardware_bounds(self.device)
        return self.bounds

    # -- ratios
    def speedups(self, key: tuple, impl: str="mvsnb", baseline: str="baseline") -> list[dict]:
        "For every case present with both implementations: baseline median / mvsnb median (and the memory ratio)."
        out = []
        for r in self.rows:
            if r.get("impl") != impl: continue
            b = next((x for x in self.rows if x.get("impl") == baseline and all(x.get(k) == r.get(k) for k in key)), None)
            if b is None: continue
            s = dict({k: r.get(k) for k in key}, speedup=b["median_s"] / r["median_s"], mvsnb_s=r["median_s"], baseline_s=b["median_s"])
            if r.get("rss_delta_mb") and b.get("rss_delta_mb"): s["memory_ratio"] = b["rss_delta_mb"] / max(r["rss_delta_mb"], 1e-3)
            r["speedup"] = s["speedup"]
            out.append(s)
        return out

    # -- output
    def table(self, columns: list, rows: list|None=None, title: str|None=None):
        "Print rows as a fixed-width table; `columns` are (header, key or callable, format)."
        rows = self.rows if rows is None else rows
        if title: print(f"\n{title}")
        cells = [[_cell(r, key, fmt) for _, key, fmt in columns] for r in rows]
        widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (h, _, _) in enumerate(columns)]
        print("  ".join(h.rjust(w) for (h, _, _), w in zip(columns, widths)))
        for c in cells: print("  ".join(x.rjust(w) for x, w in zip(c, widths)))
        sys.stdout.flush()

    def write(self, summary: list|None=None, notes: list|None=None, **extra) -> Path:
        "Write benchmarks/out/<name>.json (or --out): machine, bounds, arguments, rows, summary (headline ratios)."
        out = Path(self.args.out) if self.args.out else OUT / f"{self.name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        m = dict(self.machine, loadavg_after=list(os.getloadavg()), uptime_after=uptime_text())
        doc = dict(benchmark=self.name, describe=self.describe, machine=m, hardware_bounds=self.hw(),
                   args={k: v for k, v in vars(self.args).items() if k != "case"}, peak_rss_method=self.rss_method(),
                   wall_s=time.perf_counter() - self.t0, rows=self.rows, summary=summary or [], notes=notes or [], **extra)
        out.write_text(json.dumps(_json_safe(doc), indent=1))
        print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out} ({doc['wall_s']:.0f} s; load average "
              f"{' '.join(f'{x:.2f}' for x in m['loadavg_after'])})", flush=True)
        return out

    def rss_method(self) -> str:
        if getattr(self.args, "isolate", False): return "each case in a fresh process: ru_maxrss / VmHWM of that process"
        if self.reset_ok: return "VmHWM reset through /proc/self/clear_refs before each case (in-process)"
        return "no reset possible: cases run in fresh processes"


_LIBC = None


def gc_collect():
    "Free what Python and glibc hold: garbage, then `malloc_trim(0)`, so that a case's pages count as its own."
    global _LIBC
    import gc; gc.collect()
    if _LIBC is None:
        try:
            import ctypes; _LIBC = ctypes.CDLL("libc.so.6")
        except OSError: _LIBC = False
    if _LIBC: _LIBC.malloc_trim(0)


def _cell(row, key, fmt) -> str:
    v = key(row) if callable(key) else row.get(key)
    if v is None: return "-"
    if fmt == "bytes": return _fmt_bytes(v)
    try: return format(v, fmt) if fmt else str(v)
    except (TypeError, ValueError): return str(v)


def _json_safe(x):
    import math
    if isinstance(x, dict): return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)): return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x): return None
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        try: return x.item()
        except (ValueError, AttributeError): pass
    return x


def parser(doc: str, repeats: int=3) -> argparse.ArgumentParser:
    "The command line every benchmark script shares."
    ap = argparse.ArgumentParser(description=doc.strip().split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(doc.strip().split("\n")[1:]))
    ap.add_argument("--full", action="store_true", help="the full size sweep (make bench FULL=1)")
    ap.add_argument("--smoke", action="store_true", help="smallest size, 1 repeat: a seconds-long check that the script runs")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    ap.add_argument("--repeats", type=int, default=repeats, help="timed runs per case (median reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--isolate", action="store_true", help="run every case in a fresh process (peak RSS from ru_maxrss)")
    ap.add_argument("--out", default="", help="JSON file to write (default benchmarks/out/<script>.json)")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    return ap


def run_cases(bench: Bench, cases: list[dict], run_case) -> list[dict]:
    """Run every case: in this process (peak RSS by VmHWM reset), or each in a fresh subprocess of the calling script
    (`--isolate`, or when the reset is impossible). `run_case(spec, bench)` adds rows to `bench.rows`."""
    isolate = bench.args.isolate or not bench.reset_ok
    for spec in cases:
        label = spec.get("label") or json.dumps(spec)
        t = time.perf_counter()
        if not isolate:
            n0 = len(bench.rows)
            run_case(spec, bench)
            new = bench.rows[n0:]
        else:
            new = _run_isolated(bench, spec)
            bench.rows.extend(new)
        print(f"   {label}: {time.perf_counter() - t:.1f} s  " +
              "; ".join(f"{r.get('impl', '')} {r.get('op', '')} {r['median_s']:.4g} s".replace("  ", " ")
                        for r in new if r.get("median_s") is not None), flush=True)
    return bench.rows


def _run_isolated(bench: Bench, spec: dict) -> list[dict]:
    script = Path(sys.argv[0]).resolve()
    cmd = [sys.executable, str(script), "--case", json.dumps(spec), "--device", bench.device, "--repeats", str(bench.args.repeats)]
    if bench.args.threads: cmd += ["--threads", str(bench.args.threads)]
    if bench.args.full: cmd += ["--full"]
    if bench.args.smoke: cmd += ["--smoke"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0: raise RuntimeError(f"case {spec} failed:\n{p.stderr[-3000:]}")
    rows = json.loads(p.stdout.strip().splitlines()[-1])
    for r in rows:  # the process's own peak: everything it held, imports included
        r["rss_delta_mb"] = r.get("peak_rss_mb", 0) - r.get("rss_before_mb", 0)
    return rows


def case_worker(bench: Bench, run_case):
    "The `--case` entry point of an isolated run: run one case, print its rows as one JSON line."
    spec = json.loads(bench.args.case)
    bench.reset_ok = False  # a fresh process: its ru_maxrss / VmHWM is already this case's own
    run_case(spec, bench)
    print(json.dumps(_json_safe(bench.rows)))


def main(name: str, doc: str, make_cases, run_case, report, repeats: int=3, argv=None, extra_args=None, bounds: bool=True):
    """Standard `main` of a benchmark script: parse, print the machine, run the cases, `report(bench)` prints tables
    and returns (summary, notes, extra) for the JSON."""
    ap = parser(doc, repeats)
    if extra_args: extra_args(ap)
    args = ap.parse_args(argv)
    if args.smoke: args.repeats = 1
    bench = Bench(name, args, " ".join(doc.strip().split("\n\n")[0].split()))  # the docstring's first paragraph
    if args.case is not None: return case_worker(bench, run_case)
    print_machine(bench.machine, f"{name}: {bench.describe}")
    if bounds:
        b = bench.hw()
        print(f"   hardware bounds ({b['source']}): copy {b['bandwidth_gbps']:.1f} GB/s, matmul {b['gflops']:.1f} GFLOP/s", flush=True)
    else: bench.bounds = {}
    cases = make_cases(args, bench.device)
    run_cases(bench, cases, run_case)
    summary, notes, extra = report(bench)
    for n in notes or []: print(f"   note: {n}")
    return bench.write(summary, notes, **(extra or {}))
