"""mvsnb.synthetic: exact ground truth (cross-view, brute-force ray casting, analytic shapes), photo-consistency,
determinism, speed, and the on-disk round trip."""
import json, math, time
import numpy as np
import pytest
import torch
from torch.testing import assert_close

pytest.importorskip("open3d")
S = pytest.importorskip("mvsnb.synthetic")
from mvsnb.camera import relative_pose, reproject, depth_to_world, camera_centers
from mvsnb.core import sample_image, InputError

pytestmark = pytest.mark.open3d


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    "Tiny tensors: on a shared 2-core machine torch's thread hand-offs cost far more than they save."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def scene(one_thread):
    return S.make_scene(views=5, height=64, width=80, seed=0)


# ---------------------------------------------------------------- helpers written independently of the module
def corners(x, uv):
    "x (1,C,H,W) at the 4 integer pixels around uv (1,2,...) → (4,1,C,...)."
    H, W = x.shape[-2:]
    u0, v0 = uv[:, :1].floor().clamp(0, W - 2), uv[:, 1:].floor().clamp(0, H - 2)
    out = []
    for du, dv in ((0, 0), (1, 0), (0, 1), (1, 1)):
        idx = ((v0 + dv) * W + u0 + du).long().flatten()
        out.append(x.flatten(2)[:, :, idx].reshape(1, x.shape[1], *uv.shape[2:]))
    return torch.stack(out)


def correspond(sc, i, j, tol=1e-3):
    """Classify view i's pixels against view j's GT. Where the 4 pixels around the projection lie on one plane of
    view j, bilinear interpolation of inverse depth is exact, so a point is on that plane, behind it (occluded)
    or in front of it (impossible for exact GT)."""
    K, w2c, D = sc.K, sc.w2c, sc.depth
    uv, z = reproject(D[i:i+1], K[i:i+1], K[j:j+1], relative_pose(w2c[j:j+1], w2c[i:i+1]))
    uv = uv.nan_to_num(-10.0); H, W = D.shape[-2:]
    inside = (uv[:, :1] >= 0) & (uv[:, :1] <= W - 1) & (uv[:, 1:] >= 0) & (uv[:, 1:] <= H - 1) & sc.valid[i:i+1]
    n = sc.normal[j:j+1]
    plane = torch.cat([n, (n * depth_to_world(D[j:j+1], K[j:j+1], w2c[j:j+1])).sum(1, keepdim=True)], 1)
    c = corners(plane, uv)
    planar = ((c - c[:1]).abs().amax(dim=(0, 2)) < 1e-4 * (1 + c[0, :, 3].abs())) & corners(sc.valid[j:j+1], uv).all(0)[:, 0]
    inv, _ = sample_image(torch.where(sc.valid[j:j+1], 1 / D[j:j+1].clamp(min=1e-9), 0.0), uv)
    rel, chk = z * inv - 1, inside & planar
    return dict(uv=uv, rel=rel, inside=inside, checked=chk, consistent=chk & (rel.abs() < tol),
                occluded=chk & (rel >= tol), in_front=chk & (rel <= -tol))


def colour_differences(sc, depth=None):
    "Mean |colour difference| at GT correspondences of all ordered view pairs: (Lambertian, glossy) pixel values."
    sc_d = sc if depth is None else S.Scene(**{**sc.__dict__, "depth": depth})
    lam, gloss = [], []
    V = sc.images.shape[0]
    for i in range(V):
        for j in range(V):
            if i == j: continue
            c, c_true = correspond(sc_d, i, j), correspond(sc, i, j)
            diff = (sample_image(sc.images[j:j+1], c["uv"])[0] - sc.images[i:i+1]).abs().mean(1, keepdim=True)
            mat_i, mat_j = sc.material[i:i+1], corners(sc.material[j:j+1], c["uv"])
            keep = c_true["consistent"] & c["inside"]
            lam.append(diff[keep & (mat_i == S.LAMBERTIAN)])
            gloss.append(diff[(mat_i == S.GLOSSY) & (mat_j == S.GLOSSY).all(0) & (c_true["rel"].abs() < 0.01) & c["inside"]])
    return torch.cat(lam), torch.cat(gloss)


