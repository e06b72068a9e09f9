"""Summary of a `make bench` run: one table with every kernel's headline time, speed-up over its naive baseline,
fraction of the hardware limit and memory, and the issue's targets; and one combined JSON
(`benchmarks/out/bench_all.json`) holding the machine, the summary and every script's full JSON.

It reads the JSON files the scripts wrote to benchmarks/out/. `bench_crossview.py` reports no bandwidth
fraction of its own, so it is computed here from its rows and this run's probe: the least data the check must
touch is, per view, its depth and confidence read once and its checked depth, spread (4 bytes each), count
(2 bytes) and mask (1 byte) written once, plus one 4-byte source-depth sample per (pixel, source) pair; the
bound is that many bytes at the probe's copy bandwidth, and the target is "within 3x of the bound".

    python benchmarks/summary.py [--since EPOCH] [--wall SECONDS] [--dir FOLDER] [--out FILE]
"""
from __future__ import annotations
import argparse, json, os, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
ORDER = ["bench_probe", "bench_warp", "bench_train_step", "bench_ply", "bench_fusion", "bench_crossview", "bench_spsr",
         "bench_eval", "bench_patchmatch", "bench_memory"]


def load(since: float, folder: Path=OUT) -> tuple[dict, list]:
    docs, stale = {}, []
    for name in ORDER:
        p = folder / f"{name}.json"
        if not p.is_file(): continue
        if p.stat().st_mtime < since: stale.append(name); continue
        try: docs[name] = json.loads(p.read_text())
        except ValueError: stale.append(name)
    return docs, stale


def crossview_rows(doc: dict, bw_gbps: float|None) -> list[dict]:
    "Headline rows of bench_crossview.json: speed-up over the per-pair numpy loop and the bandwidth-bound fraction."
    rows = doc.get("rows", [])
    out = []
    # the kernel mvsnb runs by default: the native one on the CPU, else the torch.compile'd one (older files: kind "torch")
    mine = ([r for r in rows if r.get("impl") == "native" and not r.get("refs")]
            or [r for r in rows if (r.get("impl") == "compiled" or r.get("kind") == "torch") and not r.get("refs")])
    if mine and bw_gbps:
        main = max(mine, key=lambda r: (r["views"] * r["hw"][0] * r["hw"][1], r.get("threads", 0)))
        V, S, (H, W) = main["views"], main["num_src"], main["hw"]
        nbytes = V * H * W * (4 + 4) + V * S * H * W * 4 + V * H * W * (4 + 4 + 2 + 1)
        bound_s = nbytes / (bw_gbps * 1e9)
        out.append(dict(kernel="crossview", what=f"check {V} views x {S} sources {H}x{W} ({main['impl']}, {main.get('threads')} threads)",
                        mvsnb_s=main["seconds"], bw_frac=bound_s / main["seconds"], bound_s=bound_s, bytes=nbytes,
                        target="within 3x of the bandwidth bound", target_met=main["seconds"] <= 3 * bound_s))
        if main.get("gather_frac"):  # the limit of a kernel made of gathers (not an issue target; reported beside it)
            out.append(dict(kernel="crossview", what=f"  the same: fraction of the gather bound ({main['gathers'] / 1e6:.0f}M gathers)",
                            mvsnb_s=main["seconds"], gather_frac=main["gather_frac"], bound_s=main["gather_bound_s"]))
    base = next((r for r in rows if r.get("kind") == "baseline"), None)
    if base is not None and doc.get("speedup"):
        V, S, (H, W) = base["views"], base["num_src"], base["hw"]
        out.append(dict(kernel="crossview", what=f"check {V} views x {S} sources {H}x{W} vs per-pair numpy", speedup=doc["speedup"],
                        mvsnb_s=base["seconds"] / doc["speedup"], target=">= 10x vs per-pair numpy", target_met=doc["speedup"] >= 10,
                        identical_decisions=doc.get("identical_decisions")))
    big = next((r for r in rows if r.get("refs")), None)
    if big is not None:
        out.append(dict(kernel="crossview", what=f"{big['refs']} reference views at {big['hw'][0]}x{big['hw'][1]}",
                        mvsnb_s=big["seconds"], memory_mb=big["rss_peak_mb"] - big["rss_inputs_mb"]))
    return out


