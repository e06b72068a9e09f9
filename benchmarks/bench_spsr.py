"""Screened-Poisson pseudo labels (Self-supervised CVP-MVSNet): normals, orientation toward the cameras, Open3D
Poisson, and rendering the mesh into every view (`mvsnb.spsr`), phase by phase and end to end (`spsr_labels`).

Input: a fake fused cloud around the ground-truth surface of a synthetic scene (`mvsnb.metrics.perturbed_cloud`
of `make_scene(views=V)`'s GT points: 0.005 normal noise, 0.02 tangential spread, 1 % outliers), the scene's
cameras, labels at H x W. Config: `SPSRConfig.preset("cpu_small")` (KNN-20 normals, density trim 5 %, crop) with
the Poisson depth of the case.

Phases and baselines (written here):
* `normals`  - Open3D PCA normals: the same call on both sides (timed once, `--shared-repeats`);
* `orient`   - mvsnb: one batched torch pass (nearest camera that has the point in front, flip toward it);
               baseline: the same rule in a per-point Python loop over numpy rows;
* `poisson`  - Open3D screened Poisson + density trim + crop: the same on both sides (timed once);
* `render`   - mvsnb: one Open3D `RaycastingScene`, rays of all views cast in one call; baseline: a loop over
               views, building the scene and the rays of each view anew (the per-view script style);
* `labels`   - the sum of the phases (runs: -); with --full (and --smoke) mvsnb's `spsr_labels` is also timed
               end to end (runs: 1).

Sizes: 50k points at Poisson depth 7 and 0.2M at depth 8, 5 views at 128x160 (--full: 1M points at depth 9 and
49 views at 512x640 and 1200x1600). Throughput: points/s (normals, orient, poisson), rendered pixels/s (render).

    python benchmarks/bench_spsr.py [--full] [--shared-repeats N]
"""
from __future__ import annotations
import _common as C


def make_cases(args, device):
    grid = [(50_000, 7, 5, 128, 160), (200_000, 8, 5, 128, 160)]
    if args.full: grid += [(1_000_000, 9, 49, 512, 640), (1_000_000, 9, 49, 1200, 1600)]
    if args.smoke: grid = [(5_000, 6, 3, 32, 40)]
    return [dict(label=f"{n / 1e6:g}M pts depth {d}, {V} views {H}x{W}", n=n, depth=d, V=V, H=H, W=W) for n, d, V, H, W in grid]


_SCENES = {}


def inputs(spec):
    "Cloud (N,3) float32 tensor, cameras K (V,3,3) at the label size, w2c (V,4,4)."
    import torch
    from mvsnb.synthetic import make_scene
    from mvsnb.metrics import perturbed_cloud
    from mvsnb.camera import scale_intrinsics
    V = spec["V"]
    if V not in _SCENES: _SCENES[V] = make_scene(views=V, height=64, width=80, seed=0)
    sc = _SCENES[V]
    P = perturbed_cloud(sc.points.double().numpy(), sc.point_normals.double().numpy(), spec["n"], noise=0.005, spread=0.02,
                        outliers=0.01, bbox=sc.obs_mask["bbox"], seed=spec["n"])
    K = scale_intrinsics(sc.K, spec["W"] / 80, spec["H"] / 64)
    return torch.from_numpy(P).float(), K, sc.w2c


# ------------------------------------------------------------------------------------------------ baselines
def baseline_orient(points, normals, w2c):
    "Nearest camera that has the point in front (else the nearest), flip the normal toward it: a loop over points."
    import numpy as np
    P, N, T = points.double().numpy(), normals.double().numpy().copy(), w2c.double().numpy()
    C_ = np.stack([-T[v, :3, :3].T @ T[v, :3, 3] for v in range(len(T))])
    for i in range(len(P)):
        p = P[i]
        z = T[:, 2, :3] @ p + T[:, 2, 3]
        dist = np.sqrt(((C_ - p) ** 2).sum(1))
        front = z > 0
        v = int(np.argmin(np.where(front, dist, np.inf))) if front.any() else int(np.argmin(dist))
        if (C_[v] - p) @ N[i] < 0: N[i] = -N[i]
    return N


