"""mvsnb.crossview: the batched round-trip check against a per-pixel Python loop, ground truth passes and
perturbations fail, chunking changes nothing, the on-disk MVSNet layout, and bad input."""
import json, math, warnings
from dataclasses import replace
import numpy as np
import pytest
import torch

pytest.importorskip("open3d")
from mvsnb.synthetic import make_scene, write_scene
from mvsnb.crossview import (CrossViewConfig, CROSSVIEW_PRESETS, cross_view_check, check_view, round_trip,
                             load_depth_outputs, run_check)
from mvsnb.camera import scale_intrinsics
from mvsnb.core import InputError
from mvsnb.io import write_pfm, read_pfm, read_image

pytestmark = pytest.mark.open3d


@pytest.fixture(scope="module")
def tiny():
    "3 views 12x16 with noisy depth, a few outliers, holes (0) and NaNs, and random confidences."
    sc = make_scene(views=3, height=12, width=16, seed=2)
    g = torch.Generator().manual_seed(3)
    d = sc.depth * (1 + 0.006 * torch.randn(sc.depth.shape, generator=g))
    out = torch.rand(sc.depth.shape, generator=g) < 0.05
    d = torch.where(out, d * 1.2, d)
    d[0, 0, 2, 3] = 0; d[1, 0, 5, 5] = float("nan"); d[2, 0, 0, :4] = 0
    conf = torch.rand(sc.depth.shape, generator=g)
    return sc, d, conf


@pytest.fixture(scope="module")
def scene():
    return make_scene(views=5, height=48, width=64, seed=1)


# ---------------------------------------------------------------- brute-force reference (float64, per pixel)
def bilinear_or_none(D, u, v):
    """Bilinear read of D (0/NaN = none) at (u, v); None when any of the four pixels around (u, v) with a
    non-zero interpolation weight lies outside the image or has no depth."""
    H, W = D.shape
    if not (np.isfinite(u) and np.isfinite(v)): return None
    u0, v0 = math.floor(u), math.floor(v)
    a, b = u - u0, v - v0
    val, bad = 0.0, 0.0
    for du, dv, w in ((0, 0, (1 - a) * (1 - b)), (1, 0, a * (1 - b)), (0, 1, (1 - a) * b), (1, 1, a * b)):
        x = D[v0 + dv, u0 + du] if 0 <= v0 + dv < H and 0 <= u0 + du < W else np.nan
        if np.isfinite(x) and x > 0: val += w * x
        else: bad += w
    return None if bad > 0 else val


def nearest_or_none(D, u, v):
    "The nearest pixel (ties to even, as grid_sample rounds), None when it is outside or has no depth."
    H, W = D.shape
    if not (np.isfinite(u) and np.isfinite(v)): return None
    i, j = int(np.rint(v)), int(np.rint(u))
    if not (0 <= i < H and 0 <= j < W): return None
    x = D[i, j]
    return x if np.isfinite(x) and x > 0 else None