def moller_trumbore(objects, origin, direction):
    "Nearest ray/triangle hit over every triangle (float64): (t, unit face normal)."
    best, normal = np.inf, None
    for obj in objects:
        a, b, c = (obj.vertices[obj.triangles[:, k]].astype(np.float64) for k in range(3))
        e1, e2 = b - a, c - a
        pv = np.cross(direction, e2); det = (e1 * pv).sum(1)
        ok = np.abs(det) > 1e-12; inv = np.where(ok, 1 / np.where(ok, det, 1), 0)
        s = origin - a; u = (s * pv).sum(1) * inv
        qv = np.cross(s, e1); v = (qv @ direction) * inv; t = (qv * e2).sum(1) * inv
        hit = ok & (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 1e-9)
        if hit.any():
            k = np.where(hit, t, np.inf).argmin()
            if t[k] < best:
                n = np.cross(e1[k], e2[k]); best, normal = t[k], n / np.linalg.norm(n)
    return best, normal


def pixel_ray(sc, v, row, col):
    "World ray through a pixel centre, direction scaled to z = 1 in the camera frame (float64)."
    K, w2c = sc.K[v].double(), sc.w2c[v].double()
    d_cam = torch.linalg.solve(K, torch.tensor([float(col), float(row), 1.0], dtype=torch.float64))
    return camera_centers(w2c).numpy(), (w2c[:3, :3].T @ d_cam).numpy()


# ---------------------------------------------------------------- ground truth
def test_feature_gt_cross_view_consistency(scene):
    tot = dict(checked=0, consistent=0, occluded=0, in_front=0, inside=0)
    for i in range(5):
        for j in range(5):
            if i == j: continue
            c = correspond(scene, i, j)
            for k in tot: tot[k] += int(c[k].sum())
    assert tot["checked"] > 0.5 * tot["inside"], tot  # the planar test leaves most pixels checkable
    assert tot["consistent"] >= 0.99 * (tot["consistent"] + tot["in_front"]), tot
    assert tot["in_front"] <= 1e-3 * tot["checked"], tot
    assert 0 < tot["occluded"] < 0.1 * tot["checked"], tot  # there is occlusion, but not much


def test_feature_cross_view_check_can_fail(scene):
    bad = S.Scene(**{**scene.__dict__, "depth": scene.depth.clone()})
    bad.depth[1] *= 1.02
    c = correspond(bad, 0, 1)
    assert c["in_front"].sum() > 0.2 * c["checked"].sum()


def test_feature_brute_force_ray_triangle(scene):
    "Open3D's depth and face normal match a per-pixel Möller–Trumbore loop over every triangle."
    objects = S.scene_objects(seed=0)
    rng = np.random.default_rng(1)
    for v, row, col in zip(rng.integers(0, 5, 30), rng.integers(0, 64, 30), rng.integers(0, 80, 30)):
        o, d = pixel_ray(scene, v, row, col)
        t, n = moller_trumbore(objects, o, d)
        assert scene.valid[v, 0, row, col] and math.isfinite(t)
        assert abs(float(scene.depth[v, 0, row, col]) - t) < 1e-5 * t
        assert abs(abs(float(scene.normal[v, :, row, col].double() @ torch.from_numpy(n))) - 1) < 1e-5
        assert float(scene.normal[v, :, row, col].double() @ torch.from_numpy(d)) < 0  # faces the camera


