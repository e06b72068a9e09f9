"""Memory of the cascade network: inference at growing image sizes with and without chunked cost volumes, and
the training memory of one sample; the target is "inference at 1600x1200 with the cascade at the paper's
hypotheses fits in 8 GB of GPU memory (chunking); training memory per sample reported at 512x640".

Inference: `CascadeMVSNet` preset `casmvsnet` (48/32/8 hypotheses, FPN width 8), 5 views (the test setting),
batch 1, `torch.inference_mode`, with `chunk=None` (all planes of a stage warped at once) and `chunk=4` (4 planes
at a time). Training: one step (forward, loss, backward, Adam) of each backbone with its paper preset and loss
(as in `bench_train_step.py`), 3 views, batch 1.

* On a GPU both are measured directly: `torch.cuda.max_memory_allocated` above what was allocated before
  (inference up to 1200x1600, training at 512x640 with mixed precision).
* On the CPU, 1200x1600 inference (minutes) and 512x640 training are out of reach of the default run: the peak
  RSS above the resident memory before the call is measured at small sizes (inference 128x160 -> 256x320,
  training 48x64 -> 96x128; --full adds 512x640 inference and 128x160 training) and fitted with
  memory = a + b * pixels (every activation and cost volume grows with H*W at fixed hypotheses); the values at
  1200x1600 and 512x640 are **extrapolations from the measured sizes**, labelled as such in the table and the JSON.
  CPU memory is only a proxy for GPU memory: the same tensors, but no CUDA context or caching allocator, and the
  CPU convolutions' own workspaces instead of cuDNN's.
* A breakdown at the largest measured size shows where the memory goes: the FPN, and per stage the cost volume
  (chunk none / 4) and the 3D U-Net, each alone.
* Tiled inference (`CascadeConfig.tile`: cost volume + 3D U-Net in windows with a receptive-field halo, the FPN one
  view at a time; the same result) is measured beside the untiled cases at every size (tile 128 so that the small
  sizes are really split). `--hires` (implied by `--full`, and the default on a GPU) measures 1200x1600 inference
  with chunk 4 and tile `--tile` (256) and, on the CPU, training at 512x640 directly (minutes on 2 cores).
* An analytic count of the largest live float32 tensors at 1200x1600 (what a GPU must hold, without cuDNN workspaces
  or allocator slack) for each chunk / tile setting: per phase (FPN, each stage's plane sweep + cost volume, each
  stage's 3D U-Net), computed from the shapes, no run needed; `analytic_mb` is also given beside every measured
  inference row.

    python benchmarks/bench_memory.py [--full | --hires] [--tile 256] [--device cuda]
"""
from __future__ import annotations
import _common as C

TARGET_GB = 8.0


def extra_args(ap):
    ap.add_argument("--hires", action="store_true", help="CPU: also measure 1200x1600 tiled inference and 512x640 training directly")
    ap.add_argument("--tile", type=int, default=256, help="tile of the 1200x1600 tiled inference case")


def make_cases(args, device):
    cuda = device.startswith("cuda")
    hires = cuda or args.full or args.hires
    small_tile = 128
    if cuda: inf, train = [(256, 320), (512, 640), (1200, 1600)], [(512, 640)]
    else:
        inf, train = [(128, 160), (192, 256), (256, 320)], [(48, 64), (64, 80), (96, 128)]
        if args.full: inf, train = inf + [(512, 640)], train + [(128, 160)]
    backbones, preset = ("cascade", "cvp"), None
    if args.smoke: inf, train, backbones, preset, hires, small_tile = [(32, 40), (64, 80)], [(32, 40), (48, 64)], ("cascade",), "tiny", False, 32
    settings = [(None, None), (4, None), (4, small_tile)]
    cases = [dict(label=f"inference {H}x{W} chunk {ch} tile {t}", kind="inference", H=H, W=W, chunk=ch, tile=t, preset=preset or "casmvsnet")
             for H, W in inf for ch, t in settings if not (cuda and (H, W) == (1200, 1600) and t is not None)]
    if hires:
        cases += [dict(label=f"inference 1200x1600 chunk 4 tile {args.tile}", kind="inference", H=1200, W=1600, chunk=4, tile=args.tile,
                       preset="casmvsnet")]
        if not cuda: train = train + [(512, 640)]
    H, W = inf[-1]
    cases += [dict(label=f"components {H}x{W}", kind="components", H=H, W=W, preset=preset or "casmvsnet")]
    cases += [dict(label=f"train {bb} {H}x{W}", kind="train", backbone=bb, H=H, W=W, amp=cuda, preset=preset)
              for H, W in train for bb in backbones]
    return cases