def loop_check(depths, confs, K, w2c, pairs, cfg):
    "The whole check as a per-pixel, per-source Python loop in float64."
    D = depths[:, 0].double().numpy(); C = None if confs is None else confs[:, 0].double().numpy()
    K = K.double().numpy(); w2c = w2c.double().numpy()
    V, H, W = D.shape
    out_d, out_s, out_n, out_m = (np.zeros((V, H, W)) for _ in range(4))
    eps = cfg.eps
    for r, srcs in pairs:
        srcs = [s for s, _ in srcs][:cfg.num_src]
        need = cfg.required_views(len(srcs))
        Kr_inv = np.linalg.inv(K[r])
        for i in range(H):
            for j in range(W):
                d = D[r, i, j]
                if not (np.isfinite(d) and d > 0): continue
                X = d * Kr_inv @ np.array([j, i, 1.0])
                Xw = np.linalg.inv(w2c[r]) @ np.append(X, 1)
                good = []
                for s in srcs:
                    Xs = (w2c[s] @ Xw)[:3]
                    if Xs[2] <= eps: continue
                    q = K[s] @ Xs; u, v = q[0] / q[2], q[1] / q[2]
                    ds = (bilinear_or_none if cfg.sample_mode == "bilinear" else nearest_or_none)(D[s], u, v)
                    if ds is None or ds <= eps: continue
                    Ys = ds * np.linalg.inv(K[s]) @ np.array([u, v, 1.0])
                    Yr = (w2c[r] @ np.linalg.inv(w2c[s]) @ np.append(Ys, 1))[:3]
                    if Yr[2] <= eps: continue
                    p = K[r] @ Yr; pu, pv = p[0] / p[2], p[1] / p[2]
                    if cfg.method == "roundtrip":
                        ok = math.hypot(pu - j, pv - i) < cfg.tau_reproj and abs(Yr[2] - d) / d < cfg.tau_geo
                    else:
                        b = np.linalg.norm(np.linalg.inv(w2c[r])[:3, 3] - np.linalg.inv(w2c[s])[:3, 3])
                        ok = K[s][0, 0] * b * abs(1 / Xs[2] - 1 / ds) < cfg.tau_disp
                    if ok: good.append(Yr[2])
                conf_ok = C is None or C[r, i, j] > cfg.tau_conf
                out_n[r, i, j] = len(good) if conf_ok or not cfg.skip_low_conf else 0  # skipped pixels report 0
                keep = len(good) >= need and conf_ok
                if keep:
                    vals = np.array([d] + good)
                    out_m[r, i, j], out_d[r, i, j], out_s[r, i, j] = 1, vals.mean(), vals.std()
    return out_d, out_s, out_n, out_m.astype(bool)


@pytest.mark.parametrize("cfg", [CrossViewConfig(min_views=1, tau_conf=0.3), CrossViewConfig(min_views=2, tau_geo=0.008, tau_conf=0.1),
                                 CrossViewConfig.preset("kdmvs_release"), CrossViewConfig.preset("selfsup_cvp", min_views=1),
                                 CrossViewConfig(min_views=1, tau_reproj=0.3, sample_mode="nearest"),
                                 CrossViewConfig(min_views=1, tau_conf=0.5, skip_low_conf=False)],
                         ids=["eval_1view", "2views", "kdmvs_release", "selfsup_cvp", "nearest", "no_skip"])
@pytest.mark.parametrize("kernel", ["native", "eager"])
def test_feature_matches_per_pixel_loop(tiny, cfg, kernel):
    "Both CPU kernels (the native C one and eager torch) against the brute-force float64 loop: identical decisions."
    import mvsnb.crossview as cv
    sc, d, conf = tiny
    cfg = replace(cfg, compile=kernel == "native")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no silent fallback from the native kernel
        res = cross_view_check(d, conf, sc.K, sc.w2c, sc.pairs, cfg)
    assert cv._use_native(cfg, "cpu", 18 * 14) == (kernel == "native")
    ref_d, ref_s, ref_n, ref_m = loop_check(d, conf, sc.K, sc.w2c, sc.pairs, cfg)
    assert 0.05 < ref_m.mean() < 0.95, ref_m.mean()  # a test that can fail: some kept, some rejected
    np.testing.assert_array_equal(res.count[:, 0].numpy(), ref_n)
    np.testing.assert_array_equal(res.mask[:, 0].numpy(), ref_m)
    np.testing.assert_allclose(res.depth[:, 0].numpy(), ref_d, rtol=2e-6, atol=1e-5)
    np.testing.assert_allclose(res.sigma[:, 0].numpy(), ref_s, rtol=1e-3, atol=2e-5)
    assert (res.sigma[res.mask] > 0).any()


def test_feature_round_trip_of_gt_is_identity(scene):
    rt = round_trip(scene.depth[:1], scene.K[0], scene.w2c[0], scene.depth[1:3], scene.K[1:3], scene.w2c[1:3])
    grid = torch.stack(torch.meshgrid(torch.arange(64.), torch.arange(48.), indexing="xy"))
    err = (rt["uv_back"] - grid).norm(dim=1, keepdim=True)[rt["valid"]]
    assert rt["valid"].float().mean() > 0.7
    assert err.median() < 1e-2 and (err < 1.0).float().mean() > 0.85  # the rest: bilinear reads across depth edges