def test_feature_analytic_sphere_and_ground(scene):
    "GT depth agrees with analytic ray/sphere (up to tessellation) and ray/plane intersections."
    sph = next(o for o in S.scene_objects(seed=0) if o.material == S.GLOSSY)
    c, r = np.array(sph.center), sph.size[0]
    n_sphere = n_ground = 0
    for v in range(5):
        for row in range(0, 64, 3):
            for col in range(0, 80, 3):
                o, d = pixel_ray(scene, v, row, col)
                z = float(scene.depth[v, 0, row, col]); mat = int(scene.material[v, 0, row, col])
                oc = o - c; a, b, cc = d @ d, 2 * d @ oc, oc @ oc - r * r
                disc = b * b - 4 * a * cc
                if mat == S.GLOSSY:  # the ray hits the inscribed mesh, so it hits the sphere; not deeper than its far side
                    assert disc > 0
                    t0, t1 = (-b - math.sqrt(disc)) / (2 * a), (-b + math.sqrt(disc)) / (2 * a)
                    assert t0 - 1e-6 <= z <= t1
                    p = o + z * d
                    if abs(float(scene.normal[v, :, row, col].double() @ torch.from_numpy(d / np.linalg.norm(d)))) > 0.5:
                        assert abs(z - t0) < 0.012 * r  # chord error of a 24-segment sphere, away from the rim
                        n_sphere += 1
                    assert abs(np.linalg.norm(p - c) - r) < 0.012 * r
                elif d[2] < 0:
                    t_ground = -o[2] / d[2]
                    p = o + z * d
                    if abs(p[2]) < 1e-4 and float(scene.normal[v, 2, row, col]) > 0.999:  # sees the ground
                        assert abs(z - t_ground) < 1e-5 * t_ground; n_ground += 1
                    else:  # something else is in front of the ground
                        assert z < t_ground * (1 + 1e-6)
    assert n_sphere > 50 and n_ground > 500, (n_sphere, n_ground)


def test_feature_gt_points_on_visible_surfaces(scene):
    import open3d as o3d
    objects = S.scene_objects(seed=0)
    rc = S.raycaster(objects)
    P = scene.points
    assert 5000 < len(P) < 200_000
    dist = rc.compute_distance(o3d.core.Tensor(P.numpy())).numpy()
    assert dist.max() < 1e-4
    # each point is seen unoccluded by some camera: its depth there matches the GT depth map (nearest pixel)
    seen = torch.zeros(len(P), dtype=torch.bool)
    for v in range(5):
        xyz = P @ scene.w2c[v, :3, :3].T + scene.w2c[v, :3, 3]
        uv = xyz[:, :2] / xyz[:, 2:] @ scene.K[v, :2, :2].T + scene.K[v, :2, 2]
        ij = uv.round().long()
        ok = (ij[:, 0] >= 0) & (ij[:, 0] < 80) & (ij[:, 1] >= 0) & (ij[:, 1] < 64)
        dz = torch.full((len(P),), float("inf"))
        dz[ok] = (scene.depth[v, 0, ij[ok, 1], ij[ok, 0]] - xyz[ok, 2]).abs() / xyz[ok, 2]
        seen |= dz < 0.02
    assert seen.float().mean() > 0.9
    # normals are unit and face a camera
    assert_close(scene.point_normals.norm(dim=1), torch.ones(len(P)), atol=1e-5, rtol=0)
    C = camera_centers(scene.w2c)
    assert (((C[None] - P[:, None]) * scene.point_normals[:, None]).sum(-1) > 0).any(1).all()
    # the observation mask holds every GT point and excludes far-away space
    assert S.in_observation_mask(P, scene.obs_mask).all()
    assert not S.in_observation_mask(torch.tensor([[0.0, 0.0, 5.0], [10.0, 0, 0]]), scene.obs_mask).any()


def test_feature_depth_range_and_pairs(scene):
    d = scene.depth[scene.valid]
    assert scene.depth_min < d.min() and scene.depth_max > d.max()
    assert scene.depth_max < 1.2 * d.max() and scene.depth_min > 0.8 * d.min()
    assert [r for r, _ in scene.pairs] == list(range(5))
    for ref, srcs in scene.pairs:
        assert len(srcs) == 4 and ref not in [s for s, _ in srcs]
        scores = [sc for _, sc in srcs]
        assert scores == sorted(scores, reverse=True) and scores[0] > 0
    # on a 3x3 cap, the middle camera's best sources are its neighbours, not the corners
    s9 = S.make_scene(views=9, height=16, width=20, seed=0)
    C = camera_centers(s9.w2c)
    best = [s for s, _ in dict(s9.pairs)[4]][:4]
    dist = (C - C[4]).norm(dim=1)
    assert set(best) == set(dist.argsort()[1:5].tolist())


