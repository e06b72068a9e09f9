"""mvsnb.data: datasets, intrinsics under resize/crop, the manifest checks, and the importers on the shared real data."""
import copy, json, math, shutil
from pathlib import Path
import numpy as np
import pytest
import torch
from mvsnb.core import InputError, sample_image
from mvsnb.camera import intrinsics, look_at, project, transform_points, reproject, relative_pose, scale_intrinsics
from mvsnb.io import write_image, read_image, write_cam_txt, write_pair_txt, write_pfm, read_cam_txt, read_pair_txt, read_pfm
from mvsnb.data import (MVSDataset, DTUTestDataset, DTUTrainDataset, SceneDataset, fit_view, write_mvs_scene,
                        check_dataset, load_manifest, file_checksums, DTU_SPLITS, camera_from_middlebury_par,
                        read_middlebury_par, MIDDLEBURY_BBOXES, bbox_depth_range, import_middlebury_ring,
                        read_strecha_camera, camera_from_strecha, optical_axes_convergence, import_strecha,
                        camera_from_rectified_stereo, depth_from_disparity, import_stereo_pair, MOTORCYCLE_CALIB)

# ---------------------------------------------------------------- a tiny textured-plane scene rendered by brute force
PLANE_Z = 4.0  # world plane z = 0 seen from cameras ~4 units away

def texture(x, y):
    "Smooth RGB texture on the world plane (so bilinear sampling errors stay small)."
    return np.stack([0.5 + 0.4 * np.sin(3 * x), 0.5 + 0.4 * np.cos(2.5 * y), 0.5 + 0.3 * np.sin(2 * (x + y))], -1)

def render_plane(K, w2c, H, W):
    "Ray-cast the plane z=0 per pixel (plain numpy, one ray per pixel centre): image (H,W,3), depth (H,W)."
    K, w2c = np.asarray(K, np.float64), np.asarray(w2c, np.float64)
    R, t = w2c[:3, :3], w2c[:3, 3]; C = -R.T @ t
    img, depth = np.zeros((H, W, 3)), np.zeros((H, W))
    Kinv = np.linalg.inv(K)
    for i in range(H):
        for j in range(W):
            ray_c = Kinv @ np.array([j, i, 1.0])  # z = 1 in the camera
            ray_w = R.T @ ray_c
            s = -C[2] / ray_w[2]
            if s > 0:
                X = C + s * ray_w; img[i, j] = texture(X[0], X[1]); depth[i, j] = s  # s is the z-depth (ray_c z = 1)
    return img.astype(np.float32), depth.astype(np.float32)

def plane_cameras(V=3):
    eyes = torch.tensor([[-0.5 + 0.5 * v, -3.0, 2.6] for v in range(V)], dtype=torch.float64)
    w2c = look_at(eyes, torch.zeros(V, 3, dtype=torch.float64))
    K = intrinsics(40., 42., 19.5, 15.5, dtype=torch.float64)[None].repeat(V, 1, 1)
    return K, w2c

@pytest.fixture(scope="module")
def plane_scene(tmp_path_factory):
    "A 3-view 32x40 scene of a textured plane with GT depth for every view, in the DTU test layout."
    K, w2c = plane_cameras(3)
    imgs, gts = zip(*[render_plane(K[v], w2c[v], 32, 40) for v in range(3)])
    pairs = [(0, [(1, 1.0), (2, 0.5)]), (1, [(0, 1.0), (2, 1.0)]), (2, [(1, 1.0), (0, 0.5)])]
    d = tmp_path_factory.mktemp("plane") / "plane"
    write_mvs_scene(d, list(imgs), K, w2c, 2.0, 7.0, pairs, depth_num=64, gt_depth=dict(enumerate(gts)))
    return d