def clean_visible_count(sc, v, srcs, tol=0.05):
    """Sources that see the reference pixel's GT point with all four pixels around its projection on the same
    surface (GT depth within `tol` of the point's depth, far below the depth jumps at occlusions): the pixels
    the check must keep."""
    from mvsnb.camera import reproject, relative_pose
    H, W = sc.depth.shape[-2:]
    n = torch.zeros(H, W, dtype=torch.int32)
    for s in srcs:
        uv, z = reproject(sc.depth[v:v + 1], sc.K[v:v + 1], sc.K[s:s + 1], relative_pose(sc.w2c[s:s + 1], sc.w2c[v:v + 1]))
        uv = uv[0].nan_to_num(-100.0); z = z[0, 0]
        u0, v0 = uv[0].floor().long(), uv[1].floor().long()
        ok = (uv[0] >= 0) & (uv[0] <= W - 1) & (uv[1] >= 0) & (uv[1] <= H - 1)
        for du in (0, 1):
            for dv in (0, 1):
                ds = sc.depth[s, 0][(v0 + dv).clamp(0, H - 1), (u0 + du).clamp(0, W - 1)]
                ok &= (ds - z).abs() < tol * z
        n += ok.int()
    return n


def test_feature_gt_passes_perturbed_fails(scene):
    res = cross_view_check(scene.depth, None, scene.K, scene.w2c, scene.pairs, "eval_fusion")
    for v, srcs in scene.pairs:
        vis = (clean_visible_count(scene, v, [s for s, _ in srcs]) >= 3) & scene.valid[v, 0]
        assert vis.float().mean() > 0.5
        assert res.mask[v, 0][vis].float().mean() > 0.99, v  # nearly every cleanly seen pixel passes
        assert (res.mask[v, 0] & ~vis).float().mean() < 0.03, v  # and little else
        m = res.mask[v, 0]
        rel = (res.depth[v, 0][m] - scene.depth[v, 0][m]).abs() / scene.depth[v, 0][m]
        # d̂ of GT is GT up to bilinear interpolation of z-depth (not linear in the image: ~1e-3 on the steep
        # ground of a 48x64 view) and reads that mix surfaces within tau_geo
        assert rel.median() < 2e-4 and rel.quantile(0.9) < 2e-3 and rel.max() < 0.01
    bad = scene.depth.clone()
    bad[2, :, 10:30, 15:50] *= 1.02  # 2 % away: twice tau_geo
    bad[3, :, 5:20, 5:25] = bad[3, :, 5:20, 5:25].flip(-1)  # scrambled patch
    res_bad = cross_view_check(bad, None, scene.K, scene.w2c, scene.pairs, "eval_fusion")
    assert res_bad.mask[2, 0, 10:30, 15:50].float().mean() < 0.01
    assert res_bad.mask[3, 0, 5:20, 5:25].float().mean() < 0.5 * res.mask[3, 0, 5:20, 5:25].float().mean()
    outside = torch.ones(48, 64, dtype=torch.bool); outside[10:30, 15:50] = False
    assert res_bad.mask[2, 0][outside].float().mean() > 0.9 * res.mask[2, 0][outside].float().mean()
    # σ̂ grows with noise
    g = torch.Generator().manual_seed(0)
    noisy = scene.depth * (1 + 0.002 * torch.randn(scene.depth.shape, generator=g))
    rn = cross_view_check(noisy, None, scene.K, scene.w2c, scene.pairs, "eval_fusion")
    rel = (rn.sigma / rn.depth.clamp(min=1e-9))[rn.mask]
    assert 0.0005 < rel.median() < 0.004


