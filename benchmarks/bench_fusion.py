"""Fusion of depth maps into a coloured PLY: `mvsnb.fusion.fuse` (batched cross-view check + back-projection) and
`mvsnb.io.write_ply`, against the public MVSNet-family fusion scripts' approach.

Inputs are those of `bench_crossview.py` (`make_inputs`: ray-cast depth maps of a synthetic scene with noise,
wrong-match blocks and random confidences, DTU-like cameras, 10 sources per view from `select_pairs`; cached in
benchmarks/out/), plus random colour images. Both sides use the evaluation-fusion thresholds (1 px, 0.01, >= 3
views, confidence > 0.8) and write float32 xyz + uint8 RGB.

The baseline is the public scripts' pipeline written here: `bench_crossview.baseline_check` (a loop over
(reference, source) pairs with float64 numpy and `cv2.remap`), then per view a numpy back-projection of the kept
pixels and their colours, then `bench_ply.baseline_write_ply` (the per-point tuple loop).

Sweeps: views 5 -> 49 at 128x160 and map size 128x160 -> 256x320 at 13 views (--full: 49 views at 512x640 and 13
views at 1200x1600, baseline once per size). Bandwidth model: every depth, confidence and colour pixel read once,
every (pixel, source) pair reads one source depth sample, every fused point written twice (assembled, then to the
file), 4 bytes per value.

    python benchmarks/bench_fusion.py [--full] [--baseline-repeats N]
"""
from __future__ import annotations
import tempfile, shutil
from pathlib import Path
import _common as C

_TMP = None


def make_cases(args, device):
    grid = [(5, 128, 160), (13, 128, 160), (25, 128, 160), (49, 128, 160), (13, 256, 320)]
    if args.full: grid += [(13, 512, 640), (49, 512, 640), (13, 1200, 1600)]
    if args.smoke: grid = [(5, 64, 80)]
    return [dict(label=f"{V} views {H}x{W} {impl}", V=V, H=H, W=W, impl=impl) for V, H, W in grid for impl in ("mvsnb", "baseline")]


def load(V, H, W):
    "bench_crossview's cached inputs (made at the largest size that is cheap, resized) and random colour images."
    import numpy as np
    from bench_crossview import make_inputs, load_inputs
    num_src = min(10, V - 1)
    z = load_inputs(make_inputs(V, H, W, num_src))
    z["images"] = np.random.default_rng(V).integers(0, 256, (V, 3, H, W), dtype=np.uint8)
    return z


def baseline_fuse(z: dict, path):
    "The public scripts' fusion: per-pair numpy check, per-view numpy back-projection, tuple-loop PLY."
    import numpy as np
    from bench_crossview import baseline_check
    from bench_ply import baseline_write_ply
    masks, depths = baseline_check(z)
    H, W = masks.shape[1:]
    xs, ys = np.meshgrid(np.arange(W), np.arange(H))
    pts, cols = [], []
    for v in range(len(masks)):
        m = masks[v]
        d = depths[v][m]
        xyz_cam = np.linalg.inv(z["K"][v].astype(np.float64)) @ (np.vstack([xs[m], ys[m], np.ones_like(xs[m])]) * d)
        xyz_world = np.linalg.inv(z["w2c"][v].astype(np.float64)) @ np.vstack([xyz_cam, np.ones_like(xyz_cam[:1])])
        pts.append(xyz_world[:3].T.astype(np.float32))
        cols.append(z["images"][v].transpose(1, 2, 0)[m])
    pts, cols = np.concatenate(pts), np.concatenate(cols)
    baseline_write_ply(path, pts, cols)
    return len(pts)


def mvsnb_fuse(z: dict, path, device="cpu"):
    "mvsnb: `fuse` on `device` (inputs moved there first, as a pipeline holding them there would have them), `write_ply`."
    import torch
    from mvsnb.fusion import fuse
    from mvsnb.io import write_ply
    pts, cols, _ = fuse(z["t_depth"], z["t_conf"], z["t_images"], z["t_K"], z["t_w2c"], z["pairs"])
    write_ply(path, pts.cpu().numpy(), colors=(cols * 255).round().to(torch.uint8).cpu().numpy())
    return len(pts)


