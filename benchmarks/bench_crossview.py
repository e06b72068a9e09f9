"""Benchmark of `mvsnb.crossview.cross_view_check` against a naive per-pair numpy baseline.

Usage (from the repository root):

    .venv/bin/python benchmarks/bench_crossview.py            # 49 views x 10 sources at 512x640, baseline at 256x320
    .venv/bin/python benchmarks/bench_crossview.py --quick    # a small smoke run (~20 s)

Each measured run happens in its own subprocess, so the peak resident memory it reports
(`resource.getrusage(...).ru_maxrss`, which sees torch's allocations unlike tracemalloc) belongs to that run
alone. `rss_inputs_mb` is the peak after loading the inputs, `rss_peak_mb` the peak at the end; their
difference is the working memory of the check. The baseline is written here in the style of the public
MVSNet-family fusion scripts: a loop over (reference, source) pairs with float64 numpy arrays and
`cv2.remap` for the bilinear read. Both use the evaluation-fusion thresholds (1 px, 0.01, >= 3 views,
confidence > 0.8). Results: a table on stdout and `benchmarks/out/bench_crossview.json`.
"""
from __future__ import annotations
import argparse, json, os, resource, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


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


# ---------------------------------------------------------------- workers (one subprocess each)
def worker(args) -> dict:
    import numpy as np
    z = load_inputs(Path(args.data), *(args.hw or (None, None)))
    out = dict(kind=args.worker, views=int(z["depth"].shape[0]), num_src=int(z["src"].shape[1]), hw=list(z["depth"].shape[1:]))
    if args.worker == "baseline":
        import cv2
        cv2.setNumThreads(args.threads)
        out["rss_inputs_mb"] = _maxrss_mb()
        t, c = time.perf_counter(), time.process_time()
        mask, depth = baseline_check(z)
        out["seconds"], out["cpu_seconds"] = time.perf_counter() - t, time.process_time() - c
        out["threads"] = args.threads
    else:
        import torch
        torch.set_num_threads(args.threads)
        from mvsnb.crossview import cross_view_check, CrossViewConfig
        d, c = torch.from_numpy(z["depth"])[:, None], torch.from_numpy(z["conf"])[:, None]
        K, w2c = torch.from_numpy(z["K"]).float(), torch.from_numpy(z["w2c"]).float()
        pairs = [(r, [(int(s), 1.0) for s in z["src"][r]]) for r in range(len(d))]
        cfg = CrossViewConfig.preset("eval_fusion", skip_low_conf=not args.no_skip)
        out["skip_low_conf"] = cfg.skip_low_conf
        out["rss_inputs_mb"] = _maxrss_mb()
        t, t_cpu = time.perf_counter(), time.process_time()
        # with --refs: only the first `refs` reference views (time per view and memory at high resolution)
        res = cross_view_check(d, c, K, w2c, pairs, cfg, views=list(range(args.refs)) if args.refs else None)
        out["seconds"], out["cpu_seconds"] = time.perf_counter() - t, time.process_time() - t_cpu
        if args.refs:
            out["refs"] = args.refs
            mask = depth = None
        else:
            mask, depth = res.mask[:, 0].numpy(), res.depth[:, 0].numpy()
            out["kept_fraction_mean"] = float(res.kept_fraction.mean())
        out["threads"] = torch.get_num_threads()
    out["rss_peak_mb"] = _maxrss_mb()
    if mask is not None and args.save: np.savez_compressed(args.save, mask=mask, depth=depth)
    return out