def baseline_render(vertices, faces, K, w2c, H, W):
    "Per view: a new RaycastingScene, the view's rays from a numpy meshgrid, one cast; z-depth (V,1,H,W)."
    import numpy as np, open3d as o3d
    Vt, Ft = vertices.numpy().astype(np.float32), faces.numpy().astype(np.uint32)
    out = np.zeros((len(K), 1, H, W), np.float32)
    for v in range(len(K)):
        scene = o3d.t.geometry.RaycastingScene()
        scene.add_triangles(o3d.core.Tensor(Vt), o3d.core.Tensor(Ft))
        xs, ys = np.meshgrid(np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64))
        rays_cam = np.linalg.inv(K[v].double().numpy()) @ np.stack([xs.ravel(), ys.ravel(), np.ones(H * W)])  # z = 1
        c2w = np.linalg.inv(w2c[v].double().numpy())
        dirs = (c2w[:3, :3] @ rays_cam).T
        rays = np.concatenate([np.broadcast_to(c2w[:3, 3], dirs.shape), dirs], 1).astype(np.float32)
        t = scene.cast_rays(o3d.core.Tensor(rays))["t_hit"].numpy()
        out[v, 0] = np.where(np.isfinite(t), t, 0).reshape(H, W)
    return out


# ------------------------------------------------------------------------------------------------ one case
def run_case(spec, bench):
    import numpy as np, torch
    from mvsnb.spsr import SPSRConfig, estimate_normals, orient_normals, poisson_mesh, render_pseudo_depth, spsr_labels
    pts, K, w2c = inputs(spec)
    n, V, H, W = len(pts), spec["V"], spec["H"], spec["W"]
    cfg = SPSRConfig.preset("cpu_small", depth=spec["depth"], threads=-1)
    base = dict(n=n, size=f"{n / 1e6:.2f}M", depth=spec["depth"], views=V, hw=f"{H}x{W}")
    sr = bench.args.shared_repeats
    m = bench.measure(lambda: estimate_normals(pts, cfg.normal_radius, cfg.normal_max_nn), repeats=sr)
    raw = bench.last_output
    bench.add(m, op="normals", impl="open3d (both)", work=n, unit="points/s", **base)
    m = bench.measure(lambda: orient_normals(pts, raw, w2c)); nrm = bench.last_output
    bench.add(m, op="orient", impl="mvsnb", work=n, unit="points/s", bytes=n * 4 * 9, **base)
    m = bench.measure(lambda: baseline_orient(pts, raw, w2c), repeats=1)
    agree = float((np.sign((nrm.double().numpy() * bench.last_output).sum(1)) > 0).mean())
    bench.add(m, op="orient", impl="baseline", work=n, unit="points/s", **base)
    m = bench.measure(lambda: poisson_mesh(pts, nrm, cfg), repeats=sr)
    verts, faces = bench.last_output
    bench.add(m, op="poisson", impl="open3d (both)", work=n, unit="points/s", triangles=len(faces), **base)
    m = bench.measure(lambda: render_pseudo_depth(verts, faces, K, w2c, H, W)); d_mine = bench.last_output
    bench.add(m, op="render", impl="mvsnb", work=V * H * W, unit="px/s", bytes=V * H * W * (24 + 4), **base)
    m = bench.measure(lambda: baseline_render(verts, faces, K, w2c, H, W))
    same = float(np.abs(d_mine.numpy() - bench.last_output).max())
    bench.add(m, op="render", impl="baseline", work=V * H * W, unit="px/s", **base)
    checks = dict(coverage=float((d_mine > 0).float().mean()), orient_agreement=agree, render_max_abs_diff=same)
    if bench.args.full or bench.args.smoke:  # end to end (the default run takes the sum of the phases: Poisson is slow)
        m = bench.measure(lambda: spsr_labels(pts, None, None, K, w2c, H, W, cfg), repeats=sr)
        bench.add(m, op="labels", impl="mvsnb", work=V * H * W, unit="px/s", **checks, **base)
    else: bench.rows[-1].update(checks)


