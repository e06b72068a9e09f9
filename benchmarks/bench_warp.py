"""Plane-sweep warping and the variance cost volume per cascade stage: `mvsnb.models.blocks.warp_sources` (which
calls `mvsnb.warp.homography_warp`) and `cost_volume`, forward and forward + backward, against a naive
per-plane Python loop written here.

Each image size H x W gives the three CasMVSNet stages (paper hypotheses and FPN widths): stage 1 at H/4 x W/4
with D=48 planes of C=32 channels, stage 2 at H/2 x W/2 with D=32, C=16, stage 3 at H x W with D=8, C=8;
V=3 views (reference + 2 sources, the training setting), batch 1, random features, DTU-like cameras
(`mvsnb.synthetic.cap_cameras`), stage 1 uniform hypotheses, stages 2-3 per-pixel bands. Operations:

* `warp fwd`  - every source warped at every plane, (B,S,C,D,h,w) + validity;
* `cost fwd`  - the variance cost volume (B,C,D,h,w), no autograd (inference);
* `cost f+b`  - the same with autograd, then backward of a random projection (training).

The baseline loops over planes and sources in Python: per plane it computes the homography grid of each source
and calls `grid_sample` once (the straightforward implementation), accumulating the variance plane by plane. Both
must agree (the max abs difference is reported). Throughput: warped samples S*C*D*h*w per second. Bandwidth model
(forward ops): the gather reads every warped sample once and the output is written once, 4 bytes each (+1 byte
of validity per sample for `warp fwd`); `bw_frac` is that traffic over the probe's copy bandwidth.

`mvsnb chunk 8` rows run the cost volume forward with `chunk=8` (planes warped at a time: the memory bound used
for high-resolution inference).

    python benchmarks/bench_warp.py            # 128x160 and 256x320 (the three stages each)
    python benchmarks/bench_warp.py --full     # adds 512x640 and 1200x1600 (1200x1600: forward ops only)
"""
from __future__ import annotations
import _common as C

STAGES = [dict(scale=4, D=48, C=32), dict(scale=2, D=32, C=16), dict(scale=1, D=8, C=8)]  # CasMVSNet, coarse -> fine


def make_cases(args, device):
    sizes = [(128, 160), (256, 320)]
    if args.full: sizes += [(512, 640), (1200, 1600)]
    if device.startswith("cuda"): sizes = [(128, 160), (256, 320), (512, 640), (1200, 1600)]
    if args.smoke: sizes = [(32, 40)]
    cases = []
    for H, W in sizes:
        for k, st in enumerate(STAGES):
            backward = H * W <= 512 * 640 or device.startswith("cuda")
            for impl in ("mvsnb", "mvsnb chunk 8", "baseline"):
                cases.append(dict(label=f"{H}x{W} stage {k + 1} {impl}", H=H, W=W, stage=k + 1, impl=impl, V=3, backward=backward, **st))
    return cases


