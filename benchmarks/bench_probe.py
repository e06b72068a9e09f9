"""Hardware probe: memory bandwidth (large tensor copy) and FLOP rate (matmul) of this machine, the limits every
other benchmark reports its fraction of.

* bandwidth: `dst.copy_(src)` of float32 tensors from 16 MB up to 256 MB (1 GB with --full), counting the read
  and the write; numpy's `np.copyto` as a second opinion. The bound used by the other scripts is the best median
  among the copies of 64 MB and more (out of cache, so a sustained rate);
* gather rate (CPU): `out[i] = src[idx[i]]` with random int32 indices into float32 arrays of 1 MB (in L2) and
  16 MB (in L3), in C through `mvsnb.native` (AVX2/AVX-512 gathers); the bound is the best median, the limit of
  gather-bound kernels such as the cross-view check;
* FLOP rate: float32 `a @ b` of n x n matrices (n = 256 ... 2048 on the CPU, up to 8192 on a GPU, where TF32 and
  bfloat16 are measured too); the bound is the best float32 median.

On a shared machine both numbers are what this process gets under the current load, which is what the other
scripts get too (the load average is recorded). Writes benchmarks/out/bench_probe.json.

    python benchmarks/bench_probe.py [--full] [--device cuda]
"""
from __future__ import annotations
import statistics, time
import _common as C


def make_cases(args, device):
    cpu = not device.startswith("cuda")
    copies = [16, 64, 256] + ([1024] if args.full else [])
    if not cpu: copies = [64, 256, 1024, 4096]
    mats = [256, 512, 1024] + ([2048] if args.full or not cpu else [])
    if not cpu: mats += [4096, 8192]
    if args.smoke: copies, mats = [16], [256]
    cases = [dict(label=f"copy {mb} MB", op="copy", mb=mb) for mb in copies]
    if cpu: cases += [dict(label=f"numpy copy {copies[-1]} MB", op="numpy_copy", mb=copies[-1])]
    if cpu: cases += [dict(label=f"gather {mb} MB", op="gather", mb=mb) for mb in ([1] if args.smoke else [1, 16])]
    cases += [dict(label=f"matmul {n}", op="matmul", n=n, dtype="float32") for n in mats]
    if not cpu and not args.smoke:
        cases += [dict(label=f"matmul {n} {dt}", op="matmul", n=n, dtype=dt) for n in (4096, 8192) for dt in ("tf32", "bfloat16")]
    return cases


def run_case(spec, bench):
    import numpy as np, torch
    dev = bench.device
    if spec["op"] == "copy":
        n = spec["mb"] * 2 ** 20 // 4
        src = torch.rand(n, device=dev); dst = torch.empty_like(src)
        m = bench.measure(lambda: dst.copy_(src), repeats=max(bench.args.repeats, 5))
        bench.add(m, op="copy", impl="torch", size=f"{spec['mb']} MB", bytes=2 * n * 4, work=2 * n * 4, unit="B/s")
    elif spec["op"] == "numpy_copy":
        n = spec["mb"] * 2 ** 20 // 4
        src = np.random.rand(n).astype(np.float32); dst = np.empty_like(src)
        m = bench.measure(lambda: np.copyto(dst, src), repeats=max(bench.args.repeats, 5))
        bench.add(m, op="copy", impl="numpy", size=f"{spec['mb']} MB", bytes=2 * n * 4, work=2 * n * 4, unit="B/s")
    elif spec["op"] == "gather":
        n = 1 << (20 if bench.args.smoke else 24)
        k = C.gather_kernel(spec["mb"], n)
        if k is None: return  # no C compiler: no gather bound
        run, check = k
        m = bench.measure(run, repeats=max(bench.args.repeats, 5))
        assert check()
        bench.add(m, op="gather", impl="C", size=f"{spec['mb']} MB", gathers=n, work=n, unit="elem/s", geps=n / m["median_s"] / 1e9)
    else:
        n, dt = spec["n"], spec["dtype"]
        old = torch.backends.cuda.matmul.allow_tf32 if dev.startswith("cuda") else None
        if dt == "tf32": torch.backends.cuda.matmul.allow_tf32 = True
        tdt = torch.float32 if dt in ("float32", "tf32") else getattr(torch, dt)
        a = torch.rand(n, n, device=dev, dtype=tdt); b = torch.rand(n, n, device=dev, dtype=tdt)
        m = bench.measure(lambda: a @ b, repeats=max(bench.args.repeats, 5))
        if old is not None: torch.backends.cuda.matmul.allow_tf32 = old
        bench.add(m, op="matmul", impl="torch", size=f"{n}x{n} {dt}", flops=2 * n ** 3, work=2 * n ** 3, unit="FLOP/s", dtype=dt)