@pytest.mark.parametrize("src_chunk,max_px", [(1, 10 ** 9), (None, 4 * 64), (3, 3 * 450), (2, 2 * 97)])
def test_feature_chunked_equals_unchunked(tiny, scene, src_chunk, max_px):
    g = torch.Generator().manual_seed(1)
    d = scene.depth * (1 + 0.004 * torch.randn(scene.depth.shape, generator=g))
    conf = torch.rand(d.shape, generator=g)
    full = cross_view_check(d, conf, scene.K, scene.w2c, scene.pairs, CrossViewConfig(tau_conf=0.2))
    ch = cross_view_check(d, conf, scene.K, scene.w2c, scene.pairs, CrossViewConfig(tau_conf=0.2, src_chunk=src_chunk, max_batch_pixels=max_px))
    assert torch.equal(full.mask, ch.mask) and torch.equal(full.count, ch.count)
    torch.testing.assert_close(ch.depth, full.depth, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ch.sigma, full.sigma, rtol=1e-4, atol=1e-6)
    if src_chunk == 1:  # skipping low-confidence pixels only saves work: same decisions, counts where checked
        ns = cross_view_check(d, conf, scene.K, scene.w2c, scene.pairs, CrossViewConfig(tau_conf=0.2, skip_low_conf=False))
        assert torch.equal(ns.mask, full.mask) and torch.equal(ns.depth, full.depth)
        hi = conf > 0.2
        assert torch.equal(ns.count[hi], full.count[hi]) and (full.count[~hi] == 0).all() and (ns.count[~hi] > 0).any()


def test_feature_num_src_and_presets(scene):
    r4 = cross_view_check(scene.depth, None, scene.K, scene.w2c, scene.pairs, CrossViewConfig(min_views=2))
    r2 = cross_view_check(scene.depth, None, scene.K, scene.w2c, scene.pairs, CrossViewConfig(min_views=2, num_src=2))
    assert (r2.count <= 2).all() and (r2.count <= r4.count).all() and r2.mask.sum() < r4.mask.sum()
    p = CROSSVIEW_PRESETS
    assert (p["kdmvs_paper"].tau_conf, p["kdmvs_paper"].tau_reproj, p["kdmvs_paper"].tau_geo) == (0.15, 1.0, 0.01)
    assert (p["kdmvs_release"].tau_conf, p["kdmvs_release"].tau_geo, p["kdmvs_release"].required_views(10)) == (0.05, 0.005, 7)
    assert (p["selfsup_cvp"].method, p["selfsup_cvp"].tau_disp, p["selfsup_cvp"].min_views, p["selfsup_cvp"].tau_conf) == ("disparity", 0.13, 3, 0.8)
    e = p["eval_fusion"]
    assert (e.tau_reproj, e.tau_geo, e.min_views, e.tau_conf) == (1.0, 0.01, 3, 0.8)
    # a preset is a copy: changing it does not change the table
    c = CrossViewConfig.preset("eval_fusion"); c.tau_geo = 0.5
    assert CROSSVIEW_PRESETS["eval_fusion"].tau_geo == 0.01


def test_feature_check_view_matches_batched(tiny):
    sc, d, conf = tiny
    cfg = CrossViewConfig(min_views=1, compile=False)  # check_view runs the torch kernels: compare like with like
    res = cross_view_check(d, conf, sc.K, sc.w2c, sc.pairs, cfg)
    v = 1; ids = [s for s, _ in dict(sc.pairs)[v]]
    one = check_view(d[v:v + 1], conf[v:v + 1], sc.K[v], sc.w2c[v], d[ids], sc.K[ids], sc.w2c[ids], cfg)
    assert torch.equal(one["mask"], res.mask[v:v + 1]) and torch.equal(one["depth"], res.depth[v:v + 1])
    sub = cross_view_check(d, conf, sc.K, sc.w2c, sc.pairs, cfg, views=[v])  # only view 1; the others empty
    assert torch.equal(sub.mask[v], res.mask[v]) and not sub.mask[[0, 2]].any() and sub.kept_fraction[0] == 0
    with pytest.raises(InputError, match=r"\[views\]"): cross_view_check(d, conf, sc.K, sc.w2c, sc.pairs, cfg, views=[3])


# ---------------------------------------------------------------- the compiled kernel
def with_compile(cfg, value): return CrossViewConfig(**{**cfg.__dict__, "compile": value, "native": False})  # torch.compile's kernel


@pytest.mark.slow  # three torch.compile runs (roundtrip/bilinear, disparity/nearest, roundtrip/nearest): ~5-15 s each
@pytest.mark.parametrize("cfg", [CrossViewConfig(min_views=2, tau_geo=0.008, tau_conf=0.1), CrossViewConfig.preset("selfsup_cvp", min_views=1),
                                 CrossViewConfig(min_views=1, tau_reproj=0.3, sample_mode="nearest", skip_low_conf=False)],
                         ids=["roundtrip_bilinear", "disparity_nearest", "roundtrip_nearest_noskip"])