def eval_rows(doc: dict) -> list[dict]:
    out = []
    for s in doc.get("summary", []):
        if s["method"] in ("greedy", "grid") and s.get("speedup_vs_baseline"):
            out.append(dict(kernel="eval", what=f"DTU-style evaluation {s['size'] / 1e6:g}M points ({s['method']} thinning)",
                            mvsnb_s=s["median_s"], speedup=s["speedup_vs_baseline"],
                            memory_mb=(s["peak_rss_mb"] - s["base_rss_mb"]) if s.get("peak_rss_mb") else None))
    big = max((s for s in doc.get("summary", []) if s["method"] == "greedy"), key=lambda s: s["size"], default=None)
    if big is not None and not big.get("speedup_vs_baseline"):
        out.append(dict(kernel="eval", what=f"DTU-style evaluation {big['size'] / 1e6:g}M points (greedy, no baseline)", mvsnb_s=big["median_s"]))
    return out


def fmt(v, f):
    if v is None: return "-"
    if isinstance(v, bool): return "yes" if v else "NO"
    try: return format(v, f)
    except (TypeError, ValueError): return str(v)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--since", type=float, default=0.0, help="ignore JSON files older than this (epoch seconds)")
    ap.add_argument("--wall", type=float, default=None, help="wall time of the whole run, seconds (recorded)")
    ap.add_argument("--load-before", default=None, help="uptime line before the run (recorded)")
    ap.add_argument("--dir", default=str(OUT), help="folder of the scripts' JSON files")
    ap.add_argument("--out", default=str(OUT / "bench_all.json"))
    a = ap.parse_args(argv)
    docs, stale = load(a.since, Path(a.dir))
    if not docs: sys.exit("no benchmark JSON found in benchmarks/out/ (run make bench)")
    probe = docs.get("bench_probe", {})
    dev = next((d["machine"].get("device") for d in docs.values() if isinstance(d.get("machine"), dict) and d["machine"].get("device")), "cpu")
    bounds = (probe.get("bounds") or {}).get(dev.split(":")[0]) or {}
    bw = bounds.get("bandwidth_gbps")
    rows = []
    for name in ORDER:
        d = docs.get(name)
        if d is None: continue
        if name == "bench_crossview": rows += crossview_rows(d, bw)
        elif name == "bench_eval": rows += eval_rows(d)
        elif name == "bench_probe": continue
        else: rows += d.get("summary", [])
    print(f"\n== summary of the run ({len(docs)} benchmark JSON files" + (f"; stale, not used: {', '.join(stale)}" if stale else "") + ")")
    if bounds: print(f"   hardware bounds on {dev}: copy {bw:.2f} GB/s, matmul {bounds.get('gflops', 0):.1f} GFLOP/s float32 "
                      f"({bounds.get('torch_threads')} torch threads)")
    hdr = ["kernel", "case", "mvsnb s", "speed-up", "bw frac", "flop frac", "gather frac", "memory MB", "target", "met"]
    cells = [[r.get("kernel", ""), r.get("what", ""), fmt(r.get("mvsnb_s"), ".3f"), fmt(r.get("speedup"), ".1f") + ("x" if r.get("speedup") else ""),
              fmt(r.get("bw_frac"), ".3f"), fmt(r.get("flop_frac"), ".3f"), fmt(r.get("gather_frac"), ".2f"), fmt(r.get("memory_mb"), ".0f"),
              r.get("target") or ("8 GB" if r.get("fits_8gb") is not None else ""),
              fmt(r.get("target_met") if r.get("target_met") is not None else r.get("fits_8gb"), "")] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(hdr)]
    print("  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(hdr, widths))))
    for c in cells: print("  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths))))
    for n, d in docs.items():
        for note in d.get("notes", []): print(f"   {n}: {note}")
    machine = probe.get("machine") or next((d["machine"] for d in docs.values() if isinstance(d.get("machine"), dict) and "cpu_model" in d["machine"]), {})
    loads = {n: dict(before=(d.get("machine") or {}).get("loadavg") or (d.get("machine") or {}).get("load_before") or d.get("load_before"),
                     after=(d.get("machine") or {}).get("loadavg_after") or (d.get("machine") or {}).get("load_after") or d.get("load_after"))
             for n, d in docs.items()}
    combined = dict(kind="mvsnb benchmark run", date=time.strftime("%Y-%m-%d %H:%M:%S"), machine=machine, hardware_bounds=bounds,
                    wall_s=a.wall, uptime_before=a.load_before, uptime_after=os.popen("uptime").read().strip(), loadavg=loads,
                    stale_not_used=stale, summary=rows, benchmarks=docs)
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(combined, indent=1))
    print(f"\nwrote {out}" + (f" (whole run {a.wall:.0f} s)" if a.wall else ""))


if __name__ == "__main__":
    main()