# ---------------------------------------------------------------- images
def test_feature_photo_consistency(scene):
    lam, gloss = colour_differences(scene)
    assert len(lam) > 10_000 and len(gloss) > 500
    assert lam.mean() < 0.02, lam.mean()
    assert gloss.mean() > 2 * lam.mean() and gloss.mean() > 0.025, (gloss.mean(), lam.mean())
    # a wrong depth is not photo-consistent: the check can fail
    wrong, _ = colour_differences(scene, depth=scene.depth * 1.03)
    assert wrong.mean() > 3 * lam.mean()


def test_feature_materials_occur():
    for seed in range(4):
        sc = S.make_scene(seed=seed)
        frac = [(sc.material == m).float().mean().item() for m in (S.LAMBERTIAN, S.TEXTURELESS, S.GLOSSY)]
        assert all(f > 0.01 for f in frac), (seed, frac)
        # the textureless solid itself is visible, not only the backdrop
        obj_textureless = (sc.material == S.TEXTURELESS) & (sc.normal[:, 2:3].abs() < 0.99)
        assert obj_textureless.sum() > 20, seed
        assert (sc.material == S.GLOSSY).flatten(1).any(1).all()  # the glossy sphere is in every view
        # textureless pixels really are flat in colour (up to shading) and textured ones are not
        img = sc.images
        gx = (img[..., 1:] - img[..., :-1]).abs().mean(1, keepdim=True)
        same = sc.material[..., 1:] == sc.material[..., :-1]
        same &= (sc.normal[..., 1:] - sc.normal[..., :-1]).abs().amax(1, keepdim=True) < 1e-4
        flat = gx[same & (sc.material[..., 1:] == S.TEXTURELESS)].mean()
        textured = gx[same & (sc.material[..., 1:] == S.LAMBERTIAN)].mean()
        assert flat < 0.2 * textured, (flat, textured)


def test_feature_lighting_modes(scene):
    pv = S.make_scene(seed=0, lighting="per_view")
    assert_close(pv.depth, scene.depth, atol=0, rtol=0)
    assert len(set(pv.meta["lights"])) > 1 and scene.meta["lights"] == [3] * 5
    assert (pv.images - scene.images).abs().mean() > 0.01
    fixed2 = S.make_scene(seed=0, light=2)
    assert fixed2.meta["lights"] == [2] * 5 and (fixed2.images - scene.images).abs().mean() > 0.01


def test_feature_shadows_darken(scene):
    flat = S.make_scene(seed=0, shadows=False, light=0)
    shadowed = S.make_scene(seed=0, light=0)
    diff = flat.images - shadowed.images
    assert diff.min() > -1e-6 and (diff.mean(1) > 0.05).float().mean() > 0.01


def test_feature_noise_option(scene):
    noisy = S.make_scene(seed=0, noise=0.02)
    d = noisy.images - scene.images
    assert 0.01 < d.std() < 0.03 and torch.equal(noisy.depth, scene.depth)


def test_feature_scale(scene):
    big = S.make_scene(seed=0, scale=100.0)
    m = scene.valid & big.valid
    assert_close(big.depth[m], 100 * scene.depth[m], rtol=1e-4, atol=0)
    assert (big.images - scene.images).abs().mean() < 1e-3  # textures and lights do not depend on the scale


# ---------------------------------------------------------------- determinism, sizes, speed, errors
def test_feature_determinism(scene):
    again = S.make_scene(views=5, height=64, width=80, seed=0)
    for k in ("images", "depth", "normal", "valid", "material", "points", "point_normals", "K", "w2c"):
        assert torch.equal(getattr(again, k), getattr(scene, k)), k
    assert again.pairs == scene.pairs and again.meta == scene.meta
    other = S.make_scene(views=5, height=64, width=80, seed=1)
    assert torch.equal(other.K, scene.K) and torch.equal(other.w2c, scene.w2c)  # the rig is the same for every seed
    assert (other.depth - scene.depth).abs().mean() > 0.01 and (other.images - scene.images).abs().mean() > 0.02


@pytest.mark.parametrize("views,H,W", [(1, 16, 20), (2, 16, 20), (3, 24, 32), (7, 8, 10)])
def test_shape_sizes(views, H, W):
    sc = S.make_scene(views=views, height=H, width=W)
    assert sc.images.shape == (views, 3, H, W) and sc.depth.shape == (views, 1, H, W) and sc.normal.shape == (views, 3, H, W)
    assert sc.material.dtype == torch.uint8 and sc.valid.dtype == torch.bool and sc.images.dtype == torch.float32
    assert sc.valid.all() and len(sc.pairs) == views and all(len(s) == min(10, views - 1) for _, s in sc.pairs)
    assert sc.points.shape[1] == 3 and sc.point_normals.shape == sc.points.shape