def test_feature_compiled_matches_per_pixel_loop_and_eager(tiny, scene, cfg):
    "The fused, compiled kernel against the brute-force loop (exact decisions) and the eager kernel on a larger scene."
    import mvsnb.crossview as cv
    sc, d, conf = tiny
    n_log = len(cv._COMPILE_LOG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = cross_view_check(d, conf, sc.K, sc.w2c, sc.pairs, with_compile(cfg, True))
    assert not [w for w in caught if "torch.compile failed" in str(w.message)]  # no silent eager fallback here
    assert cv._COMPILED.get("cpu") is not None
    ref_d, ref_s, ref_n, ref_m = loop_check(d, conf, sc.K, sc.w2c, sc.pairs, cfg)
    assert 0.05 < ref_m.mean() < 0.95, ref_m.mean()
    np.testing.assert_array_equal(res.count[:, 0].numpy(), ref_n)
    np.testing.assert_array_equal(res.mask[:, 0].numpy(), ref_m)
    np.testing.assert_allclose(res.depth[:, 0].numpy(), ref_d, rtol=2e-6, atol=1e-5)
    np.testing.assert_allclose(res.sigma[:, 0].numpy(), ref_s, rtol=1e-3, atol=2e-5)
    # eager vs compiled on 5 views 48x64 with noise, in chunks (the last one padded) and source batches
    g = torch.Generator().manual_seed(5)
    dn = scene.depth * (1 + 0.004 * torch.randn(scene.depth.shape, generator=g))
    cn = torch.rand(dn.shape, generator=g)
    small = dict(max_batch_pixels=2 * 300, src_chunk=2)  # 4 sources in 2 batches, chunks of 256 pixels
    e = cross_view_check(dn, cn, scene.K, scene.w2c, scene.pairs, CrossViewConfig(**{**cfg.__dict__, "compile": False, **small}))
    c = cross_view_check(dn, cn, scene.K, scene.w2c, scene.pairs, CrossViewConfig(**{**cfg.__dict__, "compile": True, "native": False, **small}))
    assert 0.05 < e.mask.float().mean() < 0.95
    assert (e.mask != c.mask).float().mean() <= 1e-3 and (e.count != c.count).float().mean() <= 1e-3
    both = e.mask & c.mask
    torch.testing.assert_close(c.depth[both], e.depth[both], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c.sigma[both], e.sigma[both], rtol=1e-2, atol=1e-5)
    new = cv._COMPILE_LOG[n_log:]
    assert new and all(x["first_call_s"] > 0 and x["device"] == "cpu" for x in new)


def test_feature_compile_fallback_and_auto(tiny, monkeypatch):
    "A kernel that fails to compile warns once and the eager kernel gives the result; 'auto' compiles only big calls."
    import mvsnb.crossview as cv
    sc, d, conf = tiny
    calls = []
    def broken(*a, **k):
        calls.append(1); raise RuntimeError("no C++ compiler (simulated)")
    monkeypatch.setattr(cv, "_COMPILED", {"cpu": broken})
    cfg = CrossViewConfig(min_views=1, tau_conf=0.3)
    eager = cross_view_check(d, conf, sc.K, sc.w2c, sc.pairs, with_compile(cfg, False))
    cfg = replace(cfg, native=False)  # this test is about torch.compile's kernel
    big = CrossViewConfig(**{**cfg.__dict__, "compile": "auto", "compile_min_pairs": 10 ** 9})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = cross_view_check(d, conf, sc.K, sc.w2c, sc.pairs, big)  # too little work: "auto" stays eager, no attempt
    assert not calls and torch.equal(r.mask, eager.mask)
    with pytest.warns(UserWarning, match="torch.compile failed.*simulated"):
        r = cross_view_check(d, conf, sc.K, sc.w2c, sc.pairs, CrossViewConfig(**{**cfg.__dict__, "compile_min_pairs": 1}))
    assert len(calls) == 1 and cv._COMPILED["cpu"] is None
    assert torch.equal(r.mask, eager.mask) and torch.equal(r.count, eager.count) and torch.equal(r.depth, eager.depth)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: later calls go straight to the eager kernel
        r = cross_view_check(d, conf, sc.K, sc.w2c, sc.pairs, with_compile(cfg, True))
    assert len(calls) == 1 and torch.equal(r.mask, eager.mask)
    with pytest.raises(InputError, match=r"\[compile\]"): CrossViewConfig(compile="yes")


# ---------------------------------------------------------------- the native kernel
@pytest.mark.parametrize("cfg", [CrossViewConfig(min_views=2, tau_geo=0.008, tau_conf=0.1), CrossViewConfig.preset("selfsup_cvp", min_views=1),
                                 CrossViewConfig(min_views=1, tau_reproj=0.3, sample_mode="nearest", skip_low_conf=False)],
                         ids=["roundtrip_bilinear", "disparity_nearest", "roundtrip_nearest_noskip"])
def test_feature_native_matches_eager_on_noisy_scene(scene, cfg):
    "The native kernel against eager torch on 5 views 48x64 with noise: decisions to float32 rounding, any thread count."
    g = torch.Generator().manual_seed(5)
    dn = scene.depth * (1 + 0.004 * torch.randn(scene.depth.shape, generator=g))
    dn[1, 0, 10:14, 20:30] = float("nan"); dn[2, 0, :3] = 0  # holes
    cn = torch.rand(dn.shape, generator=g)
    e = cross_view_check(dn, cn, scene.K, scene.w2c, scene.pairs, replace(cfg, compile=False))
    n = cross_view_check(dn, cn, scene.K, scene.w2c, scene.pairs, replace(cfg, compile=True))
    assert 0.05 < e.mask.float().mean() < 0.95
    assert (e.mask != n.mask).float().mean() <= 1e-3 and (e.count != n.count).float().mean() <= 1e-3
    both = e.mask & n.mask
    torch.testing.assert_close(n.depth[both], e.depth[both], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(n.sigma[both], e.sigma[both], rtol=1e-2, atol=1e-5)
    assert not n.depth[~n.mask].any() and not n.sigma[~n.mask].any()  # zeros where not kept, not leftovers
    torch.testing.assert_close(n.kept_fraction, e.kept_fraction, rtol=0, atol=1e-3)
    assert n.required_views == e.required_views
    # threads split the rows: the result does not depend on how many
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1); one = cross_view_check(dn, cn, scene.K, scene.w2c, scene.pairs, replace(cfg, compile=True))
        torch.set_num_threads(3); three = cross_view_check(dn, cn, scene.K, scene.w2c, scene.pairs, replace(cfg, compile=True))
    finally: torch.set_num_threads(before)
    for a in (one, three):
        assert torch.equal(a.mask, n.mask) and torch.equal(a.count, n.count) and torch.equal(a.depth, n.depth)
    # a subset of views (the others come back empty), strided input, a view listed twice
    strided = dn.transpose(2, 3).contiguous().transpose(2, 3)
    sub = cross_view_check(strided, cn, scene.K, scene.w2c, scene.pairs, replace(cfg, compile=True), views=[3, 1, 3])
    assert torch.equal(sub.mask[[1, 3]], n.mask[[1, 3]]) and torch.equal(sub.depth[[1, 3]], n.depth[[1, 3]])
    assert not sub.mask[[0, 2, 4]].any() and not sub.count[[0, 2, 4]].any() and (sub.kept_fraction[[0, 2, 4]] == 0).all()


def test_feature_native_fallback(tiny, monkeypatch):
    "Without a C compiler the native kernel warns once and the torch kernels give the result."
    import mvsnb.crossview as cv
    from mvsnb.native import NativeBuildError
    sc, d, conf = tiny
    calls = []
    def no_compiler(*a, **k):
        calls.append(1); raise NativeBuildError("no C compiler found (simulated)")
    monkeypatch.setattr(cv, "_NATIVE", {}); monkeypatch.setattr(cv, "build_native", no_compiler)
    cfg = CrossViewConfig(min_views=1, tau_conf=0.3)
    eager = cross_view_check(d, conf, sc.K, sc.w2c, sc.pairs, replace(cfg, compile=False))
    assert not calls  # compile=False never builds
    with pytest.warns(UserWarning, match="native kernel could not be built.*simulated"):
        r = cross_view_check(d, conf, sc.K, sc.w2c, sc.pairs, replace(cfg, compile_min_pairs=10 ** 9))
    assert torch.equal(r.mask, eager.mask) and torch.equal(r.depth, eager.depth) and len(calls) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once
        r = cross_view_check(d, conf, sc.K, sc.w2c, sc.pairs, replace(cfg, compile_min_pairs=10 ** 9))
    assert len(calls) == 1 and torch.equal(r.mask, eager.mask)


# ---------------------------------------------------------------- bad input
def test_exception_bad_input(tiny):
    sc, d, conf = tiny
    with pytest.raises(InputError, match=r"\[K\]"): cross_view_check(d[:2], None, sc.K, sc.w2c, sc.pairs)
    with pytest.raises(InputError, match=r"\[confs\]"): cross_view_check(d, conf[..., :8], sc.K, sc.w2c, sc.pairs)
    for fill in (0.0, float("nan"), -1.0):
        bad = d.clone(); bad[1] = fill
        with pytest.raises(InputError, match=r"\[depths\[1\]\]: depth map of view 1 has no valid pixel"): cross_view_check(bad, None, sc.K, sc.w2c, sc.pairs)
    with pytest.raises(InputError, match=r"views \[2\] have no entry"): cross_view_check(d, None, sc.K, sc.w2c, sc.pairs[:2], CrossViewConfig(min_views=1))
    with pytest.raises(InputError, match="source view 7"): cross_view_check(d, None, sc.K, sc.w2c, [(0, [(7, 1.0)]), *sc.pairs[1:]], CrossViewConfig(min_views=1))
    with pytest.raises(InputError, match="reference view 5"): cross_view_check(d, None, sc.K, sc.w2c, [*sc.pairs, (5, [(0, 1.0)])], CrossViewConfig(min_views=1))
    with pytest.raises(InputError, match="itself"): cross_view_check(d, None, sc.K, sc.w2c, [(0, [(0, 1.0)]), *sc.pairs[1:]], CrossViewConfig(min_views=1))
    with pytest.raises(InputError, match="needs 3"): cross_view_check(d, None, sc.K, sc.w2c, sc.pairs)  # 2 sources, eval needs 3
    Kb = sc.K.clone(); Kb[2, 0, 0] = float("nan")
    with pytest.raises(InputError, match=r"camera of view 2"): cross_view_check(d, None, Kb, sc.w2c, sc.pairs, CrossViewConfig(min_views=1))
    with pytest.raises(InputError, match="unknown preset"): cross_view_check(d, None, sc.K, sc.w2c, sc.pairs, "kd")
    with pytest.raises(InputError, match=r"\[min_views_frac\]"): CrossViewConfig(min_views_frac=1.5)


@pytest.mark.cuda
def test_feature_cuda_matches_cpu(scene):
    g = torch.Generator().manual_seed(0)
    d = scene.depth * (1 + 0.003 * torch.randn(scene.depth.shape, generator=g))
    cpu = cross_view_check(d, None, scene.K, scene.w2c, scene.pairs)
    gpu = cross_view_check(d.cuda(), None, scene.K.cuda(), scene.w2c.cuda(), scene.pairs)
    assert gpu.depth.is_cuda and gpu.mask.is_cuda
    assert (gpu.mask.cpu() != cpu.mask).float().mean() < 1e-3
    both = gpu.mask.cpu() & cpu.mask
    torch.testing.assert_close(gpu.depth.cpu()[both], cpu.depth[both], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- on disk
def write_outputs(sc_depth, root, conf=None):
    for v in range(sc_depth.shape[0]):
        write_pfm(root / "depth_est" / f"{v:08d}.pfm", sc_depth[v, 0].numpy())
        if conf is not None: write_pfm(root / "confidence" / f"{v:08d}.pfm", conf[v, 0].numpy())


def test_feature_run_check_round_trip(scene, tmp_path):
    write_scene(scene, tmp_path / "scene")
    small = make_scene(views=5, height=24, width=32, seed=1)  # the same scene at half size: a network's output size
    g = torch.Generator().manual_seed(0)
    d = small.depth * (1 + 0.002 * torch.randn(small.depth.shape, generator=g))
    conf = torch.rand(d.shape, generator=g)
    write_outputs(d, tmp_path / "out", conf)
    data = load_depth_outputs(tmp_path / "scene", tmp_path / "out")
    torch.testing.assert_close(data["K"], small.K, rtol=1e-6, atol=1e-5)  # scaled from 64x48 to 32x24 ("center")
    assert data["image_hw"] == (48, 64) and data["depth_hw"] == (24, 32)
    cfg = CrossViewConfig(tau_conf=0.3)
    summary = run_check(tmp_path / "scene", tmp_path / "out", tmp_path / "chk", cfg)
    direct = cross_view_check(d, conf, small.K, small.w2c, small.pairs, cfg)
    for v in range(5):
        dd = read_pfm(tmp_path / "chk" / "checked_depth" / f"{v:08d}.pfm")
        ss = read_pfm(tmp_path / "chk" / "sigma" / f"{v:08d}.pfm")
        mm = read_image(tmp_path / "chk" / "mask" / f"{v:08d}.png", raw=True) > 0
        np.testing.assert_array_equal(mm, direct.mask[v, 0].numpy())
        np.testing.assert_allclose(dd, direct.depth[v, 0].numpy(), rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(ss, direct.sigma[v, 0].numpy(), rtol=1e-4, atol=1e-6)
    on_disk = json.loads((tmp_path / "chk" / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["config"]["tau_conf"] == 0.3 and on_disk["confidence"] is True
    np.testing.assert_allclose(list(on_disk["kept_fraction"].values()), direct.kept_fraction.numpy(), atol=1e-6)
    # refuses to overwrite; replaces with overwrite=True; legacy K scaling changes the cameras
    with pytest.raises(InputError, match="exists"): run_check(tmp_path / "scene", tmp_path / "out", tmp_path / "chk", cfg)
    run_check(tmp_path / "scene", tmp_path / "out", tmp_path / "chk", "kdmvs_release", overwrite=True)
    assert json.loads((tmp_path / "chk" / "summary.json").read_text())["config"]["tau_geo"] == 0.005
    legacy = load_depth_outputs(tmp_path / "scene", tmp_path / "out", k_scale_mode="legacy")
    assert (legacy["K"][:, :2, 2] - data["K"][:, :2, 2]).abs().max() == pytest.approx(0.25, abs=1e-5)


@pytest.mark.filterwarnings("ignore:.*confidence test")
def test_exception_run_check_inputs(scene, tmp_path):
    write_scene(scene, tmp_path / "scene")
    with pytest.raises(InputError, match="depth_est"): run_check(tmp_path / "scene", tmp_path / "none", tmp_path / "o")
    write_outputs(scene.depth[:4], tmp_path / "out")  # view 4 missing
    with pytest.raises(InputError, match="00000004.pfm"): run_check(tmp_path / "scene", tmp_path / "out", tmp_path / "o")
    write_pfm(tmp_path / "out" / "depth_est" / "00000004.pfm", np.zeros((48, 64), np.float32))  # all zero
    with pytest.raises(InputError, match="view 4 has no valid pixel"): run_check(tmp_path / "scene", tmp_path / "out", tmp_path / "o")
    write_pfm(tmp_path / "out" / "depth_est" / "00000004.pfm", np.ones((40, 64), np.float32))
    with pytest.raises(InputError, match="differs from view 0"): run_check(tmp_path / "scene", tmp_path / "out", tmp_path / "o")
    write_pfm(tmp_path / "out" / "depth_est" / "00000004.pfm", scene.depth[4, 0].numpy())
    with pytest.warns(UserWarning, match="confidence test"):
        s = run_check(tmp_path / "scene", tmp_path / "out", tmp_path / "o")
    assert s["confidence"] is False and s["kept_fraction_mean"] > 0.5
    assert not any(p.name.startswith(".o.") for p in tmp_path.iterdir())  # no temporary folder left behind