def report(bench):
    import torch
    rows = bench.rows
    copies = [r for r in rows if r["op"] == "copy"]
    mats = [r for r in rows if r["op"] == "matmul" and r.get("dtype") == "float32"]
    big = [r for r in copies if r["bytes"] >= 2 * 64 * 2 ** 20 * 0.99] or copies  # out of cache: >= 64 MB copies
    best = max(big, key=lambda r: r["bytes"] / r["median_s"])
    bw = best["bytes"] / best["median_s"] / 1e9
    fl = max(r["flops"] / r["median_s"] / 1e9 for r in mats)
    gathers = [r for r in rows if r["op"] == "gather"]
    bounds = dict(bandwidth_gbps=bw, bandwidth_from=f"{best['impl']} copy of {best['size']} (best median of the copies >= 64 MB)",
                  gflops=fl, gflops_from="best float32 matmul median", torch_threads=torch.get_num_threads())
    if gathers:
        g = max(gathers, key=lambda r: r["geps"])
        bounds.update(gather_geps=g["geps"], gather_from=f"C gather into {g['size']} (best median)")
    for r in rows:
        if r.get("dtype") in ("tf32", "bfloat16"): bounds[f"gflops_{r['dtype']}"] = max(bounds.get(f"gflops_{r['dtype']}", 0), r["flops"] / r["median_s"] / 1e9)
    bench.bounds = dict(bounds, source="this probe")
    for r in rows:  # fractions of this run's own limits
        if r.get("bytes"): r["gbps"] = r["bytes"] / r["median_s"] / 1e9; r["bw_frac"] = r["gbps"] / bw
        if r.get("flops"): r["gflops"] = r["flops"] / r["median_s"] / 1e9; r["flop_frac"] = r["gflops"] / fl
        if r.get("geps"): r["gather_frac"] = r["geps"] / bounds["gather_geps"]
    bench.table([("op", "op", ""), ("impl", "impl", ""), ("size", "size", ""), ("median s", "median_s", ".4g"),
                 ("min s", "min_s", ".4g"), ("GB/s", "gbps", ".2f"), ("GFLOP/s", "gflops", ".1f"),
                 ("G elem/s", "geps", ".2f"), ("frac of bound", lambda r: r.get("bw_frac") or r.get("flop_frac") or r.get("gather_frac"), ".2f"), ("peak RSS MB", "peak_rss_mb", ".0f")],
                title=f"probe on {bench.device} ({torch.get_num_threads()} torch threads)")
    print(f"\nbounds: memory bandwidth {bw:.2f} GB/s ({bounds['bandwidth_from']}), matmul {fl:.1f} GFLOP/s float32")
    summary = [dict(kernel="probe", what="copy bandwidth GB/s", value=bw), dict(kernel="probe", what="matmul GFLOP/s fp32", value=fl)]
    if gathers:
        print(f"        gather {bounds['gather_geps']:.2f} G elements/s ({bounds['gather_from']})")
        summary.append(dict(kernel="probe", what="gather G elements/s", value=bounds["gather_geps"]))
    return summary, [], dict(bounds={bench.device.split(":")[0]: bounds})


def main(argv=None):
    return C.main("bench_probe", __doc__, make_cases, run_case, report, repeats=5, bounds=False, argv=argv)


if __name__ == "__main__":
    main()
