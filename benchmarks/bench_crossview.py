"""The cross-view check (`mvsnb.crossview.cross_view_check`): the eager and the compiled kernel against a naive
per-pair numpy baseline, for 49 views x 10 sources at 512x640 (the issue's target case).

Inputs (`make_inputs`): ray-cast depth maps of a synthetic scene with noise, wrong-match blocks and random
confidences, DTU-like cameras and 10 sources per view from `select_pairs`; cached in benchmarks/out/. The
baseline is written here in the style of the public MVSNet-family fusion scripts: a loop over (reference,
source) pairs with float64 numpy arrays and `cv2.remap` for the bilinear read. All use the evaluation-fusion
thresholds (1 px, 0.01, >= 3 views, confidence > 0.8).

Four implementations run in alternating rounds (baseline, eager, compiled, native, baseline, ...), so that on a shared
machine a burst of load hits all four alike; the medians over the rounds and their ratios are reported. The
compiled kernel's first call (the `torch.compile` of the fused kernel; with --cold-compile in a fresh inductor
cache) and the native C kernel's (its build, or its load from mvsnb's disk cache; --cold-compile: a fresh cache)
are timed separately and left out of their medians. Bandwidth bound: the least data the check must touch,
per view its depth and confidence read once, its checked depth, spread (4 bytes each), count (2) and mask (1)
written once, and one 4-byte source-depth sample per (pixel, source) pair, at the probe's copy bandwidth;
`bw_frac` = bound / median (the target: within 3x, bw_frac >= 1/3). The check is made of gathers, so the
tighter limit is the gather bound: four bilinear reads per checked (pixel, source) pair at the probe's C gather rate
(`bench_probe.py`), `gather_frac` = that bound / median. Decisions are compared pixel by pixel.

Sizes: 49 views x 10 sources at 512x640 (--full: also 256x320 and 13 views at 1200x1600; --smoke: 5 views x 4
sources at 64x80, one round).

    python benchmarks/bench_crossview.py [--full] [--smoke] [--device cpu|cuda] [--repeats N] [--threads N] [--out F]
"""
from __future__ import annotations
import os, statistics, sys, time
from pathlib import Path
import _common as C

ROOT, OUT = C.ROOT, C.OUT
IMPLS = ("baseline", "eager", "compiled", "native")  # "native": mvsnb's C kernel, the CPU default (not on a GPU)