def test_smoke_tiny_build_time(scene):
    times = []
    for seed in range(3):
        t0 = time.perf_counter(); S.make_scene(views=5, height=64, width=80, seed=seed); times.append(time.perf_counter() - t0)
    print(f"tiny 5x64x80 scene: {min(times)*1000:.0f} ms best, {max(times)*1000:.0f} ms worst")
    assert min(times) < 2.0


def test_exception_bad_options():
    with pytest.raises(InputError, match="unknown option 'lightning'"): S.make_scene(lightning="per_view")
    with pytest.raises(InputError, match=r"\[light\]"): S.make_scene(light=9)
    with pytest.raises(InputError, match=r"\[lighting\]"): S.make_scene(lighting="sometimes")
    with pytest.raises(InputError, match="num_objects"): S.make_scene(num_objects=1)
    with pytest.raises(InputError, match="views"): S.make_scene(views=0)
    with pytest.raises(InputError, match="texture kind"): S.albedo(S.Texture("plaid"), torch.zeros(2, 3))


# ---------------------------------------------------------------- disk
def test_feature_write_read_roundtrip(scene, tmp_path):
    out = S.write_scene(scene, tmp_path / "scan")
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{v:08d}.png" for v in range(5)]
    assert (out / "cams" / "00000004_cam.txt").is_file() and (out / "pair.txt").is_file()
    back = S.read_scene(out)
    assert_close(back.images, scene.images, atol=0.5 / 255 + 1e-6, rtol=0)
    for k in ("depth", "normal", "valid", "material", "points", "point_normals"):
        assert torch.equal(getattr(back, k), getattr(scene, k)), k
    assert_close(back.K, scene.K, atol=1e-5, rtol=0); assert_close(back.w2c, scene.w2c, atol=1e-6, rtol=0)
    assert back.pairs == scene.pairs and back.depth_min == scene.depth_min and back.depth_max == scene.depth_max
    assert back.meta == json.loads(json.dumps(scene.meta))
    assert np.array_equal(back.obs_mask["mask"], scene.obs_mask["mask"])
    assert_close(torch.from_numpy(back.obs_mask["origin"]), torch.from_numpy(scene.obs_mask["origin"]))
    from mvsnb.io import read_cam_txt
    cam = read_cam_txt(out / "cams" / "00000000_cam.txt")
    assert cam.depth_num == 192 and cam.depth_bounds() == pytest.approx((scene.depth_min, scene.depth_max))
    # atomic and refusing to overwrite
    with pytest.raises(InputError, match="exists"): S.write_scene(scene, out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    S.write_scene(scene, out, overwrite=True)
    # a real-scan folder: no gt/, no scene.json → GT fields are None, depth range from the cameras
    import shutil
    shutil.rmtree(out / "gt"); (out / "scene.json").unlink()
    bare = S.read_scene(out)
    assert bare.depth is None and bare.points is None and bare.obs_mask is None and bare.meta == {}
    assert bare.depth_min == pytest.approx(scene.depth_min) and bare.depth_max == pytest.approx(scene.depth_max)


def test_exception_read_scene_bad_folder(tmp_path):
    with pytest.raises(InputError, match="not found"): S.read_scene(tmp_path / "nope")
    (tmp_path / "s" / "images").mkdir(parents=True)
    with pytest.raises(InputError, match="no images"): S.read_scene(tmp_path / "s")


def test_feature_mvs_batch(scene):
    b = scene.mvs_batch(ref=2, num_src=2)
    assert b["images"].shape == (1, 3, 3, 64, 80) and b["K"].shape == (1, 3, 3, 3) and b["w2c"].shape == (1, 3, 4, 4)
    assert b["view_ids"].tolist() == [2] + [s for s, _ in dict(scene.pairs)[2]][:2]
    assert torch.equal(b["depth"], scene.depth[2:3]) and b["depth_min"].shape == (1,)