def to_device(z: dict, device):
    import torch
    z["t_depth"], z["t_conf"] = torch.from_numpy(z["depth"])[:, None].to(device), torch.from_numpy(z["conf"])[:, None].to(device)
    z["t_K"], z["t_w2c"] = torch.from_numpy(z["K"]).float().to(device), torch.from_numpy(z["w2c"]).float().to(device)
    z["t_images"] = (torch.from_numpy(z["images"]).float() / 255).to(device)
    z["pairs"] = [(r, [(int(s), 1.0) for s in z["src"][r]]) for r in range(len(z["depth"]))]
    return z


def run_case(spec, bench):
    global _TMP
    if _TMP is None: _TMP = Path(tempfile.mkdtemp(prefix="mvsnb_bench_fusion_"))
    V, H, W = spec["V"], spec["H"], spec["W"]
    z = load(V, H, W)
    S = z["src"].shape[1]
    path = _TMP / f"{spec['impl']}.ply"
    if spec["impl"] == "mvsnb": to_device(z, bench.device)
    fn = (lambda z, path: mvsnb_fuse(z, path, bench.device)) if spec["impl"] == "mvsnb" else baseline_fuse
    reps = bench.args.baseline_repeats if spec["impl"] == "baseline" and H * W > 256 * 320 else None
    m = bench.measure(lambda: fn(z, path), repeats=reps)
    n = bench.last_output
    px = V * H * W
    bench.add(m, op="fuse to ply", impl=spec["impl"], views=V, num_src=S, size=f"{H}x{W}", points=n,
              bytes=px * (4 + 4 + 3) + px * S * 4 + n * 15 * 2, work=V, unit="views/s")
    path.unlink(missing_ok=True)


def report(bench):
    cols = [("views", "views", ""), ("src", "num_src", ""), ("size", "size", ""), ("impl", "impl", ""),
            ("median s", "median_s", ".3f"), ("runs", "repeats", ""), ("views/s", "throughput", ".2f"),
            ("points", "points", ""), ("GB/s", "gbps", ".3f"), ("bw frac", "bw_frac", ".3f"),
            ("RSS Δ MB", "rss_delta_mb", ".0f"), ("speed-up", "speedup", ".1f")]
    sp = bench.speedups(("views", "size"))
    bench.table(cols, title="fusion to PLY (evaluation-fusion thresholds)")
    global _TMP
    if _TMP is not None: shutil.rmtree(_TMP, ignore_errors=True); _TMP = None
    summary = []
    for s in sp:
        mine = next(r for r in bench.rows if r["impl"] == "mvsnb" and r["views"] == s["views"] and r["size"] == s["size"])
        base = next(r for r in bench.rows if r["impl"] == "baseline" and r["views"] == s["views"] and r["size"] == s["size"])
        s.update(points_mvsnb=mine["points"], points_baseline=base["points"], bw_frac=mine.get("bw_frac"))
    if sp:
        big = max(sp, key=lambda s: s["views"] * int(s["size"].split("x")[0]) ** 2)
        summary.append(dict(kernel="fusion", what=f"fuse + write_ply, {big['views']} views {big['size']}", speedup=big["speedup"],
                            mvsnb_s=big["mvsnb_s"], bw_frac=big["bw_frac"], speedup_range=[min(s["speedup"] for s in sp), max(s["speedup"] for s in sp)]))
    diff = max((abs(s["points_mvsnb"] - s["points_baseline"]) / max(s["points_baseline"], 1) for s in sp), default=0)
    notes = [f"fused point counts of mvsnb and the baseline differ by at most {diff:.2%} (pixels at the 1 px / 1 % thresholds)"]
    return summary, notes, dict(speedups=sp)


def _extra(ap):
    ap.add_argument("--baseline-repeats", type=int, default=1, help="timed runs of the baseline above 256x320")


def main(argv=None):
    return C.main("bench_fusion", __doc__, make_cases, run_case, report, extra_args=_extra, argv=argv)


if __name__ == "__main__":
    main()