def world_points_on_plane(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return torch.tensor(np.c_[rng.uniform(-0.6, 0.6, (n, 2)), np.zeros(n)], dtype=torch.float64)

def content(img, K, w2c, X):
    "Bilinear image values at the projection of world points X (N,3); plus which are inside the image."
    uv, _ = project(transform_points(w2c[None].double(), X.T[None]), K[None].double())
    vals, inside = sample_image(img[None].double(), uv)
    return vals[0].T, inside[0, 0], uv[0].T

# ---------------------------------------------------------------- fit_view and the dataset under resize / crop
def test_shape_fit_view_pixel_mapping_bruteforce():
    "Every projected point moves exactly as u -> s(u+0.5)-0.5-x0 (checked one point at a time)."
    K = intrinsics(50., 52., 31.5, 23.5, dtype=torch.float64)
    img = torch.rand(3, 48, 64)
    X = torch.tensor([[0.3, -0.2, 3.0], [-0.5, 0.4, 4.0], [0.1, 0.1, 2.5], [0.7, 0.5, 5.0]], dtype=torch.float64)
    for kw in [dict(height=24, width=32), dict(height=30, width=50, fit="crop"), dict(width=40, divisor=8),
               dict(height=48, width=64, divisor=32)]:
        out = fit_view(img, K, **kw)
        (sx, sy), (x0, y0) = out["scale"], out["crop"]
        h, w = out["image"].shape[-2:]
        for p in X:
            u0, v0 = (K @ p / p[2])[:2].tolist()
            u1, v1 = (out["K"] @ p / p[2])[:2].tolist()
            assert math.isclose(u1, sx * (u0 + 0.5) - 0.5 - x0, abs_tol=1e-9) and math.isclose(v1, sy * (v0 + 0.5) - 0.5 - y0, abs_tol=1e-9)
        if "divisor" in kw: assert h % kw["divisor"] == 0 and w % kw["divisor"] == 0

def test_feature_resize_and_crop_keep_content(plane_scene):
    "A GT world point projected with the original and with the resized/cropped camera lands on the same texture."
    X = world_points_on_plane()
    full = DTUTestDataset(plane_scene, num_views=3)[0]
    for kw, tol in [(dict(height=16, width=20), 0.025), (dict(height=24, width=24, fit="crop"), 0.01),
                    (dict(height=32, width=40, divisor=16), 1e-6)]:
        item = DTUTestDataset(plane_scene, num_views=3, **kw)[0]
        legacy = DTUTestDataset(plane_scene, num_views=3, legacy_intrinsics=True, **kw)[0]
        for v in range(3):
            a, ina, _ = content(full["images"][v], full["K"][v], full["w2c"][v], X)
            b, inb, _ = content(item["images"][v], item["K"][v], item["w2c"][v], X)
            c, _, _ = content(legacy["images"][v], legacy["K"][v], legacy["w2c"][v], X)
            ok = ina & inb
            assert ok.sum() > 10
            err, err_legacy = (a - b)[ok].abs().mean().item(), (a - c)[ok].abs().mean().item()  # the blur of shrinking stays
            assert err < tol, (kw, v, err)
            if kw.get("divisor") is None: assert err_legacy > 1.5 * err  # half a pixel off is measurably worse

def test_feature_depth_gt_matches_geometry_after_resize(plane_scene):
    "The resized GT depth still agrees with the plane seen through the resized camera (ray-plane intersection)."
    item = DTUTestDataset(plane_scene, num_views=2, height=16, width=20)[0]
    K, w2c, depth, mask = item["K"][0].double(), item["w2c"][0].double(), item["depth_gt"][0].double(), item["mask_gt"][0]
    _, ref_depth = render_plane(K, w2c, 16, 20)
    assert mask.all()
    # nearest-neighbour resampling picks a depth from within one original pixel: small relative error
    assert ((depth - torch.from_numpy(ref_depth).double()).abs() / depth).max() < 0.03

def test_smoke_item_keys_and_collate(plane_scene):
    ds = MVSDataset(plane_scene, layout="dtu_test", num_views=3)
    assert isinstance(ds, DTUTestDataset) and isinstance(ds, MVSDataset) and len(ds) == 3
    it = ds[1]
    assert it["images"].shape == (3, 3, 32, 40) and it["images"].dtype == torch.float32
    assert it["K"].shape == (3, 3, 3) and it["w2c"].shape == (3, 4, 4)
    assert it["ref_id"].item() == 1 and it["src_ids"].tolist() == [0, 2] and it["view_ids"].tolist() == [1, 0, 2]
    assert it["depth_min"].item() == pytest.approx(2.0) and it["depth_max"].item() == pytest.approx(7.0)
    assert it["depth_interval"].item() == pytest.approx(5.0 / 191) and it["num_depth"].item() == 192
    assert it["depth_gt"].shape == (1, 32, 40) and it["mask_gt"].dtype == torch.bool
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["images"].shape == (3, 3, 3, 32, 40) and batch["depth_min"].shape == (3,) and batch["scan"] == ["plane"] * 3
    no_gt = DTUTestDataset(plane_scene, with_gt=False)[0]
    assert "depth_gt" not in no_gt and "mask_gt" not in no_gt
    # the batch feeds the warp module's hypotheses directly
    warp = pytest.importorskip("mvsnb.warp")
    hyps = warp.depth_hypotheses(batch["depth_min"], batch["depth_max"], int(batch["num_depth"][0]), 32, 40)
    assert hyps.shape == (3, 192, 32, 40) and torch.allclose(hyps[:, 1, 0, 0] - hyps[:, 0, 0, 0], batch["depth_interval"], rtol=1e-4)
    # picklable (DataLoader workers with the spawn start method)
    import pickle
    back = pickle.loads(pickle.dumps(ds))
    assert type(back) is DTUTestDataset and torch.equal(back[1]["images"], it["images"])

def test_feature_collection_of_scenes(plane_scene, tmp_path):
    "A folder of scene folders: scans found in natural order, or picked by name / DTU number."
    for n in (10, 2): shutil.copytree(plane_scene, tmp_path / f"scan{n}")
    ds = DTUTestDataset(tmp_path)
    assert list(ds.scenes) == ["scan2", "scan10"] and len(ds) == 6
    assert list(DTUTestDataset(tmp_path, scans=[10]).scenes) == ["scan10"]
    with pytest.raises(InputError, match="scan4: scene folder not found"): DTUTestDataset(tmp_path, scans=[4])
    tt = tmp_path / "tt"; shutil.copytree(plane_scene, tt / "intermediate" / "Family"); shutil.copytree(plane_scene, tt / "advanced" / "Temple")
    assert list(MVSDataset(tt, layout="tanks_and_temples").scenes) == ["advanced/Temple", "intermediate/Family"]
    probs = check_dataset("tanks_and_temples", tt)
    assert "missing scene folder intermediate/Horse/" in probs and not any("Family" in p for p in probs)

def test_feature_blendedmvs_layout(plane_scene, tmp_path):
    "BlendedMVS keeps images in blended_images/, pair.txt in cams/ and GT in rendered_depth_maps/."
    d = tmp_path / "5a3ca9cb270f0e3f14d0eddb"; shutil.copytree(plane_scene, d)
    (d / "images").rename(d / "blended_images"); (d / "pair.txt").rename(d / "cams" / "pair.txt")
    (d / "gt" / "depth").rename(d / "rendered_depth_maps"); shutil.rmtree(d / "gt")
    for p in sorted((d / "blended_images").glob("*.png")): write_image(p.with_suffix(".jpg"), read_image(p)); p.unlink()
    it = MVSDataset(d, layout="blendedmvs", num_views=3)[0]
    assert it["images"].shape == (3, 3, 32, 40) and it["mask_gt"].all()
    entry = copy.deepcopy(load_manifest()["datasets"]["blendedmvs"]); del entry["expected"]["image_size"]
    man = {"datasets": {"blendedmvs": entry}}
    assert check_dataset("blendedmvs", d, man) == []
    (d / "rendered_depth_maps" / "00000001.pfm").unlink()
    assert check_dataset("blendedmvs", d, man) == ["missing rendered_depth_maps/00000001.pfm"]

# ---------------------------------------------------------------- in-memory scenes and the synthetic round trip
def test_feature_scene_dataset_matches_disk(plane_scene):
    "SceneDataset over in-memory tensors gives the same item as the on-disk layout."
    disk = DTUTestDataset(plane_scene, num_views=3)
    class S: pass
    s = S()
    s.images = torch.stack([disk[i]["images"][0] for i in range(3)])
    s.K, s.w2c = torch.stack([disk[i]["K"][0] for i in range(3)]), torch.stack([disk[i]["w2c"][0] for i in range(3)])
    s.depth = torch.stack([disk[i]["depth_gt"] for i in range(3)]); s.valid = s.depth > 0
    s.depth_min, s.depth_max = 2.0, 7.0
    s.pairs = read_pair_txt(plane_scene / "pair.txt")
    mem = SceneDataset(s, num_views=3, name="plane")
    assert isinstance(MVSDataset(s, layout="scene"), SceneDataset)
    for i in range(3):
        a, b = disk[i], mem[i]
        for k in ("images", "K", "w2c", "depth_gt", "mask_gt", "src_ids", "depth_min", "depth_max"):
            torch.testing.assert_close(a[k], b[k], msg=k)

def test_feature_synthetic_round_trip(tmp_path):
    "make_scene → write_scene → MVSDataset(layout='synthetic') equals SceneDataset(scene); the manifest check passes."
    syn = pytest.importorskip("mvsnb.synthetic")
    scene = syn.make_scene(views=3, height=32, width=40, seed=1)
    syn.write_scene(scene, tmp_path / "syn")
    disk, mem = MVSDataset(tmp_path / "syn", layout="synthetic", num_views=3), SceneDataset(scene, num_views=3)
    assert len(disk) == len(mem) == 3 and disk.with_gt
    for i in range(3):
        a, b = disk[i], mem[i]
        torch.testing.assert_close(a["images"], b["images"], atol=0.5 / 255 + 1e-6, rtol=0)  # 8-bit PNG
        for k in ("K", "w2c", "depth_gt", "mask_gt", "src_ids"): torch.testing.assert_close(a[k], b[k], msg=k)
        assert a["depth_min"].item() == pytest.approx(b["depth_min"].item()) and a["depth_max"].item() == pytest.approx(b["depth_max"].item())
        # the GT depth read from disk agrees with the cameras read from disk: reproject the reference into its first
        # source and compare with that view's own GT depth (median, since occluded pixels disagree)
        K, w2c, src = a["K"].double(), a["w2c"].double(), int(a["src_ids"][0])
        uv, z = reproject(a["depth_gt"][None].double(), K[:1], K[1:2], relative_pose(w2c[1:2], w2c[:1]))
        d_src, inside = sample_image(scene.depth[src][None].double(), uv, mode="nearest")
        ok = a["mask_gt"][None] & inside & (d_src > 0) & (z > 0)
        assert ok.float().mean() > 0.2 and ((z - d_src).abs() / z)[ok].median() < 0.01
    assert check_dataset("synthetic", tmp_path / "syn") == []
    (tmp_path / "syn" / "gt" / "depth" / "00000002.pfm").unlink()
    assert check_dataset("synthetic", tmp_path / "syn") == ["missing gt/depth/00000002.pfm"]

# ---------------------------------------------------------------- the DTU training layout
def make_dtu_train(root, V=3, H=32, W=40, scans=(2,)):
    "A miniature MVSNet training folder: images HxW, K in the cam files for the H/4 x W/4 'depth' size, as DTU ships."
    K, w2c = plane_cameras(V)
    K_img = scale_intrinsics(K, W / 40, H / 32)
    K_cam = scale_intrinsics(K_img, 160 / W, 128 / H)  # what Cameras/train holds: K for 160x128
    for v in range(V):
        write_cam_txt(root / "Cameras" / "train" / f"{v:08d}_cam.txt", w2c[v], K_cam[v], 425.0, 2.5)
    write_pair_txt(root / "Cameras" / "pair.txt", [(v, [(u, 1.0) for u in range(V) if u != v]) for v in range(V)])
    for s in scans:
        for v in range(V):
            img, depth = render_plane(K_img[v], w2c[v], H, W)
            for l in range(7): write_image(root / "Rectified" / f"scan{s}_train" / f"rect_{v + 1:03d}_{l}_r5000.png", img * (0.8 + 0.03 * l))
            _, d4 = render_plane(scale_intrinsics(K_img[v], 0.25), w2c[v], H // 4, W // 4)
            write_pfm(root / "Depths" / f"scan{s}_train" / f"depth_map_{v:04d}.pfm", d4)
    return K_img, w2c

def test_feature_dtu_train_layout(tmp_path):
    K_img, w2c = make_dtu_train(tmp_path)
    ds = MVSDataset(tmp_path, layout="dtu_train", num_views=3)
    assert isinstance(ds, DTUTrainDataset) and len(ds) == 3 * 7  # one scan x 3 views x 7 lights
    it = ds[0]
    assert it["images"].shape == (3, 3, 32, 40) and it["light"].item() == 0 and it["scan"] == "scan2"
    torch.testing.assert_close(it["K"][0], K_img[0].float())  # exact pixel-centre scaling recovers the image's K
    legacy = DTUTrainDataset(tmp_path, light=3, legacy_intrinsics=True)
    assert len(legacy) == 3 and legacy[0]["light"].item() == 3
    # MVSNet's convention: K_image = s * K_file (rows 0-1); the exact form adds 0.5s - 0.5 (-1.5 px for DTU's s=4)
    s = 40 / 160
    torch.testing.assert_close(legacy[0]["K"][0, 0, 2] - it["K"][0, 0, 2], torch.tensor(0.5 - 0.5 * s))
    K_file = read_cam_txt(tmp_path / "Cameras" / "train" / "00000000_cam.txt").K
    torch.testing.assert_close(legacy[0]["K"][0], torch.from_numpy(K_file * np.array([[s], [s], [1]])).float())
    assert it["depth_max"].item() == pytest.approx(425 + 2.5 * 1.06 * 191)  # MVSNet: 192 planes, interval x1.06
    # the 1/4-size GT depth is brought to the image size by centre-aligned nearest neighbour:
    # each 4x4 block repeats the quarter-size pixel whose centre it surrounds
    assert it["depth_gt"].shape == (1, 32, 40) and it["mask_gt"].all()
    d4 = torch.from_numpy(read_pfm(tmp_path / "Depths" / "scan2_train" / "depth_map_0000.pfm"))
    for dy in range(4):
        for dx in range(4): torch.testing.assert_close(it["depth_gt"][0, dy::4, dx::4], d4)
    _, ref_depth = render_plane(it["K"][0], it["w2c"][0], 32, 40)  # and agrees with the geometry to ~2 rows of depth change
    assert ((it["depth_gt"][0] - torch.from_numpy(ref_depth)).abs() / it["depth_gt"][0]).mean() < 0.03
    assert len(DTUTrainDataset(tmp_path, scans=[2], light=[1, 2], num_views=2)) == 6

def test_exception_dtu_train(tmp_path):
    make_dtu_train(tmp_path, scans=(2,))
    with pytest.raises(InputError, match="none of the 18 val scans is present"): DTUTrainDataset(tmp_path, split="val")
    with pytest.raises(InputError, match=r"scan6_train: scan folder not found"): DTUTrainDataset(tmp_path, scans=[6])
    (tmp_path / "Rectified" / "scan2_train" / "rect_002_4_r5000.png").unlink()
    ds = DTUTrainDataset(tmp_path, light=4)
    with pytest.raises(InputError, match=r"rect_002_4_r5000.png: image file not found"): ds[0]
    (tmp_path / "Cameras" / "train" / "00000001_cam.txt").unlink()
    with pytest.raises(InputError, match="00000001_cam.txt: camera file not found"): DTUTrainDataset(tmp_path)

def test_feature_check_dtu_train(tmp_path):
    make_dtu_train(tmp_path)
    man = load_manifest(); entry = copy.deepcopy(man["datasets"]["dtu_train"])
    entry["expected"]["views"] = 3; entry["splits"] = {"train": [2, 6], "val": []}
    m = {"datasets": {"dtu_train": entry}}
    assert check_dataset("dtu_train", tmp_path, m) == ["missing folder Rectified/scan6_train/ (21 files)",
                                                       "missing folder Depths/scan6_train/ (3 files)"]
    (tmp_path / "Rectified" / "scan2_train" / "rect_003_6_r5000.png").unlink()
    assert check_dataset("dtu_train", tmp_path, m)[0] == "missing Rectified/scan2_train/rect_003_6_r5000.png"

# ---------------------------------------------------------------- bad inputs name the file
def test_exception_mismatched_image_size(plane_scene, tmp_path):
    d = tmp_path / "s"; shutil.copytree(plane_scene, d)
    write_image(d / "images" / "00000001.png", np.zeros((30, 40, 3), np.float32))
    with pytest.raises(InputError, match=r"00000001\.png: image is 40x30 but 00000000\.png is 40x32"): DTUTestDataset(d)
    assert check_dataset("imported", d, {"datasets": {"imported": {"layout": "imported", "expected": {
        "view_files": ["images/{view:08d}.png", "cams/{view:08d}_cam.txt"]}}}}) == ["images/00000001.png is 40x30 but images/00000000.png is 40x32"]

def test_exception_missing_view(plane_scene, tmp_path):
    d = tmp_path / "s"; shutil.copytree(plane_scene, d)
    (d / "images" / "00000002.png").unlink()
    with pytest.raises(InputError, match=r"pair\.txt:3 \[src_id\]: names view 2 but there is no images/00000002\.jpg or \.png"):
        DTUTestDataset(d)
    shutil.copy(plane_scene / "images" / "00000002.png", d / "images"); (d / "cams" / "00000000_cam.txt").unlink()
    with pytest.raises(InputError, match=r"cams/00000000_cam\.txt: missing camera file"): DTUTestDataset(d)
    with pytest.raises(InputError, match="num_views=4 needs 3"): DTUTestDataset(plane_scene, num_views=4)
    with pytest.raises(InputError, match="unknown layout"): MVSDataset(plane_scene, layout="dtu")
    with pytest.raises(InputError, match="light= applies to dtu_train"): MVSDataset(plane_scene, layout="dtu_test", light=3)
    assert len(MVSDataset(plane_scene, layout="dtu_test", split="test")) == 3  # the uniform signature: split is ignored
    with pytest.raises(InputError, match="with_gt=True but the dataset has no GT"):
        DTUTestDataset(_strip_gt(plane_scene, tmp_path / "nogt"), with_gt=True)

def _strip_gt(src, dst):
    shutil.copytree(src, dst); shutil.rmtree(dst / "gt"); return dst

# ---------------------------------------------------------------- the manifest and check_dataset
def test_feature_manifest_lists_everything():
    man = load_manifest()
    names = set(man["datasets"])
    assert {"synthetic", "dtu_train", "dtu_test", "tanks_and_temples", "blendedmvs", "middlebury_temple_sparse_ring",
            "middlebury_dino_sparse_ring", "strecha_fountain_p11", "strecha_herzjesu_p8", "strecha_entry_p10",
            "middlebury2014_motorcycle"} <= names
    assert man["default"] == "synthetic" and man["datasets"]["synthetic"]["default"] is True
    assert {k: man["datasets"]["dtu_train"]["splits"][k] for k in DTU_SPLITS} == DTU_SPLITS
    for name, e in man["datasets"].items():
        if e["layout"] == "raw":
            assert e["files"] and all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in e["files"].values()), name
            assert e["bytes"] == sum(f["bytes"] for f in e["files"].values()) and e["num_files"] == len(e["files"])
    with pytest.raises(InputError, match="data manifest not found"): load_manifest("/nonexistent/manifest.yaml")

def test_feature_check_reports_exactly_the_missing_file(plane_scene, tmp_path):
    d = tmp_path / "s"; shutil.copytree(plane_scene, d)
    (d / "source.json").write_text("{}")
    assert check_dataset("imported", d) == []
    (d / "images" / "00000001.png").unlink()
    assert check_dataset("imported", d) == ["missing images/00000001.png (or .jpg)"]
    (d / "source.json").unlink()
    assert check_dataset("imported", d) == ["missing source.json", "missing images/00000001.png (or .jpg)"]

def test_feature_check_pair_names_views_past_the_end(plane_scene, tmp_path):
    d = tmp_path / "s"; shutil.copytree(plane_scene, d)
    pairs = read_pair_txt(d / "pair.txt") + [(v, [(0, 1.0)]) for v in range(3, 6)]
    write_pair_txt(d / "pair.txt", pairs)
    assert check_dataset("dtu_test", d) == ["pair.txt lists 6 views, expected 49",
                                            "pair.txt names view 5 but only 3 images (images/00000000..00000002) exist",
                                            "images are 40x32, expected 1600x1200"]

def test_feature_check_checksum_mismatch(tmp_path):
    files = tmp_path / "raw"; files.mkdir()
    (files / "a.bin").write_bytes(b"hello"); (files / "sub").mkdir(); (files / "sub" / "b.txt").write_text("x")
    man = {"datasets": {"blob": {"layout": "raw", "files": file_checksums(files)}}}
    assert check_dataset("blob", files, man) == []
    (files / "a.bin").write_bytes(b"hellp")
    assert check_dataset("blob", files, man) == [f"checksum mismatch: a.bin (sha256 {__import__('hashlib').sha256(b'hellp').hexdigest()[:12]}…, "
                                                 f"expected {man['datasets']['blob']['files']['a.bin']['sha256'][:12]}…)"]
    (files / "sub" / "b.txt").write_text("xy")
    assert check_dataset("blob", files, man)[1] == "size mismatch: sub/b.txt is 2 bytes, expected 1"
    assert check_dataset("blob", tmp_path / "absent", man) == [f"folder not found: {tmp_path / 'absent'}"]

def test_feature_shared_realdata_matches_manifest(realdata):
    man = load_manifest()
    for name, e in man["datasets"].items():
        if e["layout"] == "raw": assert check_dataset(name, realdata.parent / e["shared_path"], man) == [], name

def test_feature_check_realdata_copy_with_a_flipped_byte(realdata, tmp_path):
    src = realdata / "middlebury_sparse_ring" / "dinoSparseRing"
    d = shutil.copytree(src, tmp_path / "dino")
    b = bytearray((d / "dinoSR0003.png").read_bytes()); b[1000] ^= 1; (d / "dinoSR0003.png").write_bytes(bytes(b))
    (d / "dinoSR_par.txt").unlink()
    probs = check_dataset("middlebury_dino_sparse_ring", d)
    assert len(probs) == 2 and probs[0].startswith("checksum mismatch: dinoSR0003.png (sha256 ") and probs[1] == "missing dinoSR_par.txt"

# ---------------------------------------------------------------- Middlebury: P = K[R|t]
@pytest.mark.parametrize("scene,folder", [("templeSR", "templeSparseRing"), ("dinoSR", "dinoSparseRing")])
def test_feature_middlebury_bbox_centre_projects_inside(realdata, scene, folder):
    cams = read_middlebury_par(realdata / "middlebury_sparse_ring" / folder / f"{scene}_par.txt")
    assert len(cams) == 16
    lo, hi = np.array(MIDDLEBURY_BBOXES[scene]); centre = (lo + hi) / 2
    for name, K, w2c in cams:  # plain per-camera projection, the README's P = K [R | t]
        x = K @ (w2c[:3, :3] @ centre + w2c[:3, 3])
        u, v, z = x[0] / x[2], x[1] / x[2], x[2]
        assert 0.4 < z < 0.8 and 0 <= u <= 639 and 0 <= v <= 479, (name, u, v, z)
    # the wrong reading (R as camera→world) does not put the object in front of the cameras
    bad = [np.linalg.inv(w2c) for _, _, w2c in cams]
    assert not all(0.4 < (b[:3, :3] @ centre + b[:3, 3])[2] < 0.8 for b in bad)
    dmin, dmax = bbox_depth_range(np.stack([w for _, _, w in cams]), MIDDLEBURY_BBOXES[scene])
    zc = np.array([(w[:3, :3] @ centre + w[:3, 3])[2] for _, _, w in cams])
    assert (dmin < zc).all() and (zc < dmax).all() and (dmin > 0.3).all() and (dmax < 0.9).all()

def test_exception_middlebury_par(tmp_path):
    p = tmp_path / "x_par.txt"
    p.write_text("2\na.png " + " ".join(["1"] * 21) + "\n")
    with pytest.raises(InputError, match=r"x_par\.txt:1 \[count\]: says 2 images but has 1"): read_middlebury_par(p)
    p.write_text("1\na.png 100 0 20 0 100 15 0 0 1 1 0 0 0 1 0 0 0 2 0 0 1\n")
    with pytest.raises(InputError, match=r"x_par\.txt:2 \[extrinsic\]: rotation block is not a rotation"): read_middlebury_par(p)
    K, w2c = camera_from_middlebury_par([100, 0, 20, 0, 100, 15, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0.1, 0.2, 0.3])
    np.testing.assert_array_equal(w2c[:3, 3], [0.1, 0.2, 0.3]); np.testing.assert_array_equal(K[0], [100, 0, 20])

def test_feature_import_middlebury(realdata, tmp_path):
    out = import_middlebury_ring(realdata / "middlebury_sparse_ring" / "templeSparseRing", tmp_path / "temple", downscale=4, views=list(range(6)))
    assert check_dataset("imported", out) == []
    src = json.loads((out / "source.json").read_text())
    assert src["importer"] == "import_middlebury_ring" and src["scene"] == "templeSR" and len(src["source_sha256"]) == 7
    man = load_manifest()["datasets"]["middlebury_temple_sparse_ring"]["files"]
    assert all(man[k]["sha256"] == v for k, v in src["source_sha256"].items())  # provenance = the manifest's bytes
    ds = MVSDataset(out, layout="imported", num_views=3)
    it = ds[0]
    assert it["images"].shape == (3, 3, 120, 160) and 0.4 < it["depth_min"] < 0.6 < it["depth_max"] < 0.8
    cam = read_cam_txt(out / "cams" / "00000000_cam.txt")
    np.testing.assert_allclose(cam.K[0], [1520.4 / 4, 0, (302.32 + 0.5) / 4 - 0.5])  # exact pixel-centre scaling
    with pytest.raises(InputError, match="output folder exists"): import_middlebury_ring(realdata / "middlebury_sparse_ring" / "templeSparseRing", out)

# ---------------------------------------------------------------- Strecha: R camera→world, t = centre
@pytest.mark.parametrize("folder", ["fountain-P11", "Herz-Jesus-P8", "entry-P10"])
def test_feature_strecha_axes_converge_in_front(realdata, folder):
    paths = sorted((realdata / "strecha_epfl" / folder / "gt_dense_cameras").glob("*.camera"))
    cams = [read_strecha_camera(p) for p in paths]
    w2c = np.stack([camera_from_strecha(c["K"], c["R"], c["C"])[1] for c in cams])
    for c, T in zip(cams, w2c):  # per camera: the centre maps to the origin, the axis is R's third column
        np.testing.assert_allclose(T[:3, :3] @ c["C"] + T[:3, 3], 0, atol=1e-9)
        np.testing.assert_allclose(T[2, :3], c["R"][:, 2], atol=1e-12)
    P, z = optical_axes_convergence(w2c)
    assert (z > 5).all() and (z < 30).all()
    for T, zi in zip(w2c, z):  # the point lies close to every optical axis, relative to its depth
        xc = T[:3, :3] @ P + T[:3, 3]
        assert np.hypot(xc[0], xc[1]) < 0.35 * zi
    # reading R as world→camera (the wrong convention) does not converge in front of every camera
    bad = np.stack([np.block([[c["R"], c["C"][:, None]], [np.zeros((1, 3)), np.ones((1, 1))]]) for c in cams])
    assert not (optical_axes_convergence(bad)[1] > 0).all() or \
        not all(np.hypot(*(T[:3, :3] @ optical_axes_convergence(bad)[0] + T[:3, 3])[:2]) < 0.35 * zi
                for T, zi in zip(bad, optical_axes_convergence(bad)[1]))

def test_exception_strecha_camera(tmp_path):
    p = tmp_path / "0000.png.camera"
    p.write_text("1 0 0\n0 1 0\n0 0 1\n0.1 0 0\n1 0 0\n0 1 0\n0 0 1\n0 0 0\n640 480\n")
    with pytest.raises(InputError, match=r"0000\.png\.camera:4 \[distortion\]: non-zero radial distortion"): read_strecha_camera(p)
    p.write_text("1 0 0\n0 1 0\n0 0 1\n0 0 0\n1 0 0\n0 1\n0 0 1\n0 0 0\n640 480\n")
    with pytest.raises(InputError, match=r":6 \[R\]: expected 3 numbers, got 2"): read_strecha_camera(p)

def test_feature_import_strecha(realdata, tmp_path):
    out = import_strecha(realdata / "strecha_epfl" / "fountain-P11", tmp_path / "fountain", downscale=16, views=[0, 1, 2])
    assert check_dataset("imported", out) == []
    it = MVSDataset(out, layout="imported", num_views=3)[1]
    assert it["images"].shape == (3, 3, 128, 192)
    assert 1.5 < it["depth_min"] < 3.5 and 15 < it["depth_max"] < 30  # 0.25 / 2.5 x the ~9 m convergence depth
    assert it["src_ids"].tolist() == [0, 2] or it["src_ids"].tolist() == [2, 0]
    src = json.loads((out / "source.json").read_text())
    assert src["importer"] == "import_strecha" and "0000.jpg" in "".join(src["source_sha256"])

# ---------------------------------------------------------------- the rectified stereo pair: real pixels, dense GT
def test_feature_stereo_calibration_and_depth():
    K, w2c = camera_from_rectified_stereo(**{k: MOTORCYCLE_CALIB[k] for k in ("f", "cx", "cy", "doffs", "baseline")})
    assert K[1, 0, 2] == pytest.approx(311.193 + 31.086) and w2c[1, 0, 3] == pytest.approx(-193.001)
    d = np.array([[10.0, np.inf], [np.nan, 20.0]])
    z = depth_from_disparity(d, 1000.0, 100.0, 5.0)
    np.testing.assert_allclose(z, [[100 * 1000 / 15, 0], [0, 100 * 1000 / 25]], rtol=1e-6)
    # brute force: a point at that depth projects with disparity d (u_left - u_right = d)
    X = np.array([0.3 * z[0, 0], 0.1, z[0, 0]])
    K2, w2c2 = camera_from_rectified_stereo(1000.0, 300.0, 200.0, 5.0, 100.0)
    u = [(K2[i] @ (w2c2[i, :3, :3] @ X + w2c2[i, :3, 3]))[0] / z[0, 0] for i in (0, 1)]
    assert u[0] - u[1] == pytest.approx(10.0)

def _warp_error(item, depth):
    "Mean |left - right warped into left| on valid in-bounds pixels, warping through `depth` (1,H,W)."
    K, w2c = item["K"][None].double(), item["w2c"][None].double()
    T = relative_pose(w2c[:, 1], w2c[:, 0])
    uv, z = reproject(depth[None].double(), K[:, 0], K[:, 1], T)
    warped, inside = sample_image(item["images"][None, 1].double(), uv)
    ok = inside & item["mask_gt"][None] & (z > 0)
    return ((warped - item["images"][None, 0]).abs().mean(1, keepdim=True)[ok]).mean().item(), ok.float().mean().item()

def test_feature_stereo_warp_reproduces_left(realdata, tmp_path):
    "Warping the right image into the left with the GT depth matches the left image far better than wrong depths."
    out = import_stereo_pair(tmp_path / "moto", source=realdata / "middlebury2014_motorcycle_skimage", downscale=2)
    assert check_dataset("imported", out) == [] and (out / "gt" / "depth" / "00000000.pfm").is_file()
    ds = MVSDataset(out, layout="imported", num_views=2)
    it = ds[0]
    assert it["mask_gt"].float().mean() > 0.85 and it["images"].shape[-2:] == (250, 370)
    assert not ds[1]["mask_gt"].any()  # no GT for the right view
    gt = it["depth_gt"]
    err_gt, frac = _warp_error(it, gt)
    err_far, _ = _warp_error(it, gt * 1.1)
    err_const, _ = _warp_error(it, torch.full_like(gt, float(gt[it["mask_gt"]].median())))
    flipped = dict(it, w2c=it["w2c"].clone()); flipped["w2c"][1, 0, 3] *= -1  # baseline sign wrong
    err_flip, _ = _warp_error(flipped, gt)
    assert frac > 0.6 and err_gt < 0.06
    assert err_gt < 0.5 * min(err_far, err_const, err_flip), (err_gt, err_far, err_const, err_flip)

def test_feature_stereo_skimage_source_equals_folder(realdata, tmp_path):
    a = import_stereo_pair(tmp_path / "a", source="skimage", downscale=4)
    b = import_stereo_pair(tmp_path / "b", source=realdata / "middlebury2014_motorcycle_skimage", downscale=4)
    sa, sb = (json.loads((p / "source.json").read_text())["source_sha256"] for p in (a, b))
    assert sa == sb and len(sa) == 3
    np.testing.assert_array_equal(read_pfm(a / "gt" / "depth" / "00000000.pfm"), read_pfm(b / "gt" / "depth" / "00000000.pfm"))


def test_feature_supervision_views_sample_the_top_m_by_score():
    "DIV §3.4: supervision views come from the reference's top-M listed sources, ∝ score; the network's views stay."
    import torch
    from mvsnb.synthetic import make_scene
    from mvsnb.data import SceneDataset, SupervisionViews
    sc = make_scene(views=6, height=16, width=20, seed=1)
    base = SceneDataset(sc, num_views=3)
    sup = SupervisionViews(base, top=4, n=2, generator=torch.Generator().manual_seed(0))
    assert len(sup) == len(base) and sup.num_views == 3  # attributes pass through
    for i in range(len(sup)):
        it, plain = sup[i], base[i]
        assert torch.equal(it["images"], plain["images"]) and torch.equal(it["src_ids"], plain["src_ids"])
        scan, ref, _, _ = base.samples[i]
        top = [v for v, _ in sorted(base.candidates[(scan, ref)], key=lambda t: -t[1])[:4]]
        ids = it["sup_ids"].tolist()
        assert len(set(ids)) == 2 and set(ids) <= set(top) and ref not in ids
        assert it["sup_images"].shape == (2, 3, 16, 20) and it["sup_K"].shape == (2, 3, 3) and it["sup_w2c"].shape == (2, 4, 4)
        for j, v in enumerate(ids): assert torch.allclose(it["sup_w2c"][j], sc.w2c[v].float())
    # frequencies follow the scores: the 1st-ranked source is drawn more often than the 4th (2000 draws)
    scan, ref, _, _ = base.samples[0]
    ranked = [v for v, _ in sorted(base.candidates[(scan, ref)], key=lambda t: -t[1])]
    counts = torch.bincount(torch.cat([sup[0]["sup_ids"] for _ in range(500)]), minlength=6)
    assert counts[ranked[0]] > counts[ranked[3]] and counts[ranked[4]] == 0


def test_exception_supervision_views_bad_sizes():
    import pytest
    from mvsnb.core import InputError
    from mvsnb.synthetic import make_scene
    from mvsnb.data import SceneDataset, SupervisionViews
    base = SceneDataset(make_scene(views=4, height=16, width=20, seed=0), num_views=3)
    with pytest.raises(InputError, match="cannot draw 2 views from the top 1"): SupervisionViews(base, top=1)
    with pytest.raises(InputError, match="at least one"): SupervisionViews(base, n=0)