# ---------------------------------------------------------------- inputs
def make_inputs(views: int, H: int, W: int, num_src: int, seed: int = 0) -> Path:
    "Ray-cast depth maps of a synthetic scene, add noise and outliers, random confidences; cached as .npz."
    path = OUT / f"inputs_v{views}_{H}x{W}_s{num_src}_seed{seed}.npz"
    if path.is_file(): return path
    import numpy as np, torch, open3d as o3d
    from mvsnb.synthetic import scene_objects, raycaster, cap_cameras, camera_rays
    from mvsnb.camera import view_selection_scores, select_pairs
    K, w2c = cap_cameras(views, H, W, spacing=8.0)
    rc = raycaster(scene_objects(seed=seed))
    origins, dirs = camera_rays(K, w2c, H, W)
    depth = np.zeros((views, H, W), np.float32)
    for v in range(views):
        rays = torch.cat([origins[v].expand(H * W, 3), dirs[v].reshape(3, -1).T], 1)
        t = rc.cast_rays(o3d.core.Tensor(rays.numpy().astype(np.float32)))["t_hit"].numpy()
        depth[v] = np.where(np.isfinite(t), t, 0).reshape(H, W)
    rng = np.random.default_rng(seed)
    noisy = depth * (1 + 0.003 * rng.standard_normal(depth.shape, dtype=np.float32))
    blobs = rng.random((views, H // 16, W // 16)) < 0.08  # 16x16 blocks pushed 2-20 % away: wrong matches
    blobs = np.kron(blobs, np.ones((16, 16), bool))
    noisy = np.where(blobs, noisy * (1 + rng.uniform(0.02, 0.2, depth.shape)).astype(np.float32), noisy)
    conf = (0.6 + 0.4 * rng.random(depth.shape)).astype(np.float32)
    pairs = select_pairs(view_selection_scores(K, w2c), num_src)
    src = np.array([[s for s, _ in p] for _, p in pairs], np.int64)
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez(path, depth=noisy, conf=conf, K=K.numpy(), w2c=w2c.numpy(), src=src)
    return path


def load_inputs(path: Path, H: int|None = None, W: int|None = None) -> dict:
    "Inputs, optionally resized (bilinear depth, nearest confidence; intrinsics scaled for pixel centres)."
    import numpy as np
    z = dict(np.load(path))
    if H is not None and (H, W) != z["depth"].shape[1:]:
        import torch, torch.nn.functional as F
        from mvsnb.camera import scale_intrinsics
        h0, w0 = z["depth"].shape[1:]
        depth, conf = np.zeros((len(z["depth"]), H, W), np.float32), np.zeros((len(z["depth"]), H, W), np.float32)
        for v in range(len(depth)):  # one view at a time: the peak memory stays that of the outputs
            d = torch.from_numpy(z["depth"][v])[None, None]
            # resample depth without blending in the zeros of missed rays
            num = F.interpolate(d, size=(H, W), mode="bilinear", align_corners=False)
            den = F.interpolate((d > 0).float(), size=(H, W), mode="bilinear", align_corners=False)
            depth[v] = torch.where(den > 0.999, num / den.clamp(min=1e-6), torch.zeros_like(num))[0, 0].numpy()
            conf[v] = F.interpolate(torch.from_numpy(z["conf"][v])[None, None], size=(H, W), mode="nearest")[0, 0].numpy()
        z["depth"], z["conf"] = depth, conf
        z["K"] = scale_intrinsics(torch.from_numpy(z["K"]), W / w0, H / h0).numpy()
    return z


# ---------------------------------------------------------------- the naive baseline (per pair, float64, cv2.remap)
def baseline_pair(depth_ref, K_ref, w2c_ref, depth_src, K_src, w2c_src):
    "One (reference, source) round trip the way the public scripts do it: (consistent mask, reprojected depth)."
    import numpy as np, cv2
    H, W = depth_ref.shape
    xs, ys = np.meshgrid(np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64))
    pix = np.stack([xs.ravel(), ys.ravel(), np.ones(H * W)])
    X_ref = np.linalg.inv(K_ref) @ (pix * depth_ref.ravel().astype(np.float64))
    T = w2c_src.astype(np.float64) @ np.linalg.inv(w2c_ref.astype(np.float64))
    X_src = T[:3, :3] @ X_ref + T[:3, 3:]
    q = K_src @ X_src
    with np.errstate(divide="ignore", invalid="ignore"):
        u_src, v_src = (q[0] / q[2]).reshape(H, W), (q[1] / q[2]).reshape(H, W)
        d_src = cv2.remap(depth_src, u_src.astype(np.float32), v_src.astype(np.float32), interpolation=cv2.INTER_LINEAR)
        Y_src = np.linalg.inv(K_src) @ (np.stack([u_src.ravel(), v_src.ravel(), np.ones(H * W)]) * d_src.ravel().astype(np.float64))
        Ti = np.linalg.inv(T)
        Y_ref = Ti[:3, :3] @ Y_src + Ti[:3, 3:]
        p = K_ref @ Y_ref
        u_back, v_back = (p[0] / p[2]).reshape(H, W), (p[1] / p[2]).reshape(H, W)
        depth_back = Y_ref[2].reshape(H, W)
        dist = np.sqrt((u_back - xs) ** 2 + (v_back - ys) ** 2)
        rel = np.abs(depth_back - depth_ref) / depth_ref
        mask = (dist < 1.0) & (rel < 0.01)
    return mask, depth_back


def baseline_check(z: dict, min_views: int = 3, tau_conf: float = 0.8):
    import numpy as np
    V = z["depth"].shape[0]
    masks, depths = [], []
    for r in range(V):
        count = np.zeros(z["depth"].shape[1:], np.int64)
        total = z["depth"][r].astype(np.float64).copy()
        for s in z["src"][r]:
            m, d_back = baseline_pair(z["depth"][r], z["K"][r], z["w2c"][r], z["depth"][s], z["K"][s], z["w2c"][s])
            count += m
            total += np.where(m, d_back, 0)
        keep = (count >= min_views) & (z["conf"][r] > tau_conf) & (z["depth"][r] > 0)
        masks.append(keep); depths.append(np.where(keep, total / (count + 1), 0))
    return np.stack(masks), np.stack(depths)


# ---------------------------------------------------------------- the benchmark
def make_cases(args, device):
    grid = [(49, 10, 512, 640)]
    if args.full: grid = [(49, 10, 256, 320)] + grid + [(13, 10, 1200, 1600)]
    if args.smoke: grid = [(5, 4, 64, 80)]
    return [dict(label=f"{V} views x {S} sources {H}x{W}", V=V, S=S, H=H, W=W) for V, S, H, W in grid]


def _inputs(spec):
    "Cached inputs at this size: made at 512x640 (or the size itself when smaller) and resized."
    V, S, H, W = spec["V"], spec["S"], spec["H"], spec["W"]
    h0, w0 = (H, W) if H * W <= 512 * 640 else (512, 640)
    return load_inputs(make_inputs(V, h0, w0, S), H, W)


def min_bytes(V: int, S: int, H: int, W: int) -> int:
    "The data the check must touch (see the module docstring)."
    return V * H * W * (4 + 4) + V * S * H * W * 4 + V * H * W * (4 + 4 + 2 + 1)


def run_case(spec, bench):
    import numpy as np, torch
    import mvsnb.crossview as cv
    V, S, H, W = spec["V"], spec["S"], spec["H"], spec["W"]
    z = _inputs(spec)
    dev = bench.device
    d, c = torch.from_numpy(z["depth"])[:, None].to(dev), torch.from_numpy(z["conf"])[:, None].to(dev)
    K, w2c = torch.from_numpy(z["K"]).float().to(dev), torch.from_numpy(z["w2c"]).float().to(dev)
    pairs = [(r, [(int(s), 1.0) for s in z["src"][r]]) for r in range(V)]
    impls = [k for k in IMPLS if not (k == "native" and torch.device(dev).type != "cpu")]
    cfgs = dict(eager=cv.CrossViewConfig.preset("eval_fusion", compile=False),
                compiled=cv.CrossViewConfig.preset("eval_fusion", compile=True, native=False),  # torch.compile
                native=cv.CrossViewConfig.preset("eval_fusion", compile=True))
    import cv2
    from mvsnb.crossview import cross_view_check
    cv2.setNumThreads(torch.get_num_threads())

    def call(impl):
        if impl == "baseline": return baseline_check(z)
        r = cross_view_check(d, c, K, w2c, pairs, cfgs[impl])
        C.sync(dev)
        return r.mask[:, 0].cpu().numpy(), r.depth[:, 0].cpu().numpy()

    # the compiled kernel's first call: compile (and a first run), timed on its own
    n_log = len(cv._COMPILE_LOG)
    t = time.perf_counter(); call("compiled"); first = time.perf_counter() - t
    print(f"   compiled kernel, first call (compile included): {first:.1f} s", flush=True)
    compiled_ok = cv._COMPILED.get(torch.device(dev).type) is not None
    compile_s = sum(x["first_call_s"] for x in cv._COMPILE_LOG[n_log:])
    first_native = None
    if "native" in impls:  # the native kernel's first call: build (or load from the disk cache) and a first run
        t = time.perf_counter(); call("native"); first_native = time.perf_counter() - t
        print(f"   native kernel, first call (build included): {first_native:.1f} s", flush=True)
    native_ok = cv._NATIVE.get("fn") is not None
    times = {k: [] for k in impls}; rss = {k: [] for k in impls}; out = {}
    rounds = bench.args.repeats
    base_rounds = min(rounds, bench.args.baseline_repeats or rounds)
    for i in range(rounds):
        for impl in impls:
            if impl == "baseline" and i >= base_rounds: continue
            C.gc_collect(); r0 = C.rss_mb(); reset = C.reset_peak_rss()
            t = time.perf_counter(); res = call(impl); times[impl].append(time.perf_counter() - t)
            if reset: rss[impl].append(C.peak_rss_mb() - r0)
            out[impl] = res; res = None
        print(f"   round {i + 1}/{rounds}: " + ", ".join(f"{k} {times[k][-1]:.3f} s" for k in impls if len(times[k]) > i), flush=True)
    nbytes = min_bytes(V, S, H, W)
    bound = bench.hw().get("bandwidth_gbps")
    valid = z["depth"] > 0
    geps = bench.hw().get("gather_geps")  # the check is made of gathers: four bilinear reads per checked (pixel, source) pair
    gathers = 4 * int((valid & (z["conf"] > 0.8)).sum()) * S
    for impl in impls:
        med = statistics.median(times[impl])
        mask = out[impl][0]
        row = dict(op="cross-view check", impl=impl, kind={"baseline": "baseline", "eager": "torch eager", "compiled": "torch.compile", "native": "C"}[impl],
                   views=V, num_src=S, hw=[H, W], size=f"{H}x{W}", threads=torch.get_num_threads(), device=dev,
                   times=times[impl], median_s=med, min_s=min(times[impl]), repeats=len(times[impl]), seconds=med,
                   rss_delta_mb=max(rss[impl]) if rss[impl] else None, bytes=nbytes, work=V, unit="views/s",
                   kept=float(mask.mean()), kept_of_valid=float(mask[valid].mean()))
        if impl == "compiled":
            row.update(first_call_s=first, compile_s=compile_s, compiled=compiled_ok)
        if impl == "native":
            row.update(first_call_s=first_native, compiled=native_ok)
        if bound: row["bound_s"] = nbytes / (bound * 1e9)
        if geps:
            row["gathers"] = gathers
            row["gather_bound_s"] = gathers / (geps * 1e9)
            row["gather_frac"] = row["gather_bound_s"] / med
        for other in impls:
            if other != impl: row[f"same_decisions_vs_{other}"] = float((out[other][0] == mask).mean())
        both = out["baseline"][0] & mask
        if impl != "baseline" and both.any():
            b = out["baseline"][1][both]
            row["max_rel_depth_diff_vs_baseline"] = float(np.abs(out[impl][1][both] - b).max() / np.abs(b).max())
        bench.add(row)


def report(bench):
    rows = bench.rows
    for r in rows:
        b = next((x for x in rows if x["impl"] == "baseline" and x["size"] == r["size"] and x["views"] == r["views"]), None)
        if b is not None:
            r["speedup"] = b["median_s"] / r["median_s"]
            # the ratio within each round (they ran back to back): robust when the machine's load changes between rounds
            r["speedup_per_round"] = [tb / t for tb, t in zip(b["times"], r["times"])]
            r["speedup_round_median"] = statistics.median(r["speedup_per_round"])
        e = next((x for x in rows if x["impl"] == "eager" and x["size"] == r["size"] and x["views"] == r["views"]), None)
        if e is not None:
            r["speedup_vs_eager"] = e["median_s"] / r["median_s"]
            r["speedup_vs_eager_round_median"] = statistics.median(te / t for te, t in zip(e["times"], r["times"]))
    cols = [("views", "views", ""), ("src", "num_src", ""), ("size", "size", ""), ("impl", "impl", ""),
            ("median s", "median_s", ".3f"), ("runs", "repeats", ""), ("first call s", "first_call_s", ".1f"),
            ("bound s", "bound_s", ".3f"), ("bw frac", "bw_frac", ".3f"), ("gather bound s", "gather_bound_s", ".3f"), ("gather frac", "gather_frac", ".2f"), ("RSS Δ MB", "rss_delta_mb", ".0f"),
            ("kept", "kept_of_valid", ".3f"), ("same as baseline", "same_decisions_vs_baseline", ".5f"),
            ("same as eager", "same_decisions_vs_eager", ".5f"), ("vs eager", "speedup_vs_eager", ".2f"), ("speed-up", "speedup", ".1f"),
            ("per-round speed-up", "speedup_round_median", ".1f")]
    bench.table(cols, title="cross-view check, evaluation-fusion thresholds (speed-up: baseline median / median, same rounds)")
    summary, notes = [], []
    mine = [r for r in rows if r["impl"] == "native"] or [r for r in rows if r["impl"] == "compiled"]  # what mvsnb runs by default
    head = max(mine, key=lambda r: r["views"] * r["hw"][0] * r["hw"][1]) if mine else None
    if head is not None:
        summary.append(dict(kernel="crossview", what=f"check {head['views']} views x {head['num_src']} sources {head['size']} ({head['impl']})",
                            mvsnb_s=head["median_s"], speedup=head.get("speedup"), speedup_vs_eager=head.get("speedup_vs_eager"),
                            speedup_round_median=head.get("speedup_round_median"), speedup_per_round=head.get("speedup_per_round"),
                            bw_frac=head.get("bw_frac"), bound_s=head.get("bound_s"), compile_s=head.get("compile_s"),
                            gather_frac=head.get("gather_frac"), gather_bound_s=head.get("gather_bound_s"),
                            identical_decisions=head.get("same_decisions_vs_baseline"),
                            identical_decisions_vs_eager=head.get("same_decisions_vs_eager"),
                            target=">= 10x vs per-pair numpy, within 3x of the bandwidth bound, >= 99.9 % same decisions",
                            target_met=bool((head.get("speedup") or 0) >= 10 and (head.get("bw_frac") or 0) >= 1 / 3
                                            and (head.get("same_decisions_vs_baseline") or 0) >= 0.999)))
        if not head.get("compiled"): notes.append(f"the {head['impl']} kernel was not available or failed: its rows ran the eager kernel")
    notes.append("rounds alternate baseline / eager / compiled (torch.compile) / native (C, the CPU default); the compiled and native medians exclude "
                 "their first call (compile or build), reported as 'first call s'; "
                 "'speed-up' is the ratio of the medians, 'per-round speed-up' the median of the ratios within each round")
    extra = {}
    if head is not None:  # the fields summary.py reads from this file
        extra = dict(speedup=head.get("speedup"), identical_decisions=head.get("same_decisions_vs_baseline"))
    return summary, notes, extra


def _extra(ap):
    ap.add_argument("--baseline-repeats", type=int, default=0, help="rounds in which the baseline runs (0: every round)")
    ap.add_argument("--cold-compile", action="store_true", help="compile in a fresh inductor cache (the first call's time is a cold compile)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--cold-compile" in argv and "--case" not in argv:
        import tempfile
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="mvsnb_inductor_")
        os.environ["MVSNB_CACHE"] = tempfile.mkdtemp(prefix="mvsnb_cache_")  # the native kernel is built cold too
    return C.main("bench_crossview", __doc__, make_cases, run_case, report, extra_args=_extra, argv=argv)


if __name__ == "__main__":
    main()