def inputs(spec, device, seed=0):
    "Features, cameras at the stage resolution and hypotheses of one case."
    import torch
    from mvsnb.synthetic import cap_cameras
    from mvsnb.camera import scale_intrinsics
    from mvsnb.warp import depth_hypotheses
    g = torch.Generator().manual_seed(seed)
    H, W, s, V, Cc, D = spec["H"], spec["W"], spec["scale"], spec["V"], spec["C"], spec["D"]
    h, w = H // s, W // s
    K, w2c = cap_cameras(V, H, W)
    K = scale_intrinsics(K, w / W, h / H)[None].to(device); w2c = w2c[None].to(device)
    feats = torch.rand(1, V, Cc, h, w, generator=g).to(device)
    dmin, dmax = torch.tensor([2.5], device=device), torch.tensor([6.0], device=device)
    if spec["stage"] == 1: hyps = depth_hypotheses(dmin, dmax, D, h, w)
    else:  # a per-pixel band around a smooth depth, as stages 2-3 see it
        base = 3.5 + torch.rand(1, 1, h // 8 + 1, w // 8 + 1, generator=g).to(device)
        base = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
        step = (dmax - dmin) / 192 * (4.0 / 2 ** (spec["stage"] - 1))
        hyps = base + (torch.arange(D, device=device, dtype=torch.float32) - (D - 1) / 2).view(1, -1, 1, 1) * step
    return feats, K, w2c, hyps


# ------------------------------------------------------------------------------------------------ the naive baseline
def naive_grid(K_ref, K_src, T_src_ref, depth, h, w):
    "Sampling grid and validity of one source at one plane: (B,h,w,2) in align_corners=True coordinates, (B,1,h,w)."
    import torch
    B = depth.shape[0]
    v, u = torch.meshgrid(torch.arange(h, dtype=depth.dtype, device=depth.device),
                          torch.arange(w, dtype=depth.dtype, device=depth.device), indexing="ij")
    pix = torch.stack([u.reshape(-1), v.reshape(-1), torch.ones(h * w, dtype=depth.dtype, device=depth.device)])  # 3,hw
    X = (torch.linalg.inv(K_ref) @ pix) * depth.reshape(B, 1, -1)  # B,3,hw
    Xs = T_src_ref[:, :3, :3] @ X + T_src_ref[:, :3, 3:]
    q = K_src @ Xs
    z = q[:, 2:3]
    uv = q[:, :2] / z.clamp(min=1e-6)
    gx, gy = 2 * uv[:, 0] / (w - 1) - 1, 2 * uv[:, 1] / (h - 1) - 1
    valid = (z[:, 0] > 1e-6) & (gx.abs() <= 1) & (gy.abs() <= 1)
    return torch.stack([gx, gy], -1).reshape(B, h, w, 2), valid.reshape(B, 1, h, w)


def naive_warp(feats, K, w2c, hyps):
    "warped (B,S,C,D,h,w), valid (B,S,1,D,h,w) by a loop over planes and sources."
    import torch, torch.nn.functional as F
    B, V, Cc, h, w = feats.shape
    out, ok = [], []
    for s in range(1, V):
        T = w2c[:, s] @ torch.linalg.inv(w2c[:, 0])
        ws, vs = [], []
        for d in range(hyps.shape[1]):
            grid, valid = naive_grid(K[:, 0], K[:, s], T, hyps[:, d], h, w)
            ws.append(F.grid_sample(feats[:, s], grid, mode="bilinear", padding_mode="zeros", align_corners=True) * valid)
            vs.append(valid)
        out.append(torch.stack(ws, 2)); ok.append(torch.stack(vs, 2))
    return torch.stack(out, 1), torch.stack(ok, 1)


def naive_cost_volume(feats, K, w2c, hyps):
    "Variance cost volume (B,C,D,h,w), plane by plane (reference counted in every plane, as mvsnb)."
    import torch, torch.nn.functional as F
    B, V, Cc, h, w = feats.shape
    ref = feats[:, 0]
    Ts = [w2c[:, s] @ torch.linalg.inv(w2c[:, 0]) for s in range(1, V)]
    planes = []
    for d in range(hyps.shape[1]):
        s1, s2, n = ref, ref ** 2, 1.0
        for s in range(1, V):
            grid, valid = naive_grid(K[:, 0], K[:, s], Ts[s - 1], hyps[:, d], h, w)
            m = valid.to(feats.dtype)
            x = F.grid_sample(feats[:, s], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            s1, s2, n = s1 + m * x, s2 + m * x * x, n + m
        mean = s1 / n
        planes.append(s2 / n - mean ** 2)
    return torch.stack(planes, 2)


# ------------------------------------------------------------------------------------------------ one case
def run_case(spec, bench):
    import torch
    from mvsnb.models.blocks import warp_sources, cost_volume
    dev = bench.device
    feats, K, w2c, hyps = inputs(spec, dev)
    S, Cc, D, h, w = spec["V"] - 1, spec["C"], spec["D"], *feats.shape[-2:]
    samples = S * Cc * D * h * w
    common = dict(size=f"{spec['H']}x{spec['W']}", stage=spec["stage"], hw=f"{h}x{w}", C=Cc, D=D, S=S, impl=spec["impl"],
                  work=samples, unit="samples/s")
    mine = spec["impl"].startswith("mvsnb")
    chunk = int(spec["impl"].split()[-1]) if spec["impl"].startswith("mvsnb chunk") else None
    warp = (lambda: warp_sources(feats, K, w2c, hyps)) if mine else (lambda: naive_warp(feats, K, w2c, hyps))
    cost = (lambda f: cost_volume(f, K, w2c, hyps, "variance", chunk=chunk)) if mine else (lambda f: naive_cost_volume(f, K, w2c, hyps))
    with torch.no_grad():
        if chunk is None:  # warp_sources has no chunking of its own: measured once per implementation
            m = bench.measure(warp)
            bench.add(m, op="warp fwd", bytes=samples * 9 + feats.numel() * 4, **common)
        m = bench.measure(lambda: cost(feats))
        out = bench.last_output
        bench.add(m, op="cost fwd", bytes=samples * 4 + Cc * D * h * w * 4, **common)
    if chunk is not None: return  # chunking bounds the memory of inference: the forward only
    if spec["impl"] == "mvsnb":  # agreement with the baseline on the same inputs, for the report
        with torch.no_grad(): diff = (out - naive_cost_volume(feats, K, w2c, hyps)).abs()
        bench.rows[-1]["mismatch_frac_vs_other"] = float((diff > 1e-4).float().mean())  # border samples: validity round-off
        bench.rows[-1]["max_abs_diff_vs_other"] = float(diff.max())
        del diff
    del out
    if spec["backward"]:
        g = torch.rand(1, Cc, D, h, w, device=dev)

        def step(f):
            (cost(f) * g).sum().backward()
            return f.grad

        m = bench.measure(step, setup=lambda: feats.detach().clone().requires_grad_(True))
        bench.add(m, op="cost f+b", **common)


def report(bench):
    rows = bench.rows
    cols = [("size", "size", ""), ("stage", "stage", ""), ("h x w", "hw", ""), ("C", "C", ""), ("D", "D", ""),
            ("op", "op", ""), ("impl", "impl", ""), ("median s", "median_s", ".4f"), ("Msamples/s", lambda r: r["throughput"] / 1e6, ".1f"),
            ("GB/s", "gbps", ".2f"), ("bw frac", "bw_frac", ".3f"), ("RSS Δ MB", "rss_delta_mb", ".0f"),
            ("GPU MB", "gpu_peak_mb", ".0f"), ("speed-up", "speedup", ".2f")]
    sp = bench.speedups(("size", "stage", "op"))
    sp_chunk = bench.speedups(("size", "stage", "op"), impl="mvsnb chunk 8")
    bench.table(cols, title=f"plane-sweep warp and variance cost volume on {bench.device} (S=2 sources, B=1)")
    diffs = [r["mismatch_frac_vs_other"] for r in rows if "mismatch_frac_vs_other" in r]
    summary = []
    for op in ("warp fwd", "cost fwd", "cost f+b"):
        s = [x for x in sp if x["op"] == op]
        if not s: continue
        big = max(s, key=lambda x: (int(x["size"].split("x")[0]), -x["stage"]))
        mine = [r for r in rows if r["impl"] == "mvsnb" and r["op"] == op and r["size"] == big["size"]]
        summary.append(dict(kernel="warp", what=f"{op}, {big['size']} (3 stages)", speedup=sum(x["baseline_s"] for x in s if x["size"] == big["size"]) /
                            sum(x["mvsnb_s"] for x in s if x["size"] == big["size"]),
                            mvsnb_s=sum(r["median_s"] for r in mine), bw_frac=max((r.get("bw_frac") or 0) for r in mine) or None,
                            speedup_range=[min(x["speedup"] for x in s), max(x["speedup"] for x in s)]))
        c = [x for x in sp_chunk if x["op"] == op and x["size"] == big["size"]]
        if c: summary.append(dict(kernel="warp", what=f"{op} chunk=8, {big['size']} (3 stages)",
                                  speedup=sum(x["baseline_s"] for x in c) / sum(x["mvsnb_s"] for x in c), mvsnb_s=sum(x["mvsnb_s"] for x in c)))
    notes = [f"mvsnb and the per-plane baseline agree on the cost volume except at image-border samples whose validity "
             f"differs by float round-off: at most {max(diffs):.1e} of the entries differ by > 1e-4" if diffs else "",
             "speed-up = baseline median / mvsnb median on the same inputs in the same process; the summary row sums the "
             "three stages of the largest size"]
    return summary, [n for n in notes if n], {}


def main(argv=None):
    return C.main("bench_warp", __doc__, make_cases, run_case, report, argv=argv)


if __name__ == "__main__":
    main()