def report(bench):
    rows = bench.rows
    for key in {(r["n"], r["views"], r["hw"]) for r in rows}:  # baseline total = sum of its phases
        ph = {r["op"] + "|" + r["impl"]: r for r in rows if (r["n"], r["views"], r["hw"]) == key}
        for impl in ("mvsnb", "baseline"):
            if f"labels|{impl}" in ph: continue
            tot = sum(ph[k]["median_s"] for k in ("normals|open3d (both)", f"orient|{impl}", "poisson|open3d (both)", f"render|{impl}"))
            r0 = ph[f"render|{impl}"]
            rows.append(dict(op="labels", impl=impl, n=r0["n"], size=r0["size"], depth=r0["depth"], views=r0["views"],
                             hw=r0["hw"], median_s=tot, repeats=None, work=r0["work"], unit="px/s", throughput=r0["work"] / tot,
                             note=f"sum of the {impl} phases", **{k: r0[k] for k in ("coverage", "orient_agreement", "render_max_abs_diff") if k in r0}))
    sp = bench.speedups(("n", "views", "hw", "op"))
    order = {"normals": 0, "orient": 1, "poisson": 2, "render": 3, "labels": 4}
    rows.sort(key=lambda r: (r["n"], r["views"], r["hw"], order[r["op"]], r["impl"] != "mvsnb"))
    cols = [("points", "size", ""), ("depth", "depth", ""), ("views", "views", ""), ("labels", "hw", ""), ("phase", "op", ""),
            ("impl", "impl", ""), ("median s", "median_s", ".3f"), ("runs", "repeats", ""), ("throughput", "throughput", ".3g"),
            ("unit", "unit", ""), ("bw frac", "bw_frac", ".3f"), ("RSS Δ MB", "rss_delta_mb", ".0f"), ("speed-up", "speedup", ".2f")]
    bench.table(cols, title="SPSR pseudo labels, phase by phase")
    summary = []
    big = max(rows, key=lambda r: (r["n"], r["views"]))
    for op in ("orient", "render", "labels"):
        s = [x for x in sp if x["op"] == op and x["n"] == big["n"] and x["views"] == big["views"] and x["hw"] == big["hw"]]
        mine = next((r for r in rows if r["op"] == op and r["impl"] == "mvsnb" and (r["n"], r["views"], r["hw"]) == (big["n"], big["views"], big["hw"])), {})
        if s: summary.append(dict(kernel="spsr", what=f"{op}, {big['size']} points, {big['views']} views {big['hw']}",
                                  speedup=s[0]["speedup"], mvsnb_s=s[0]["mvsnb_s"], bw_frac=mine.get("bw_frac")))
    lab = [r for r in rows if "coverage" in r]
    cover = ", ".join(format(r["coverage"], ".1%") for r in lab)
    notes = ["normals and Poisson are the same Open3D calls on both sides (timed with --shared-repeats runs)",
             f"orientation agreement mvsnb vs loop: {min(r['orient_agreement'] for r in lab):.4%}; rendered depth max |diff| "
             f"{max(r['render_max_abs_diff'] for r in lab):.2e}; label coverage {cover}"]
    return summary, notes, {}


def _extra(ap):
    ap.add_argument("--shared-repeats", type=int, default=1, help="timed runs of the Open3D phases both sides share")


def main(argv=None):
    return C.main("bench_spsr", __doc__, make_cases, run_case, report, extra_args=_extra, argv=argv)


if __name__ == "__main__":
    main()