def run_worker(kind: str, data: Path, hw=None, threads=2, refs=0, save=None, no_skip=False) -> dict:
    # PASSIVE: idle OpenMP threads sleep instead of spinning; on a shared, loaded machine spinning threads lose
    # their time slices and a 2-thread run can be 10-30x slower than a 1-thread one (set OMP_WAIT_POLICY to override)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cmd = [sys.executable, __file__, "--worker", kind, "--data", str(data), "--threads", str(threads), "--refs", str(refs)]
    if hw: cmd += ["--hw", str(hw[0]), str(hw[1])]
    if save: cmd += ["--save", str(save)]
    if no_skip: cmd += ["--no-skip"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0: raise RuntimeError(f"worker {kind} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--views", type=int, default=49); ap.add_argument("--num-src", type=int, default=10)
    ap.add_argument("--hw", type=int, nargs=2, default=None, help="size of the main torch run (default 512 640)")
    ap.add_argument("--base-hw", type=int, nargs=2, default=None, help="size of the baseline comparison (default 256 320)")
    ap.add_argument("--big-refs", type=int, default=None, help="reference views checked at 1200x1600 for memory (default 2, 0 = skip)")
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="torch threads of the main run (one run each); the first is used for the rest")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS); ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--refs", type=int, default=0, help=argparse.SUPPRESS); ap.add_argument("--save", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-skip", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.threads = args.threads[0]
        print(json.dumps(worker(args))); return
    sys.path.insert(0, str(ROOT))
    import numpy as np
    views, num_src = (10, 5) if args.quick else (args.views, args.num_src)
    hw = tuple(args.hw or ((128, 160) if args.quick else (512, 640)))
    base_hw = tuple(args.base_hw or ((64, 80) if args.quick else (256, 320)))
    big_refs = (0 if args.quick else 2) if args.big_refs is None else args.big_refs
    OUT.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    t = time.perf_counter(); data = make_inputs(views, *hw, num_src); t_in = time.perf_counter() - t
    print(f"inputs: {views} views x {num_src} sources at {hw[0]}x{hw[1]} ({t_in:.1f} s, cached in {data.name})", flush=True)
    rows = []
    th = args.threads[0]
    for n in args.threads:
        r = run_worker("torch", data, hw, n); rows.append((f"mvsnb torch", r)); print(r, flush=True)
    mine = run_worker("torch", data, base_hw, th, save=OUT / "mask_torch.npz"); rows.append(("mvsnb torch", mine)); print(mine, flush=True)
    # the same without skipping low-confidence pixels: every pixel is checked, as the baseline does
    full = run_worker("torch", data, base_hw, th, save=OUT / "mask_torch_noskip.npz", no_skip=True); rows.append(("mvsnb no skip", full)); print(full, flush=True)
    base = run_worker("baseline", data, base_hw, th, save=OUT / "mask_base.npz"); rows.append(("numpy per pair", base)); print(base, flush=True)
    if big_refs:
        big = run_worker("torch", data, (1200, 1600), th, refs=big_refs); rows.append(("mvsnb torch", big)); print(big, flush=True)
    a, b, a2 = np.load(OUT / "mask_torch.npz"), np.load(OUT / "mask_base.npz"), np.load(OUT / "mask_torch_noskip.npz")
    assert (a["mask"] == a2["mask"]).all(), "skipping low-confidence pixels changed a decision"
    same = float((a["mask"] == b["mask"]).mean())
    both = a["mask"] & b["mask"]
    ddiff = float(np.abs(a["depth"][both] - b["depth"][both]).max() / np.abs(b["depth"][both]).max()) if both.any() else 0.0
    report = dict(machine=dict(cpus=os.cpu_count(), load_before=load0, load_after=os.getloadavg(), threads=args.threads,
                               omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "PASSIVE")), rows=[dict(name=n, **r) for n, r in rows],
                  speedup=base["seconds"] / mine["seconds"], speedup_cpu=base["cpu_seconds"] / mine["cpu_seconds"],
                  speedup_no_skip=base["seconds"] / full["seconds"], speedup_cpu_no_skip=base["cpu_seconds"] / full["cpu_seconds"],
                  identical_decisions=same,
                  kept_torch=float(a["mask"].mean()), kept_baseline=float(b["mask"].mean()), max_rel_depth_diff_on_common=ddiff)
    print(f"\n{'run':16s} {'threads':>7s} {'views':>5s} {'src':>4s} {'size':>10s} {'refs':>5s} {'wall s':>8s} {'CPU s':>8s} {'inputs MB':>10s} {'peak MB':>8s}")
    for n, r in rows:
        print(f"{n:16s} {r['threads']:7d} {r['views']:5d} {r['num_src']:4d} {r['hw'][0]:>4d}x{r['hw'][1]:<5d} {r.get('refs') or r['views']:5d} "
              f"{r['seconds']:8.2f} {r['cpu_seconds']:8.2f} {r['rss_inputs_mb']:10.0f} {r['rss_peak_mb']:8.0f}")
    print(f"\nspeed-up at {base_hw[0]}x{base_hw[1]}: {report['speedup']:.1f}x wall, {report['speedup_cpu']:.1f}x CPU time "
          f"(checking every pixel: {report['speedup_no_skip']:.1f}x wall, {report['speedup_cpu_no_skip']:.1f}x CPU); identical decisions: {same:.4%} "
          f"(kept {report['kept_torch']:.2%} vs {report['kept_baseline']:.2%}); max relative d̂ difference where both keep: {ddiff:.1e}")
    print(f"load average before / after: {load0} / {os.getloadavg()} on {os.cpu_count()} CPUs")
    (OUT / "bench_crossview.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {OUT / 'bench_crossview.json'}")


if __name__ == "__main__":
    main()
