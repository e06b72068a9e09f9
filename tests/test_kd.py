"""KD-MVS distillation and pseudo-label losses (mvsnb.kd): encoding, KL losses, per-stage targets, folders, dataset."""
import json, math
from pathlib import Path
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mvsnb.core import InputError, ShapeError
from mvsnb.kd import (KDConfig, stage_targets, gaussian_encoding, hypothesis_spacing, kd_paper_loss, kd_release_loss,
                      kd_release_terms, pseudo_depth_loss, DistillLoss, read_pseudo_labels, run_kd_labels, PseudoLabelDataset)

torch.set_num_threads(1)
f64 = dict(dtype=torch.float64)


def _one(x): return torch.tensor([[[[x]]]], **f64)


H3 = torch.tensor([1., 2., 3.], **f64).reshape(1, 3, 1, 1)
P3 = torch.tensor([0.2, 0.5, 0.3], **f64).reshape(1, 3, 1, 1)


def _random_case(B=2, D=8, h=4, w=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(B, D, h, w, generator=g, dtype=dtype).softmax(1)
    hyps = (torch.linspace(2, 4, D, dtype=dtype).reshape(1, D, 1, 1) + 0.6 * torch.rand(B, 1, h, w, generator=g, dtype=dtype)).contiguous()
    target = 2.2 + 2 * torch.rand(B, 1, h, w, generator=g, dtype=dtype)
    sigma = 0.3 * torch.rand(B, 1, h, w, generator=g, dtype=dtype)
    mask = torch.rand(B, 1, h, w, generator=g) > 0.3
    return P, hyps, target, sigma, mask


# ---------------------------------------------------------------- targets per stage
@pytest.mark.parametrize("mode,off", [("nearest-exact", 0.5), ("nearest", 0.0)])
def test_feature_stage_targets_vs_loop(mode, off):
    g = torch.Generator().manual_seed(1)
    depth = 1 + torch.rand(2, 1, 12, 16, generator=g); sigma = torch.rand(2, 1, 12, 16, generator=g)
    mask = torch.rand(2, 1, 12, 16, generator=g) > 0.2
    depth[0, 0, 5, 5] = 0  # invalid depth inside the mask
    out = stage_targets(depth, sigma, mask, [(3, 4), (6, 8), (12, 16)], mode)
    for (d, s, m), f in zip(out, (4, 2, 1)):
        assert m.dtype == torch.bool and d.shape == (2, 1, 12 // f, 16 // f)
        for b in range(2):
            for i in range(12 // f):
                for j in range(16 // f):
                    r, c = int((i + off) * f), int((j + off) * f)
                    ok = bool(mask[b, 0, r, c]) and float(depth[b, 0, r, c]) > 0
                    assert bool(m[b, 0, i, j]) == ok
                    assert float(d[b, 0, i, j]) == (float(depth[b, 0, r, c]) if ok else 0.0)
                    assert float(s[b, 0, i, j]) == (float(sigma[b, 0, r, c]) if ok else 0.0)


def test_exception_stage_targets():
    with pytest.raises(ShapeError, match="sigma"): stage_targets(torch.ones(1, 1, 4, 4), torch.ones(1, 1, 4, 5), None, [(2, 2)])
    with pytest.raises(InputError, match="mode"): stage_targets(torch.ones(1, 1, 4, 4), None, None, [(2, 2)], "bilinear")


# ---------------------------------------------------------------- encoding
def test_feature_gaussian_encoding_sums_to_one_and_peaks_at_nearest():
    P, hyps, target, sigma, _ = _random_case(D=12, seed=2)
    enc = gaussian_encoding(hyps, target, sigma, sigma_floor=0.05)
    torch.testing.assert_close(enc.sum(1), torch.ones_like(enc.sum(1)), rtol=0, atol=1e-6)
    B, D, h, w = hyps.shape
    for b in range(B):
        for i in range(h):
            for j in range(w):
                dist = [abs(float(hyps[b, k, i, j] - target[b, 0, i, j])) for k in range(D)]
                assert int(enc[b, :, i, j].argmax()) == dist.index(min(dist))


def test_feature_gaussian_encoding_formula_and_temperature():
    enc = gaussian_encoding(H3, _one(2.3), _one(0.7), 0.1, temperature=2.0)
    lg = [-(d - 2.3) ** 2 / (2 * 0.7 ** 2 * 2.0) for d in (1, 2, 3)]
    z = sum(math.exp(v) for v in lg)
    torch.testing.assert_close(enc.flatten(), torch.tensor([math.exp(v) / z for v in lg], **f64))
    # the floor replaces σ̂ below it
    torch.testing.assert_close(gaussian_encoding(H3, _one(2.3), _one(0.01), 0.7), gaussian_encoding(H3, _one(2.3), _one(0.7), 0.7))


def test_exception_encoding_floor():
    with pytest.raises(InputError, match="sigma_floor must be > 0"): gaussian_encoding(H3, _one(2.), _one(0.), 0.0)
    with pytest.raises(InputError, match="temperature"): gaussian_encoding(H3, _one(2.), _one(0.), 0.1, temperature=0)
    with pytest.raises(InputError, match="needs a floor"): KDConfig(sigma_floor_interval=0.0)


def test_feature_hypothesis_spacing():
    torch.testing.assert_close(hypothesis_spacing(H3), _one(1.0))


# ---------------------------------------------------------------- paper loss
def test_feature_kl_self_is_zero_and_hand_computed_d3():
    e = math.exp(-0.5); q = [e / (1 + 2 * e), 1 / (1 + 2 * e), e / (1 + 2 * e)]
    by_hand = sum(qi * math.log(qi / pi) for qi, pi in zip(q, [0.2, 0.5, 0.3]))
    assert abs(float(kd_paper_loss(P3, H3, _one(2.0), _one(1.0), None)) - by_hand) < 1e-10
    enc = gaussian_encoding(H3, _one(2.0), _one(1.0), 0.5)
    assert abs(float(kd_paper_loss(enc, H3, _one(2.0), _one(1.0), None))) < 1e-12
    P, hyps, target, sigma, mask = _random_case(dtype=torch.float64)
    floor = 0.5 * hypothesis_spacing(hyps)
    self_enc = gaussian_encoding(hyps, target, sigma, floor)
    assert float(kd_paper_loss(self_enc, hyps, target, sigma, mask).abs()) < 1e-5  # only the eps clamp of tiny P


def test_feature_paper_loss_vs_loop():
    "Per-pixel loop reference of the masked KL with the relative floor, reduced per sample then averaged."
    P, hyps, target, sigma, mask = _random_case(dtype=torch.float64, seed=5)
    got = kd_paper_loss(P, hyps, target, sigma, mask, "paper", reduction="sample")
    B, D, h, w = P.shape
    for b in range(B):
        vals = []
        for i in range(h):
            for j in range(w):
                if not mask[b, 0, i, j]: continue
                d = [float(hyps[b, k, i, j]) for k in range(D)]
                step = sum(abs(d[k + 1] - d[k]) for k in range(D - 1)) / (D - 1)
                s = max(float(sigma[b, 0, i, j]), 0.5 * step)
                lg = [-(x - float(target[b, 0, i, j])) ** 2 / (2 * s * s) for x in d]
                m = max(lg); z = sum(math.exp(v - m) for v in lg); q = [math.exp(v - m) / z for v in lg]
                vals.append(sum(qk * (math.log(qk) - math.log(max(float(P[b, k, i, j]), 1e-6))) for k, qk in enumerate(q) if qk > 0))
        assert abs(float(got[b]) - sum(vals) / len(vals)) < 1e-9
    assert abs(float(kd_paper_loss(P, hyps, target, sigma, mask)) - float(got.mean())) < 1e-12


# ---------------------------------------------------------------- release loss
@pytest.mark.parametrize("std_as_var", [False, True])
def test_feature_release_loss_hand_computed(std_as_var):
    mu, s, dh, sh = 2.1, 0.7, 2.4, 0.4  # P = (0.2, 0.5, 0.3) over (1, 2, 3): mean 2.1, variance 0.49
    if std_as_var: kl = 0.5 * (math.log(sh / s) + (s + (mu - dh) ** 2) / sh - 1)
    else: kl = math.log(sh / s) + (s ** 2 + (mu - dh) ** 2) / (2 * sh ** 2) - 0.5
    ce = -math.log(0.5 + 1e-6)  # nearest hypothesis to 2.4 is 2
    cfg = KDConfig.preset("release", release_std_as_variance=std_as_var)
    k, c, m = kd_release_terms(P3, H3, _one(dh), _one(sh), None, cfg)
    assert abs(float(k) - kl) < 1e-10 and abs(float(c) - ce) < 1e-10 and bool(m)
    assert abs(float(kd_release_loss(P3, H3, _one(dh), _one(sh), None, cfg)) - (0.5 * kl + 2.0 * ce)) < 1e-10
    cfg2 = KDConfig.preset("release", release_std_as_variance=std_as_var, kl_weight=1.0, ce_weight=0.0)
    assert abs(float(kd_release_loss(P3, H3, _one(dh), _one(sh), None, cfg2)) - kl) < 1e-10


def test_feature_release_ce_at_nearest_hypothesis():
    for dh, idx in ((1.2, 0), (2.45, 1), (2.6, 2), (7.0, 2), (-3.0, 0)):
        _, c, _ = kd_release_terms(P3, H3, _one(dh), _one(0.3), None, "release")
        assert abs(float(c) + math.log([0.2, 0.5, 0.3][idx] + 1e-6)) < 1e-12, dh


@pytest.mark.parametrize("preset", ["paper", "release", "release_fixed"])
def test_feature_no_batch_mixing(preset):
    "A batch of two with different targets equals two batches of one (the release's broadcast bug is absent)."
    fn = kd_paper_loss if preset == "paper" else kd_release_loss
    P, hyps, target, sigma, mask = _random_case(seed=7)
    both = fn(P, hyps, target, sigma, mask, preset, reduction="none")
    single = torch.cat([fn(P[i:i + 1], hyps[i:i + 1], target[i:i + 1], sigma[i:i + 1], mask[i:i + 1], preset, reduction="none") for i in range(2)])
    torch.testing.assert_close(both, single)
    mean1 = [fn(P[i:i + 1], hyps[i:i + 1], target[i:i + 1], sigma[i:i + 1], mask[i:i + 1], preset) for i in range(2)]
    torch.testing.assert_close(fn(P, hyps, target, sigma, mask, preset), (mean1[0] + mean1[1]) / 2)
    # swapping the second sample's labels changes only the second sample's loss
    t2 = target.clone(); t2[1] += 0.3
    per = fn(P, hyps, t2, sigma, mask, preset, reduction="sample")
    per0 = fn(P, hyps, target, sigma, mask, preset, reduction="sample")
    assert per[0] == per0[0] and per[1] != per0[1]


@pytest.mark.parametrize("preset", ["paper", "release", "release_fixed"])
def test_gradcheck_kd_losses(preset):
    fn = kd_paper_loss if preset == "paper" else kd_release_loss
    _, hyps, target, sigma, mask = _random_case(B=1, D=5, h=2, w=3, seed=3, dtype=torch.float64)
    logits = torch.randn(1, 5, 2, 3, **f64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: fn(x.softmax(1), hyps, target, sigma, mask, preset), (logits,))


@pytest.mark.parametrize("preset", ["paper", "release", "release_fixed"])
def test_feature_sigma_zero_no_nan(preset):
    fn = kd_paper_loss if preset == "paper" else kd_release_loss
    P, hyps, target, _, mask = _random_case(seed=9)
    logits = P.log().clone().requires_grad_()
    loss = fn(logits.softmax(1), hyps, target, torch.zeros_like(target), mask, preset)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    onehot = F.one_hot((hyps - target).abs().argmin(1), 8).permute(0, 3, 1, 2).float().requires_grad_()
    loss = fn(onehot, hyps, target, torch.zeros_like(target), mask, preset); loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(onehot.grad).all()


def test_feature_mask_and_reduction():
    P, hyps, target, sigma, mask = _random_case()
    m = kd_paper_loss(P, hyps, target, sigma, mask, reduction="none")
    assert m.shape == (2, 1, 4, 5) and (m[~mask] == 0).all()
    assert float(kd_paper_loss(P, hyps, target, sigma, torch.zeros_like(mask))) == 0.0
    t0 = target.clone(); t0[0, 0, 0, 0] = 0  # an invalid target is off the mask
    assert kd_paper_loss(P, hyps, t0, sigma, mask, reduction="none")[0, 0, 0, 0] == 0
    with pytest.raises(InputError, match="reduction"): kd_paper_loss(P, hyps, target, sigma, mask, reduction="sum")
    out = kd_release_loss(P, hyps, target + 10, sigma, mask, KDConfig.preset("release", mask_outside=True), reduction="none")
    assert (out == 0).all()


def test_feature_student_temperature():
    P, hyps, target, sigma, mask = _random_case(dtype=torch.float64)
    cfg = KDConfig(student_temperature=2.0)
    Pt = (P.log() / 2.0).softmax(1)
    torch.testing.assert_close(kd_paper_loss(P, hyps, target, sigma, mask, cfg), kd_paper_loss(Pt, hyps, target, sigma, mask, KDConfig()))


# ---------------------------------------------------------------- pseudo-depth L1 and the training-loop loss
def _outputs(depth, scales=(0.25, 0.5, 1.0), D=16):
    from mvsnb.losses.unsup import oracle_outputs
    B = depth.shape[0]
    return oracle_outputs(depth, torch.eye(3).expand(B, 3, 3, 3).clone(), 1.5, 4.0, num_depth=D, scales=scales)


def test_feature_pseudo_depth_loss_vs_loop():
    g = torch.Generator().manual_seed(0)
    gt = 2 + torch.rand(2, 1, 8, 12, generator=g)
    outs = _outputs(gt)
    for st in outs["stages"]: st["depth"] = st["depth"] + 0.05 * torch.randn(st["depth"].shape, generator=g)
    mask = torch.rand(2, 1, 8, 12, generator=g) > 0.3
    got = pseudo_depth_loss(outs, gt, mask, [0.5, 1.0, 2.0])
    expect = 0.0
    for wk, st in zip([0.5, 1.0, 2.0], outs["stages"]):
        h, w = st["depth"].shape[-2:]; f = 8 // h
        per = []
        for b in range(2):
            errs = [abs(float(st["depth"][b, 0, i, j]) - float(gt[b, 0, int((i + .5) * f), int((j + .5) * f)]))
                    for i in range(h) for j in range(w) if mask[b, 0, int((i + .5) * f), int((j + .5) * f)]]
            per.append(sum(errs) / max(len(errs), 1))
        expect += wk * sum(per) / 2
    assert abs(float(got) - expect) < 1e-5
    with pytest.raises(InputError, match="one weight per stage"): pseudo_depth_loss(outs, gt, mask, [1.0])


def test_smoke_distill_loss_registered_and_terms():
    from mvsnb.train import build_loss, loss_names
    assert {"kd_paper", "kd_release", "pseudo_l1"} <= set(loss_names())
    gt = 2 + torch.rand(2, 1, 8, 12)
    outs = _outputs(gt)
    batch = dict(pseudo_depth=gt, pseudo_mask=torch.ones_like(gt, dtype=torch.bool), pseudo_sigma=torch.full_like(gt, 0.05))
    for name, prefix in (("kd_paper", ["kd"]), ("kd_release", ["kl", "ce"]), ("pseudo_l1", ["l1"])):
        fn = build_loss(name, {"downsample": "nearest"})
        total, terms = fn(outs, batch)
        assert sorted(terms) == sorted(f"{p}_s{k}" for p in prefix for k in range(3))
        torch.testing.assert_close(total, sum(terms.values()))
        worse, _ = fn(outs, {**batch, "pseudo_depth": gt + 0.3})
        assert worse > total
    total, _ = build_loss("kd_paper", {"stage_weights": [0, 0, 1]})(outs, batch)
    assert torch.isfinite(total)
    with pytest.raises(InputError, match="PseudoLabelDataset"): DistillLoss("paper")(outs, {})
    with pytest.raises(InputError, match="one weight per stage"): DistillLoss(KDConfig(stage_weights=[1.0]))(outs, batch)
    # no σ̂ in the batch (SPSR labels): the floor takes over
    t2, _ = DistillLoss("paper")(outs, {k: v for k, v in batch.items() if k != "pseudo_sigma"})
    assert torch.isfinite(t2)


# ---------------------------------------------------------------- folders and the dataset wrapper
@pytest.fixture(scope="module")
def kd_folders(tmp_path_factory):
    from mvsnb.synthetic import make_scene, write_scene
    from mvsnb.io import write_pfm
    from mvsnb.crossview import run_check, CrossViewConfig
    tmp = tmp_path_factory.mktemp("kd")
    scene = make_scene(views=4, height=32, width=40, seed=2)
    write_scene(scene, tmp / "scene")
    g = torch.Generator().manual_seed(0)
    for v in range(4):
        write_pfm(tmp / "teacher" / "depth_est" / f"{v:08d}.pfm", (scene.depth[v, 0] * (1 + 0.001 * torch.randn(32, 40, generator=g))).numpy())
    run_check(tmp / "scene", tmp / "teacher", tmp / "checked", CrossViewConfig(tau_conf=0.0, min_views=2))
    return tmp, scene


def test_smoke_run_kd_labels_round_trip(kd_folders, tmp_path):
    from mvsnb.io import read_pfm, read_image
    tmp, scene = kd_folders
    man = run_kd_labels(tmp / "scene", tmp / "checked", tmp_path / "labels")
    assert man["method"] == "kd" and man["has_sigma"] and man["num_views"] == 4 and man["check_config"]["min_views"] == 2
    assert len(man["sources"]) == 4 * 3 + 1  # depth, sigma, mask per view + summary.json
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == ["depth", "manifest.json", "mask", "sigma"]
    lab = read_pseudo_labels(tmp_path / "labels", [1, 3])
    d_in = read_pfm(tmp / "checked" / "checked_depth" / "00000003.pfm"); s_in = read_pfm(tmp / "checked" / "sigma" / "00000003.pfm")
    m_in = read_image(tmp / "checked" / "mask" / "00000003.png", raw=True) > 0
    assert torch.equal(lab["mask"][1, 0], torch.from_numpy(m_in))
    assert torch.equal(lab["depth"][1, 0], torch.from_numpy(np.where(m_in, d_in, 0)))
    assert torch.equal(lab["sigma"][1, 0], torch.from_numpy(np.where(m_in, s_in, 0)))
    assert (lab["sigma"][lab["mask"]] > 0).any() and (lab["sigma"] >= 0).all()
    with pytest.raises(InputError, match="output folder exists"): run_kd_labels(tmp / "scene", tmp / "checked", tmp_path / "labels")
    with pytest.raises(InputError, match="no label for view 7"): read_pseudo_labels(tmp_path / "labels", 7)
    with pytest.raises(InputError, match="no manifest.json"): read_pseudo_labels(tmp / "checked", [0])
    with pytest.raises(InputError, match="no checked_depth/"): run_kd_labels(tmp / "scene", tmp / "teacher", tmp_path / "l2")


def test_exception_run_kd_labels_bad_sigma(kd_folders, tmp_path):
    import shutil
    from mvsnb.io import read_pfm, write_pfm, read_image
    tmp, _ = kd_folders
    shutil.copytree(tmp / "checked", tmp_path / "checked")
    m = read_image(tmp_path / "checked" / "mask" / "00000002.png", raw=True) > 0
    s = read_pfm(tmp_path / "checked" / "sigma" / "00000002.pfm"); s[m] = -1.0
    write_pfm(tmp_path / "checked" / "sigma" / "00000002.pfm", s)
    with pytest.raises(InputError, match="negative or non-finite"): run_kd_labels(tmp / "scene", tmp_path / "checked", tmp_path / "l")
    (tmp_path / "checked" / "sigma" / "00000001.pfm").unlink()
    with pytest.raises(InputError, match="missing the map of view 1"): run_kd_labels(tmp / "scene", tmp_path / "checked", tmp_path / "l")


def test_feature_pseudo_label_dataset_same_and_other_size(kd_folders, tmp_path):
    from mvsnb.data import SceneDataset
    from mvsnb.spsr import write_pseudo_labels
    tmp, scene = kd_folders
    run_kd_labels(tmp / "scene", tmp / "checked", tmp_path / "labels")
    lab = read_pseudo_labels(tmp_path / "labels", range(4))
    ds = PseudoLabelDataset(SceneDataset(scene, num_views=3, num_depth=16), tmp_path / "labels")
    assert len(ds) == 4
    for i in range(4):
        item = ds[i]; ref = int(item["ref_id"])
        assert torch.equal(item["pseudo_depth"], lab["depth"][ref]) and torch.equal(item["pseudo_mask"], lab["mask"][ref])
        assert torch.equal(item["pseudo_sigma"], lab["sigma"][ref])
    # labels at half size, items cropped to 24x32: labels go through the same resize + crop as the image
    half = F.interpolate(scene.depth, size=(16, 20), mode="nearest-exact")
    write_pseudo_labels(tmp_path / "half", half, half > 0)
    ds2 = PseudoLabelDataset(SceneDataset(scene, num_views=3, num_depth=16, height=24, width=32, fit="crop"), {"scene": tmp_path / "half"})
    it = ds2[1]
    assert it["pseudo_depth"].shape == it["depth_gt"].shape == (1, 24, 32) and "pseudo_sigma" not in it
    ok = it["pseudo_mask"] & it["mask_gt"]
    assert ok.float().mean() > 0.9
    assert ((it["pseudo_depth"] - it["depth_gt"]).abs()[ok] / it["depth_gt"][ok]).median() < 0.03
    with pytest.raises(InputError, match="no pseudo-label folder for scan"):
        PseudoLabelDataset(SceneDataset(scene, num_views=3), {"other": tmp_path / "half"})[0]
    write_pseudo_labels(tmp_path / "square", torch.ones(4, 1, 20, 20), torch.ones(4, 1, 20, 20, dtype=torch.bool))
    with pytest.raises(InputError, match="different aspect ratio"):
        PseudoLabelDataset(SceneDataset(scene, num_views=3), tmp_path / "square")[0]


def test_smoke_train_with_pseudo_labels(kd_folders, tmp_path):
    "The training loop finds the registered loss and reads the labels through the wrapper."
    from mvsnb.data import SceneDataset
    from mvsnb.train import train_config, train
    tmp, scene = kd_folders
    run_kd_labels(tmp / "scene", tmp / "checked", tmp_path / "labels")
    ds = PseudoLabelDataset(SceneDataset(scene, num_views=2, num_depth=16), tmp_path / "labels")
    for loss in ("kd_release", "pseudo_l1"):
        res = train(train_config("tiny_cpu", model="toy", loss=loss, steps=2, log_every=1, ckpt_every=2, progress=False,
                                 run_dir=str(tmp_path / f"run_{loss}")), ds)
        assert res.step == 2 and all(math.isfinite(r["loss"]) for r in res.history if r["kind"] == "train")