def analytic_inference_mb(cfg, H: int, W: int, V: int=5, radius: int=37, multiple: int=8) -> dict:
    """Largest live float32 tensors (MB) of one no-grad cascade forward, per phase, from the shapes alone.

    FPN: the encoder maps it keeps plus, at full resolution, the upsampled top-down map, the lateral projection and
    their sum (4b channels each) and the output conv (b), for V views at once or one view (tiled). Stage k with
    C channels, D planes, S = V-1 sources, c = chunk planes, A = the pixels of the largest window (the whole stage
    untiled): the plane sweep holds ~3·S·C·c·A (the warped chunk, its stacked copy, the masked product) beside the
    chunk list and the concatenated volume (2·C·D·A); the 3D U-Net holds its input (C·D·A) and ~4 full-resolution
    maps of reg_channels[0] (conv out, norm out, skip, sum). Always live: every stage's features (V views) and the
    stage's hypotheses and probabilities (2·D·h·w). Not counted: convolution workspaces, allocator slack, the weights."""
    f, S, b = 4 / 2 ** 20, V - 1, cfg.base_channels
    C = [4 * b, 2 * b, b]; px = H * W; n = len(cfg.num_depth)
    feats = V * sum(C[k] * px / 4 ** (n - 1 - k) for k in range(n))
    nv = 1 if cfg.tile else V  # tiled: one view at a time, then the per-view outputs and their concatenation (2 x feats)
    out = {"FPN": (nv * px * (b + 2 * b / 4 + 4 * b / 16 + 3 * 4 * b + b) + (2 * feats if cfg.tile else 0)) * f}
    for k in range(n):
        h, w = H // 2 ** (n - 1 - k), W // 2 ** (n - 1 - k); D = cfg.num_depth[k]; c = cfg.chunk or D
        A = h * w
        if cfg.tile and (h > cfg.tile or w > cfg.tile):
            t = -(-cfg.tile // multiple) * multiple; halo = -(-radius // multiple) * multiple
            A = min(h, t + 2 * halo) * min(w, t + 2 * halo)
        live = feats + 2 * D * h * w
        out[f"stage {k + 1} cost volume"] = (live + 3 * S * C[k] * min(c, D) * A + 2 * C[k] * D * A) * f
        out[f"stage {k + 1} 3D U-Net"] = (live + C[k] * D * A + 4 * cfg.reg_channels[0] * D * A) * f
    return out


def run_case(spec, bench):
    import torch
    dev, H, W = bench.device, spec["H"], spec["W"]
    if spec["kind"] == "inference":
        from mvsnb.models.cascade import CascadeMVSNet, CascadeConfig
        from mvsnb.synthetic import cap_cameras
        model = CascadeMVSNet(CascadeConfig.preset(spec["preset"], chunk=spec["chunk"], tile=spec.get("tile"))).to(dev).eval()
        K, w2c = cap_cameras(5, H, W)
        g = torch.Generator().manual_seed(0)
        args = (torch.rand(1, 5, 3, H, W, generator=g).to(dev), K[None].to(dev), w2c[None].to(dev),
                torch.tensor([2.5], device=dev), torch.tensor([6.0], device=dev))

        def infer():
            with torch.inference_mode(): return model(*args)["depth"]

        an = analytic_inference_mb(model.config, H, W, 5, model.regularizers[-1].radius, model.regularizers[-1].multiple)
        info = dict(op="inference", impl="mvsnb", size=f"{H}x{W}", px=H * W, chunk=spec["chunk"] or "none", tile=spec.get("tile") or "none",
                    views=5, analytic_mb=max(an.values()), analytic_peak_phase=max(an, key=an.get))
        try: m = bench.measure(infer, repeats=1, warmup=0)
        except torch.cuda.OutOfMemoryError as e:  # a result too: this size does not fit on this GPU
            torch.cuda.empty_cache()
            bench.rows.append(dict(info, memory_mb=None, oom=str(e).split("\n")[0][:200]))
            return
        bench.add(m, **info, memory_mb=_mem(m), work=H * W, unit="px/s")
    elif spec["kind"] == "components": components(spec, bench)
    else:
        from bench_train_step import BACKBONES, run_case as train_case
        train_case(dict(backbone=spec["backbone"], preset=spec["preset"] or BACKBONES[spec["backbone"]][0], H=H, W=W, impl="mvsnb",
                        amp=spec["amp"]), bench, repeats=1)
        r = bench.rows[-1]
        r.update(op="train step", px=H * W, views=3, chunk="none", memory_mb=_mem(r))


def components(spec, bench):
    "Peak memory of the parts of one inference: FPN, then per stage the cost volume (chunk none / 4) and the 3D U-Net."
    import torch
    from mvsnb.models.cascade import CascadeMVSNet, CascadeConfig, cascade_hypotheses
    from mvsnb.models.blocks import cost_volume
    from mvsnb.camera import scale_intrinsics
    from mvsnb.synthetic import cap_cameras
    dev, H, W = bench.device, spec["H"], spec["W"]
    model = CascadeMVSNet(CascadeConfig.preset(spec["preset"])).to(dev).eval()
    cfg = model.config
    K, w2c = cap_cameras(5, H, W)
    K, w2c = K[None].to(dev), w2c[None].to(dev)
    dmin, dmax = torch.tensor([2.5], device=dev), torch.tensor([6.0], device=dev)
    images = torch.rand(1, 5, 3, H, W, generator=torch.Generator().manual_seed(0)).to(dev)
    scale = 1200 * 1600 / (H * W)
    info = dict(op="component", size=f"{H}x{W}", px=H * W, impl="mvsnb", views=5)
    with torch.inference_mode():
        m = bench.measure(lambda: model.features(images.flatten(0, 1)), repeats=1, warmup=0)
        feats = bench.last_output
        bench.add(m, part="FPN (5 views)", chunk="none", memory_mb=_mem(m), memory_at_1200x1600_mb=_mem(m) * scale, **info)
        interval = (dmax - dmin) / (cfg.num_depth[0] * cfg.interval_ratio[0])
        prev = None
        for k in range(cfg.num_stages):
            f = feats[k].unflatten(0, (1, 5)); h, w = f.shape[-2:]
            K_k = scale_intrinsics(K, w / W, h / H, mode="center")
            hyps = cascade_hypotheses(prev, cfg.num_depth[k], cfg.interval_ratio[k] * interval, dmin, dmax, h, w).contiguous()
            for ch in (None, 4):
                m = bench.measure(lambda: cost_volume(f, K_k, w2c, hyps, "variance", chunk=ch), repeats=1, warmup=0)
                bench.add(m, part=f"stage {k + 1} cost volume ({f.shape[2]}x{hyps.shape[1]}x{h}x{w})", chunk=ch or "none",
                          memory_mb=_mem(m), memory_at_1200x1600_mb=_mem(m) * scale, **info)
            cost = bench.last_output
            m = bench.measure(lambda: model.regularizers[k](cost), repeats=1, warmup=0)
            bench.add(m, part=f"stage {k + 1} 3D U-Net", chunk="none", memory_mb=_mem(m), memory_at_1200x1600_mb=_mem(m) * scale, **info)
            prev = torch.full((1, 1, h, w), 4.0, device=dev)


def _mem(m) -> float|None:
    return m.get("gpu_delta_mb") if m.get("gpu_delta_mb") is not None else m.get("rss_delta_mb")


def fit(points):
    "Least-squares a + b*x through [(x, y)]; (a, b, r2)."
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if n < 2 or sxx == 0: return None
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    a = my - b * mx
    ss = sum((y - my) ** 2 for _, y in points)
    r2 = 1 - sum((y - a - b * x) ** 2 for x, y in points) / ss if ss > 0 else 1.0
    return a, b, r2


def report(bench):
    rows = bench.rows
    cuda = bench.device.startswith("cuda")
    groups = {}
    comps = [r for r in rows if r["op"] == "component"]
    rows[:] = [r for r in rows if r["op"] != "component"]
    for r in rows:
        key = ("inference", r["chunk"], r.get("tile", "none")) if r["op"] == "inference" else ("train", r["backbone"])
        groups.setdefault(key, []).append(r)
    targets = {"inference": (1200, 1600), "train": (512, 640)}
    extra_rows, summary = [], []
    for key, rs in groups.items():
        th, tw = targets[key[0]]
        meas = next((r for r in rs if r["size"] == f"{th}x{tw}"), None)
        what = f"{key[0]} {'chunk ' + str(key[1]) + ' tile ' + str(key[2]) if key[0] == 'inference' else key[1]} at {th}x{tw}"
        if meas is not None and meas.get("oom"):
            summary.append(dict(kernel="memory", what=what, memory_mb=None, measured=True, oom=meas["oom"],
                                fits_8gb=False if key[0] == "inference" else None))
            continue
        if meas is not None:
            summary.append(dict(kernel="memory", what=what, memory_mb=meas["memory_mb"], measured=True,
                                fits_8gb=meas["memory_mb"] / 1024 <= TARGET_GB if key[0] == "inference" else None))
            continue
        if key[0] == "inference" and key[2] != "none": continue  # tiled: not linear in the pixels (see the analytic count)
        f = fit([(r["px"], r["memory_mb"]) for r in rs if r.get("memory_mb") is not None])  # CPU only: a GPU measures directly
        if f is None: continue
        a, b, r2 = f
        est = a + b * th * tw
        extra_rows.append(dict(op=rs[0]["op"], backbone=rs[0].get("backbone", "cascade"), size=f"{th}x{tw}", chunk=key[1] if key[0] == "inference" else "none",
                               tile=key[2] if key[0] == "inference" else "none",
                               memory_mb=est, extrapolated=True, fit=f"{a:.0f} MB + {b * 1e6:.1f} MB/Mpx (R² {r2:.3f}, from {len(rs)} sizes "
                               f"{rs[0]['size']}..{rs[-1]['size']})"))
        summary.append(dict(kernel="memory", what=what + " (extrapolated)", memory_mb=est, measured=False, fit_r2=r2,
                            fits_8gb=est / 1024 <= TARGET_GB if key[0] == "inference" else None,
                            from_sizes=[r["size"] for r in rs]))
    for r in rows: r.setdefault("backbone", "cascade")
    rows += extra_rows
    for r in rows: r.setdefault("tile", "none")
    cols = [("what", "op", ""), ("backbone", "backbone", ""), ("size", "size", ""), ("chunk", "chunk", ""), ("tile", "tile", ""),
            ("median s", "median_s", ".2f"), ("memory MB", "memory_mb", ".0f"), ("analytic MB", "analytic_mb", ".0f"),
            ("measured", lambda r: "EXTRAPOLATED" if r.get("extrapolated") else ("OUT OF MEMORY" if r.get("oom") else "measured"), ""),
            ("fit", "fit", "")]
    bench.table(cols, title=f"memory on {bench.device} ({'allocated GPU memory' if cuda else 'peak RSS above the resident memory before the call'})")
    if comps:
        bench.table([("part", "part", ""), ("size", "size", ""), ("chunk", "chunk", ""), ("median s", "median_s", ".2f"),
                     ("memory MB", "memory_mb", ".0f"), ("x pixels -> 1200x1600 MB", "memory_at_1200x1600_mb", ".0f")], comps,
                    title="where the inference memory goes (each part alone; last column: scaled by the pixel count, an extrapolation)")
        rows += comps
    # the analytic count at 1200x1600, casmvsnet, 5 views: what a GPU must hold at least, for each setting
    from mvsnb.models.cascade import CascadeConfig
    from mvsnb.models.blocks import UNet3D
    proto = CascadeConfig.preset("casmvsnet"); reg = UNet3D(8, proto.reg_channels)
    tile = getattr(bench.args, "tile", 256)
    an_rows = []
    for ch, t in ((None, None), (4, None), (1, None), (4, tile), (1, 128)):
        cfg = CascadeConfig.preset("casmvsnet", chunk=ch, tile=t)
        an = analytic_inference_mb(cfg, 1200, 1600, 5, reg.radius, reg.multiple)
        peak = max(an, key=an.get)
        an_rows.append(dict(op="analytic", size="1200x1600", chunk=ch or "none", tile=t or "none", memory_mb=an[peak], peak_phase=peak,
                            **{f"{k} MB": v for k, v in an.items()}))
        summary.append(dict(kernel="memory", what=f"inference chunk {ch or 'none'} tile {t or 'none'} at 1200x1600 (analytic live tensors)",
                            memory_mb=an[peak], measured=False, analytic=True, peak_phase=peak, fits_8gb=an[peak] / 1024 <= TARGET_GB))
    bench.table([("size", "size", ""), ("chunk", "chunk", ""), ("tile", "tile", ""), ("largest live tensors MB", "memory_mb", ".0f"),
                 ("at", "peak_phase", ""), ("FPN MB", "FPN MB", ".0f"), ("stage 2 volume MB", "stage 2 cost volume MB", ".0f"),
                 ("stage 3 volume MB", "stage 3 cost volume MB", ".0f"), ("stage 3 U-Net MB", "stage 3 3D U-Net MB", ".0f")], an_rows,
                title="analytic count of the largest live float32 tensors, casmvsnet 48/32/8, 5 views (no workspaces / allocator slack)")
    rows += an_rows
    notes = [] if cuda else ["CPU run: 1200x1600 inference and 512x640 training not measured directly (rows 'measured' at that size, "
                             "with --hires / --full) are EXTRAPOLATED with a linear fit in the pixel count from the measured sizes; "
                             "CPU RSS stands in for GPU memory (no CUDA context / allocator cache, CPU convolution workspaces, "
                             "allocator slack); the analytic count is the live tensors alone: the GPU target itself needs a GPU run (--device cuda)"]
    for s in summary:
        if s.get("fits_8gb") is not None:
            notes.append(f"{s['what']}: {s['memory_mb'] / 1024:.2f} GB -> {'fits' if s['fits_8gb'] else 'does NOT fit'} in {TARGET_GB:g} GB")
    return summary, notes, {}


def main(argv=None):
    return C.main("bench_memory", __doc__, make_cases, run_case, report, argv=argv, extra_args=extra_args)


if __name__ == "__main__":
    main()
