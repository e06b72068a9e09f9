"""A catalogue of bad inputs, each run through the public `mvsnb` command in a subprocess (issue 8).

Every case must end with a non-zero exit, **one** error line on stderr that names the file, field or value at
fault (no traceback: that needs `--debug`), and no partial output: the output it asked for does not exist, files
it was told to replace are byte-for-byte intact, and no temporary file or folder is left anywhere in the case
folder or in the case's own `TMPDIR`.

A command is slow to start (torch; a Jupyter kernel for `run`), so the module fixture prepares every case, runs
them all concurrently (forked from a warm server process, see `_SERVER`; a few also through the console script
itself) and the parametrised tests only read the results. `valid_*` cases are degenerate but legal inputs that
must succeed. Select cases while debugging with `MVSNB_BAD_INPUTS=name,name`; `MVSNB_TEST_NO_FORK=1` runs every
case through the console script instead (slower; also the fallback when the server cannot fork safely).
"""
from __future__ import annotations
import json, os, resource, shutil, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MVSNB = str(Path(sys.executable).with_name("mvsnb"))  # the installed console script
TEACHER = ROOT / "nbs" / "pipelines" / "10_train_teacher.ipynb"
TOY = ROOT / "nbs" / "pipelines" / "99_toy.ipynb"
WORKERS = int(os.environ.get("MVSNB_TEST_WORKERS", "4"))


@dataclass
class Setup:
    "What a prepared case runs and what must hold afterwards."
    argv: list  # arguments after `mvsnb`
    needles: list  # each must appear in the single error line (the file / field / value at fault)
    absent: list = field(default_factory=list)  # outputs that must not exist afterwards
    intact: list = field(default_factory=list)  # files or folders that must be unchanged (snapshotted before the run)
    stdout_needles: list = field(default_factory=list)  # e.g. the problem list of `data check`
    fsize: int|None = None  # RLIMIT_FSIZE for the command (bytes per written file): a disk that fills up
    ok: bool = False  # a degenerate but valid input: must succeed (exit 0, no error line) and write `made`
    made: list = field(default_factory=list)
    timeout: float = 240


CASES: dict[str, Callable] = {}  # id -> prep(case_dir, base) -> Setup


def case(name: str):
    def deco(fn):
        assert name not in CASES, name
        CASES[name] = fn
        return fn
    return deco


# ---------------------------------------------------------------- the valid inputs every case starts from
@dataclass
class Base:
    root: Path
    scene: Path  # synthetic scene, DTU test layout with gt/
    out: Path  # "network outputs": depth_est/ + confidence/ (GT depth with 0.5 % noise)
    checked: Path  # `mvsnb check` output of `out`
    cloud: Path  # a fused cloud (.ply)


def _make_base(root: Path) -> Base:
    from mvsnb.synthetic import make_scene, write_scene
    from mvsnb.io import read_pfm, write_pfm, write_ply, read_ply
    from mvsnb.crossview import run_check
    scene = root / "scene"
    write_scene(make_scene(views=4, height=32, width=40, seed=0), scene)
    rng = np.random.default_rng(0)
    for p in sorted((scene / "gt" / "depth").glob("*.pfm")):
        d = read_pfm(p); noisy = d * (1 + 0.005 * rng.standard_normal(d.shape)).astype(np.float32)
        write_pfm(root / "out" / "depth_est" / p.name, np.where(d > 0, noisy, 0).astype(np.float32))
        write_pfm(root / "out" / "confidence" / p.name, np.full_like(d, 0.9))
    run_check(scene, root / "out", root / "checked", "eval_fusion")
    write_ply(root / "cloud.ply", read_ply(scene / "gt" / "points.ply").points[::3])
    return Base(root, scene, root / "out", root / "checked", root / "cloud.ply")


def copy_scene(d: Path, b: Base) -> Path: return Path(shutil.copytree(b.scene, d / "scene"))
def copy_out(d: Path, b: Base) -> Path: return Path(shutil.copytree(b.out, d / "out"))
def copy_checked(d: Path, b: Base) -> Path: return Path(shutil.copytree(b.checked, d / "checked"))


def edit(path: Path, fn: Callable[[str], str]):
    text = path.read_text(); new = fn(text)
    assert new != text, f"edit of {path} changed nothing"
    path.write_text(new)


def cam(s: Path, v: int) -> Path: return s / "cams" / f"{v:08d}_cam.txt"
def pfm(o: Path, v: int, sub="depth_est") -> Path: return o / sub / f"{v:08d}.pfm"


def check_cmd(d, s, o, **kw):
    "`mvsnb check` into d/chk (must not appear)."
    return Setup(["check", "--scene", s, "--depth-dir", o, "--out", d / "chk", "--min-views", "1"], absent=[d / "chk"], **kw)

def fuse_cmd(d, s, o, **kw):
    return Setup(["fuse", "--scene", s, "--depth-dir", o, "--out", d / "cloud.ply", "--min-views", "1"], absent=[d / "cloud.ply"], **kw)

def labels_cmd(d, s, src, method="spsr", **kw):
    return Setup(["labels", "--scene", s, "--depth-dir", src, "--out", d / "labels", "--method", method, "--min-views", "1"],
                 absent=[d / "labels"], **kw)

def eval_cmd(d, s, pred, **kw):
    return Setup(["eval", "--pred", pred, "--scene", s, "--out", d / "m.json"], absent=[d / "m.json"], **kw)


# ---------------------------------------------------------------- cam.txt
@case("cam_missing_section")
def _(d, b):
    s = copy_scene(d, b); o = copy_out(d, b)
    edit(cam(s, 1), lambda t: t.split("intrinsic")[0] + "2.8 0.02 192 6.8\n")
    return check_cmd(d, s, o, needles=["00000001_cam.txt", "missing 'intrinsic' section"])

@case("cam_matrix_wrong_size")
def _(d, b):  # a 3x4 extrinsic (a row dropped)
    s = copy_scene(d, b); o = copy_out(d, b)
    edit(cam(s, 2), lambda t: "\n".join(l for i, l in enumerate(t.split("\n")) if i != 4))
    return check_cmd(d, s, o, needles=["00000002_cam.txt", "'extrinsic' has 3 rows, expected 4"])

@case("cam_row_too_short")
def _(d, b):  # a 4x3 extrinsic (last column dropped)
    s = copy_scene(d, b); o = copy_out(d, b)
    edit(cam(s, 0), lambda t: "\n".join(" ".join(l.split()[:3]) if 1 <= i <= 4 else l for i, l in enumerate(t.split("\n"))))
    return check_cmd(d, s, o, needles=["00000000_cam.txt:2", "[extrinsic]", "expected 4 numbers, got 3"])

@case("cam_non_numeric")
def _(d, b):
    s = copy_scene(d, b); o = copy_out(d, b)
    edit(cam(s, 3), lambda t: t.replace("48.0 0.0 19.5", "48.0 O.0 19.5"))
    return fuse_cmd(d, s, o, needles=["00000003_cam.txt:8", "[intrinsic]", "not a number: 'O.0'"])

@case("cam_nan")
def _(d, b):
    s = copy_scene(d, b); o = copy_out(d, b)
    edit(cam(s, 1), lambda t: t.replace("0.0 0.0 0.0 1.0", "0.0 0.0 nan 1.0"))
    return check_cmd(d, s, o, needles=["00000001_cam.txt:5", "[extrinsic]", "non-finite value 'nan'"])

@case("cam_inf")
def _(d, b):
    s = copy_scene(d, b); o = copy_out(d, b)
    edit(cam(s, 2), lambda t: t.replace("48.0 0.0 19.5", "inf 0.0 19.5"))
    return labels_cmd(d, s, o, needles=["00000002_cam.txt:8", "[intrinsic]", "non-finite value 'inf'"])

@case("cam_singular_K")
def _(d, b):
    s = copy_scene(d, b); o = copy_out(d, b)
    edit(cam(s, 1), lambda t: t.replace("48.0 0.0 19.5", "0.0 0.0 19.5"))
    return check_cmd(d, s, o, needles=["00000001_cam.txt", "[intrinsic]", "singular or non-positive focal length (fx=0"])

@case("cam_not_a_rotation")
def _(d, b):  # a similarity (scale 2) instead of a rigid pose: the kind of thing other tools export
    s = copy_scene(d, b); o = copy_out(d, b)
    lines = cam(s, 2).read_text().split("\n")
    lines[1:4] = [" ".join(repr(2 * float(x)) for x in l.split()[:3]) + " " + l.split()[3] for l in lines[1:4]]
    cam(s, 2).write_text("\n".join(lines))
    return fuse_cmd(d, s, o, needles=["00000002_cam.txt:1", "[extrinsic]", "not a rotation", "det=8"])

@case("cam_depth_range_inverted")
def _(d, b):
    s = copy_scene(d, b); o = copy_out(d, b)
    edit(cam(s, 0), lambda t: t.rstrip("\n").rsplit("\n", 1)[0] + "\n6.8 0.02 192 2.8\n")
    return check_cmd(d, s, o, needles=["00000000_cam.txt:12", "[depth_max]", "depth_max (2.8) must be greater than depth_min (6.8)"])

@case("cam_depth_interval_zero")
def _(d, b):
    s = copy_scene(d, b); o = copy_out(d, b)
    edit(cam(s, 3), lambda t: t.rstrip("\n").rsplit("\n", 1)[0] + "\n2.8 0 192\n")
    return labels_cmd(d, s, o, needles=["00000003_cam.txt:12", "[depth_interval]", "depth_interval must be > 0, got 0.0"])

@case("cam_depth_min_zero")
def _(d, b):
    s = copy_scene(d, b); o = copy_out(d, b)
    edit(cam(s, 1), lambda t: t.rstrip("\n").rsplit("\n", 1)[0] + "\n0 0.02\n")
    return check_cmd(d, s, o, needles=["00000001_cam.txt:12", "[depth_min]", "depth_min must be > 0, got 0.0"])

@case("cam_file_missing")
def _(d, b):  # a half-downloaded scene
    s = copy_scene(d, b); o = copy_out(d, b)
    cam(s, 2).unlink()
    return fuse_cmd(d, s, o, needles=["00000002_cam.txt", "camera file not found"])


# ---------------------------------------------------------------- pair.txt
@case("pair_names_missing_view")
def _(d, b):  # source id 7 in a 4-view scene
    s = copy_scene(d, b); o = copy_out(d, b)
    edit(s / "pair.txt", lambda t: t.replace("\n3 1 ", "\n3 7 ", 1))
    return check_cmd(d, s, o, needles=["pair.txt:3", "[src_id]", "7 is out of range [0, 3]"])

@case("pair_view_without_files")
def _(d, b):  # pair.txt lists a 5th view whose image and camera were never downloaded
    s = copy_scene(d, b); o = copy_out(d, b)
    edit(s / "pair.txt", lambda t: "5" + t[1:].rstrip("\n") + "\n4\n1 0 1.0\n")
    return fuse_cmd(d, s, o, needles=["00000004_cam.txt", "not found"])

@case("pair_wrong_count")
def _(d, b):
    s = copy_scene(d, b); o = copy_out(d, b)
    edit(s / "pair.txt", lambda t: "5" + t[1:])
    return check_cmd(d, s, o, needles=["pair.txt", "[num_views]", "says 5 views but the file ends after 4"])

@case("pair_empty")
def _(d, b):
    s = copy_scene(d, b); o = copy_out(d, b)
    (s / "pair.txt").write_text("\n")
    return labels_cmd(d, s, o, method="kd", needles=["pair.txt", "empty pair file"])

@case("pair_source_count")
def _(d, b):
    s = copy_scene(d, b); o = copy_out(d, b)
    edit(s / "pair.txt", lambda t: "\n".join(l if i != 4 else " ".join(l.split()[:5]) for i, l in enumerate(t.split("\n"))))
    return check_cmd(d, s, o, needles=["pair.txt:5", "[num_src]", "says 3 sources but lists 2"])


# ---------------------------------------------------------------- PFM
@case("pfm_bad_header")
def _(d, b):
    s = copy_scene(d, b); o = copy_out(d, b)
    p = pfm(o, 2); p.write_bytes(b"PX" + p.read_bytes()[2:])
    return check_cmd(d, s, o, needles=["depth_est/00000002.pfm:1", "[header]", "not a PFM file"])

@case("pfm_truncated")
def _(d, b):  # an interrupted copy
    s = copy_scene(d, b); o = copy_out(d, b)
    p = pfm(o, 1); p.write_bytes(p.read_bytes()[:-100])
    return fuse_cmd(d, s, o, needles=["depth_est/00000001.pfm", "[data]", "truncated data"])

@case("pfm_size_differs_between_views")
def _(d, b):
    from mvsnb.io import write_pfm, read_pfm
    s = copy_scene(d, b); o = copy_out(d, b)
    write_pfm(pfm(o, 3), read_pfm(pfm(o, 3)).T.copy())
    return check_cmd(d, s, o, needles=["depth_est/00000003.pfm", "differs from view 0"])

@case("pfm_size_does_not_match_image")
def _(d, b):  # every depth map transposed: 32x40 images, 40x32 depth maps (another tool's row/column order)
    from mvsnb.io import write_pfm, read_pfm
    s = copy_scene(d, b); o = copy_out(d, b)
    for v in range(4):
        write_pfm(pfm(o, v), read_pfm(pfm(o, v)).T.copy()); write_pfm(pfm(o, v, "confidence"), read_pfm(pfm(o, v, "confidence")).T.copy())
    return check_cmd(d, s, o, needles=["depth_est"])  # any fix that names the depth maps makes this XPASS

@case("pfm_three_channels")
def _(d, b):
    from mvsnb.io import write_pfm, read_pfm
    s = copy_scene(d, b); o = copy_out(d, b)
    x = read_pfm(pfm(o, 0)); write_pfm(pfm(o, 0), np.stack([x, x, x], -1))
    return labels_cmd(d, s, o, needles=["depth_est/00000000.pfm", "one channel"])


# ---------------------------------------------------------------- depth maps
def _depth_case(d, b, v, fill, cmd):
    from mvsnb.io import write_pfm, read_pfm
    s = copy_scene(d, b); o = copy_out(d, b)
    x = read_pfm(pfm(o, v)); write_pfm(pfm(o, v), fill(x))
    return cmd(d, s, o, needles=[f"view {v}", "no valid pixel"])

@case("depth_all_zero")
def _(d, b): return _depth_case(d, b, 0, np.zeros_like, check_cmd)

@case("depth_all_nan")
def _(d, b): return _depth_case(d, b, 2, lambda x: np.full_like(x, np.nan), fuse_cmd)

@case("depth_negative")
def _(d, b): return _depth_case(d, b, 3, lambda x: -x, labels_cmd)


# ---------------------------------------------------------------- images
@case("image_missing")
def _(d, b):
    s = copy_scene(d, b); o = copy_out(d, b)
    (s / "images" / "00000002.png").unlink()
    return check_cmd(d, s, o, needles=["images", "image of view 2 not found"])

@case("image_unreadable")
def _(d, b):
    s = copy_scene(d, b); o = copy_out(d, b)
    (s / "images" / "00000001.png").write_bytes(b"<html>404 Not Found</html>\n")
    return fuse_cmd(d, s, o, needles=["images/00000001.png", "cannot read the image"])

@case("image_truncated")
def _(d, b):  # the header is fine, the pixel data is cut off (an interrupted download)
    s = copy_scene(d, b); o = copy_out(d, b)
    p = s / "images" / "00000003.png"; p.write_bytes(p.read_bytes()[:200])
    return fuse_cmd(d, s, o, needles=["images/00000003.png", "cannot decode image"])

@case("images_different_sizes")
def _(d, b):
    from mvsnb.io import write_image
    s = copy_scene(d, b); o = copy_out(d, b)
    write_image(s / "images" / "00000002.png", np.zeros((30, 40, 3), np.uint8))
    return labels_cmd(d, s, o, needles=["images", "differ in size"])

@case("data_check_half_downloaded")
def _(d, b):
    s = copy_scene(d, b)
    (s / "images" / "00000003.png").unlink(); cam(s, 1).write_text(cam(s, 1).read_text()[:40])
    from mvsnb.io import write_image
    write_image(s / "images" / "00000002.png", np.zeros((30, 40, 3), np.uint8))
    return Setup(["data", "check", "synthetic", s], needles=[str(s), "3 problem(s)"],
                 stdout_needles=["missing images/00000003.png", "bad cams/00000001_cam.txt", "images/00000002.png is 40x30"],
                 intact=[s])


@case("labels_checked_depth_not_a_rescaling")
def _(d, b):  # another tool's checked depth maps, transposed
    from mvsnb.io import write_pfm, read_pfm, write_image
    s = copy_scene(d, b); c = copy_checked(d, b)
    for v in range(4):
        write_pfm(pfm(c, v, "checked_depth"), read_pfm(pfm(c, v, "checked_depth")).T.copy())
        write_image(c / "mask" / f"{v:08d}.png", np.ones((40, 32), bool))
    return labels_cmd(d, s, c, needles=["checked_depth/00000000.pfm", "not a rescaling"])


# ---------------------------------------------------------------- cameras from another tool: import
_PAR = ("templeSR{i:04d}.png 1520.4 0 302.32 0 1525.9 246.87 0 0 1 0.0219 0.9833 -0.1807 0.9986 -0.0127 0.0520 "
        "0.0488 -0.1816 -0.9822 -0.0727 0.0223 0.6146")

def _middlebury(d, nan_in_second=False, images=(1, 2)):
    from mvsnb.io import write_image
    src = d / "templeSparseRing"; src.mkdir()
    lines = [_PAR.format(i=i) for i in (1, 2)]
    if nan_in_second: lines[1] = lines[1].replace(" 0.9986 ", " nan ")
    (src / "templeSR_par.txt").write_text("2\n" + "\n".join(lines) + "\n")
    for i in images: write_image(src / f"templeSR{i:04d}.png", np.full((48, 64, 3), 0.5, np.float32))
    return src

@case("import_camera_nan")
def _(d, b):
    src = _middlebury(d, nan_in_second=True)
    return Setup(["data", "import", "middlebury-ring", src, "--out", d / "imp"], absent=[d / "imp"],
                 needles=["templeSR_par.txt:3", "[extrinsic]", "NaN or inf"])

@case("import_image_missing")
def _(d, b):  # a half-downloaded scene: the camera file lists an image that is not there
    src = _middlebury(d, images=(1,))
    return Setup(["data", "import", "middlebury-ring", src, "--out", d / "imp"], absent=[d / "imp"],
                 needles=["templeSR0002.png", "not found"])


# ---------------------------------------------------------------- point clouds: 0, 1, 10 points
def _checked_with(d, b, n):
    "A checked-depth folder that keeps only `n` pixels (of view 0)."
    from mvsnb.io import read_pfm, write_pfm, write_image
    c = copy_checked(d, b)
    for v in range(4):
        x = read_pfm(pfm(c, v, "checked_depth"))
        keep = np.zeros(x.size, bool)
        if v == 0: keep[np.flatnonzero(x.ravel() > 0)[:n]] = True
        keep = keep.reshape(x.shape)
        write_pfm(pfm(c, v, "checked_depth"), np.where(keep, x, 0).astype(np.float32))
        write_image(c / "mask" / f"{v:08d}.png", keep)
    return c

@case("fuse_keeps_no_points")
def _(d, b):  # another method's confidences (all 0.9) under a threshold on a different scale: nothing survives
    s = copy_scene(d, b); o = copy_out(d, b)
    st = fuse_cmd(d, s, o, needles=["fusion kept no points", "tau_conf=0.95"]); st.argv += ["--tau-conf", "0.95"]
    return st

for _n in (0, 1, 10):
    def _poisson(d, b, n=_n):
        s = copy_scene(d, b); c = _checked_with(d, b, n)
        return labels_cmd(d, s, c, needles=[f"got {n}"] + (["at least"] if n else []))
    case(f"poisson_{_n}_points")(_poisson)

@case("eval_0_points")
def _(d, b):
    from mvsnb.io import write_ply
    s = copy_scene(d, b); write_ply(d / "pred.ply", np.zeros((0, 3), np.float32))
    return eval_cmd(d, s, d / "pred.ply", needles=["pred.ply", "no points"])

for _n in (1, 10):
    def _eval_tiny(d, b, n=_n):  # degenerate but valid: a tiny cloud on the surface gets finite metrics (recall ~0)
        from mvsnb.io import write_ply, read_ply
        s = copy_scene(d, b); g = read_ply(b.scene / "gt" / "points.ply").points
        write_ply(d / "pred.ply", g[:: len(g) // n][:n])
        return Setup(["eval", "--pred", d / "pred.ply", "--scene", s, "--out", d / "m.json"], needles=[], ok=True, made=[d / "m.json"])
    case(f"valid_eval_{_n}_points")(_eval_tiny)

@case("eval_points_outside_box")
def _(d, b):
    from mvsnb.io import write_ply
    s = copy_scene(d, b); write_ply(d / "pred.ply", np.full((10, 3), 100.0, np.float32))
    return eval_cmd(d, s, d / "pred.ply", needles=["pred.ply", "no prediction point lies inside the evaluation box"])

@case("eval_nan_points")
def _(d, b):
    from mvsnb.io import write_ply, read_ply
    s = copy_scene(d, b); p = read_ply(b.cloud).points.copy(); p[5] = np.nan
    write_ply(d / "pred.ply", p)
    return eval_cmd(d, s, d / "pred.ply", needles=["pred.ply", "non-finite"])

@case("eval_pred_not_a_ply")
def _(d, b):
    s = copy_scene(d, b); (d / "pred.ply").write_text("v 0 0 0\nv 1 0 0\n")  # an OBJ file named .ply
    return eval_cmd(d, s, d / "pred.ply", needles=["pred.ply:1", "not a PLY file"])


# ---------------------------------------------------------------- ground truth
@case("gt_cloud_missing")
def _(d, b):
    s = copy_scene(d, b); (s / "gt" / "points.ply").unlink()
    return eval_cmd(d, s, b.cloud, needles=["gt/points.ply", "ground-truth cloud not found"])

@case("gt_cloud_truncated")
def _(d, b):
    s = copy_scene(d, b); p = s / "gt" / "points.ply"; p.write_bytes(p.read_bytes()[:-50])
    return eval_cmd(d, s, b.cloud, needles=["gt/points.ply", "truncated"])

@case("gt_obs_mask_corrupt")
def _(d, b):
    s = copy_scene(d, b); p = s / "gt" / "obs_mask.npz"; p.write_bytes(p.read_bytes()[:300])
    return eval_cmd(d, s, b.cloud, needles=["gt/obs_mask.npz"])

@case("gt_obs_mask_pickled")
def _(d, b):  # an object array in a user .npz must not be unpickled
    s = copy_scene(d, b); p = s / "gt" / "obs_mask.npz"
    with np.load(p) as z: arrays = {k: z[k] for k in z.files}
    arrays["mask"] = np.array([_Boom(d / "PWNED")], dtype=object)
    np.savez(p, **arrays)
    st = eval_cmd(d, s, b.cloud, needles=["gt/obs_mask.npz [mask]", "refusing to unpickle"]); st.absent.append(d / "PWNED")
    return st


class _Boom:
    "Unpickling this touches a file: loading it would mean executing code from a data file."
    def __init__(self, path): self.path = str(path)
    def __reduce__(self): return (Path.touch, (Path(self.path),))


# ---------------------------------------------------------------- pipelines: mvsnb run
@case("run_unknown_parameter")
def _(d, b):
    return Setup(["run", TEACHER, "--run-dir", d / "run", "-p", "stpes", "3"], needles=["[stpes]", "unknown parameter 'stpes'"],
                 absent=[d / "run"])

@case("run_parameter_wrong_type")
def _(d, b):
    return Setup(["run", TEACHER, "--run-dir", d / "run", "-p", "steps", "ten"], needles=["[steps]", "expected int", "'ten'"],
                 absent=[d / "run"])

@case("run_params_file_typo")
def _(d, b):
    (d / "p.yaml").write_text("steps: 2\nlearning_rate: 0.01\n")
    return Setup(["run", TEACHER, "--run-dir", d / "run", "-f", d / "p.yaml"], needles=["[learning_rate]", "unknown parameter"],
                 absent=[d / "run"])

def _teacher(d, ck, **extra):
    "`mvsnb run` of the teacher pipeline starting from checkpoint `ck` (must fail before training)."
    over = json.dumps({"init_checkpoint": str(ck)})
    return Setup(["run", TEACHER, "--run-dir", d / "run", "-p", "steps", "2", "-p", "train_overrides", over],
                 absent=[d / "run" / "checkpoints", d / "run" / "metrics.json"], **extra)

def _save_ck(path, **model):
    import torch
    from mvsnb.train import build_model, save_checkpoint, train_config
    torch.manual_seed(0)
    cfg = train_config("tiny_cpu", **model)
    save_checkpoint(path, build_model(cfg.model, cfg.model_preset, cfg.model_overrides), cfg)

@case("checkpoint_other_config")
def _(d, b):  # weights of the CVP model handed to the cascade teacher
    _save_ck(d / "cvp.pt", model="cvp")
    return _teacher(d, d / "cvp.pt", needles=["cvp.pt", "different model config"])

@case("checkpoint_truncated")
def _(d, b):
    _save_ck(d / "ck.pt"); p = d / "ck.pt"; p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return _teacher(d, p, needles=["ck.pt", "cannot read checkpoint"])

@case("checkpoint_pickled_code")
def _(d, b):  # a torch file whose pickle runs code on load: weights_only=True must refuse it
    import torch
    torch.save({"model": {}, "versions": {}, "x": _Boom(d / "PWNED")}, d / "evil.pt")
    s = _teacher(d, d / "evil.pt", needles=["evil.pt", "refusing to unpickle"])
    s.absent.append(d / "PWNED")
    return s


# ---------------------------------------------------------------- sweeps
def _spec(d, text):
    (d / "spec.yaml").write_text(text.replace("TOY", str(TOY)).replace("OUT", str(d / "sweep")))
    return Setup(["sweep", d / "spec.yaml"], needles=[], absent=[d / "sweep"])

@case("sweep_key_typo")
def _(d, b):
    s = _spec(d, "notebook: TOY\nout: OUT\ngird:\n  x: [1.0, 2.0]\n"); s.needles = ["spec.yaml:3", "[gird]", "did you mean 'grid'"]
    return s

@case("sweep_parameter_typo")
def _(d, b):
    s = _spec(d, "notebook: TOY\nout: OUT\ngrid:\n  x: [1.0, 2.0]\n  yy: [1]\n"); s.needles = ["spec.yaml:5", "[grid.yy]", "unknown parameter 'yy'"]
    return s

@case("sweep_empty_grid")
def _(d, b):
    s = _spec(d, "notebook: TOY\nout: OUT\ngrid: {}\n"); s.needles = ["spec.yaml:3", "[grid]", "empty grid"]
    return s

@case("sweep_empty_values")
def _(d, b):
    s = _spec(d, "notebook: TOY\nout: OUT\ngrid:\n  x: []\n"); s.needles = ["spec.yaml:4", "[grid.x]", "empty list of values"]
    return s


# ---------------------------------------------------------------- where the output goes
@case("out_folder_exists_check")
def _(d, b):
    s = copy_scene(d, b); o = copy_out(d, b)
    (d / "chk").mkdir(); (d / "chk" / "notes.txt").write_text("mine")
    return Setup(["check", "--scene", s, "--depth-dir", o, "--out", d / "chk"], needles=["chk", "output folder exists", "--overwrite"],
                 intact=[d / "chk"])

@case("out_folder_exists_labels")
def _(d, b):
    s = copy_scene(d, b); c = copy_checked(d, b)
    (d / "labels").mkdir(); (d / "labels" / "notes.txt").write_text("mine")
    return Setup(["labels", "--scene", s, "--depth-dir", c, "--out", d / "labels", "--method", "kd"],
                 needles=["labels", "output folder exists", "--overwrite"], intact=[d / "labels"])

@case("out_file_exists_fuse")
def _(d, b):
    s = copy_scene(d, b); o = copy_out(d, b); shutil.copy(b.cloud, d / "cloud.ply")
    return Setup(["fuse", "--scene", s, "--depth-dir", o, "--out", d / "cloud.ply"], needles=["cloud.ply", "exists", "--overwrite"],
                 intact=[d / "cloud.ply"])

@case("out_folder_exists_synth")
def _(d, b):
    (d / "s").mkdir(); (d / "s" / "notes.txt").write_text("mine")
    return Setup(["synth", "--out", d / "s", "--views", "3", "--height", "16", "--width", "20"], needles=["output folder exists"],
                 intact=[d / "s"])

@case("out_under_a_file")
def _(d, b):  # read-only stand-in that works for root too: the parent "folder" is a regular file
    s = copy_scene(d, b); c = copy_checked(d, b); (d / "file").write_text("x")
    return Setup(["labels", "--scene", s, "--depth-dir", c, "--out", d / "file" / "labels", "--method", "kd"],
                 needles=[str(d / "file")], intact=[d / "file"])

@case("out_read_only_filesystem")
def _(d, b):  # a read-only tmpfs (root can mount; elsewhere this case is skipped)
    mnt = d / "ro"; mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    _MOUNTS.append(mnt)
    s = copy_scene(d, b); o = copy_out(d, b)
    return Setup(["check", "--scene", s, "--depth-dir", o, "--out", mnt / "chk", "--min-views", "1"],
                 needles=["Read-only file system", str(mnt / "chk")], absent=[mnt / "chk"])

@case("disk_full_ply_writer")
def _(d, b):  # the new cloud does not fit (RLIMIT_FSIZE: the kernel refuses the write); the old cloud stays intact
    s = copy_scene(d, b); o = copy_out(d, b); shutil.copy(b.cloud, d / "cloud.ply")
    return Setup(["fuse", "--scene", s, "--depth-dir", o, "--out", d / "cloud.ply", "--min-views", "1", "--overwrite"],
                 needles=["cloud.ply", "File too large"], intact=[d / "cloud.ply"], fsize=4096)  # the fused cloud is ~60 kB

@case("disk_full_tmpfs")
def _(d, b):  # a real full file system: a 16 kB tmpfs already holding the previous cloud
    mnt = d / "small"; mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    _MOUNTS.append(mnt)
    from mvsnb.io import write_ply, read_ply
    write_ply(mnt / "cloud.ply", read_ply(b.cloud).points[:1500])  # ~18 kB of 48 kB
    s = copy_scene(d, b); o = copy_out(d, b)
    return Setup(["fuse", "--scene", s, "--depth-dir", o, "--out", mnt / "cloud.ply", "--min-views", "1", "--overwrite"],
                 needles=["cloud.ply", "No space left on device"], intact=[mnt / "cloud.ply"])


_MOUNTS: list[Path] = []

# ---------------------------------------------------------------- running the catalogue
@dataclass
class Result:
    setup: Setup|None
    rc: int|None = None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    snapshot: dict = field(default_factory=dict)
    skip: str|None = None
    dir: Path|None = None


def _snapshot(paths) -> dict:
    out = {}
    for p in paths:
        p = Path(p)
        if p.is_dir(): out[str(p)] = {q.relative_to(p).as_posix(): q.read_bytes() for q in sorted(p.rglob("*")) if q.is_file()}
        else: out[str(p)] = p.read_bytes() if p.exists() else None
    return out


def _env(d: Path) -> dict:
    return {**os.environ, "TMPDIR": str(d / "tmp"), "PYTHONWARNINGS": "ignore::DeprecationWarning", **THREADS}


THREADS = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _run(argv, d: Path, fsize=None, timeout=240):
    "Run the installed `mvsnb` console script in `d` with its own TMPDIR; (exit code, stdout, stderr, seconds)."
    limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))) if fsize else None
    t0 = time.perf_counter()
    r = subprocess.run([MVSNB] + [str(a) for a in argv], capture_output=True, text=True, env=_env(d), cwd=d,
                       timeout=timeout, preexec_fn=limit)
    return r.returncode, r.stdout, r.stderr, time.perf_counter() - t0


# Each `mvsnb` process spends ~1.2 s of CPU importing torch before it reads its first argument, which is most of a
# bad-input case. So the catalogue forks its commands from a warm, single-threaded server process that has imported
# the library once: every case still runs in its own process (`mvsnb.cli.main(argv)`, what the console script
# calls), with its own cwd, environment, TMPDIR, stdout/stderr and exit code. `SCRIPT_CASES` also go through the
# installed console script itself, and must give the same result.
_SERVER = r"""
import json, os, resource, select, signal, sys, tempfile, time, traceback
import torch, numpy, cv2, yaml, scipy.spatial, papermill  # warm: what most commands import first
import mvsnb.cli, mvsnb.io, mvsnb.crossview, mvsnb.fusion, mvsnb.metrics, mvsnb.runner, mvsnb.sweep, mvsnb.data
if len(os.listdir("/proc/self/task")) != 1 or os.environ.get("MVSNB_TEST_NO_FORK"): sys.exit(3)  # forking needs one thread
workers, queue, running, buf, eof = int(sys.argv[1]), [], {}, b"", False
def start(req):
    out = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    pid = os.fork()
    if pid:
        os.close(out); os.close(err); running[pid] = (req["id"], time.perf_counter(), req["timeout"]); return
    rc = 70
    try:
        os.setpgrp()  # its own process group: a hung case is killed with everything it started
        os.dup2(out, 1); os.dup2(err, 2); os.close(out); os.close(err)
        os.chdir(req["cwd"]); os.environ.clear(); os.environ.update(req["env"]); tempfile.tempdir = None
        if req.get("fsize"): resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
        sys.argv = ["mvsnb", *req["argv"]]
        rc = mvsnb.cli.main(req["argv"])
    except SystemExit as e: rc = e.code if isinstance(e.code, int) else 1
    except BaseException: traceback.print_exc(); rc = 1  # as the console script would: a traceback and exit 1
    finally:
        try: sys.stdout.flush(); sys.stderr.flush()
        finally: os._exit(rc)
while not eof or queue or running:
    if not eof and select.select([0], [], [], 0.02)[0]:  # also the poll interval while reading requests
        chunk = os.read(0, 1 << 16); eof = not chunk; buf += chunk
        *lines, buf = buf.split(b"\n")
        queue += [json.loads(l) for l in lines if l.strip()]
    while queue and len(running) < workers: start(queue.pop(0))
    reaped = False
    for pid in list(running):
        done, status = os.waitpid(pid, os.WNOHANG)
        if not done and time.perf_counter() - running[pid][1] > running[pid][2]:
            os.killpg(pid, signal.SIGKILL); continue  # reaped (as killed by SIGKILL) on a later round
        if done:
            name, t0, _ = running.pop(pid); reaped = True
            print(json.dumps({"id": name, "rc": os.waitstatus_to_exitcode(status), "seconds": time.perf_counter() - t0}), flush=True)
    if eof and running and not reaped: time.sleep(0.02)
"""


def _run_all(jobs: dict, io_dir: Path, workers: int) -> dict:
    "Run {name: (argv, dir, fsize, timeout)} through the fork server; {name: (rc, stdout, stderr, seconds)}."
    io_dir.mkdir(parents=True, exist_ok=True)
    srv = subprocess.Popen([sys.executable, "-c", _SERVER, str(workers)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True, env={**os.environ, **THREADS})
    for name, (argv, d, fsize, timeout) in jobs.items():
        srv.stdin.write(json.dumps({"id": name, "argv": [str(a) for a in argv], "cwd": str(d), "env": _env(d), "fsize": fsize, "timeout": timeout,
                                    "out": str(io_dir / f"{name}.out"), "err": str(io_dir / f"{name}.err")}) + "\n")
    srv.stdin.close()
    out = {}
    for line in srv.stdout:
        r = json.loads(line)
        out[r["id"]] = (r["rc"], (io_dir / f"{r['id']}.out").read_text(), (io_dir / f"{r['id']}.err").read_text(), r["seconds"])
    if srv.wait(timeout=60) != 0:  # no fork server here (e.g. a BLAS that starts threads on import): plain subprocesses
        left = [n for n in jobs if n not in out]
        with ThreadPoolExecutor(max_workers=workers) as ex:
            for n, res in zip(left, ex.map(lambda n: _run(jobs[n][0], jobs[n][1], jobs[n][2], jobs[n][3]), left)): out[n] = res
    return out


SCRIPT_CASES = ("cam_nan", "disk_full_ply_writer", "gt_cloud_missing", "sweep_empty_grid")  # also via the console script


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    base = _make_base(root / "base")
    results: dict[str, Result] = {}
    only = set(filter(None, os.environ.get("MVSNB_BAD_INPUTS", "").split(",")))  # debugging: run only these cases
    names = [*CASES, *[f"{n}@script" for n in SCRIPT_CASES]]
    for name in names:
        case_name = name.split("@")[0]
        if only and case_name not in only: results[name] = Result(None, skip="not selected (MVSNB_BAD_INPUTS)"); continue
        d = root / name.replace("@", "_"); d.mkdir(); (d / "tmp").mkdir()
        try: s = CASES[case_name](d, base)
        except pytest.skip.Exception as e: results[name] = Result(None, skip=str(e.msg), dir=d); continue
        results[name] = Result(s, snapshot=_snapshot(s.intact), dir=d)
    todo = {n: r for n, r in results.items() if r.setup is not None}
    slow_first = sorted(todo, key=lambda n: todo[n].setup.argv[0] not in ("run", "sweep"))  # kernel-starting cases first
    try:
        with ThreadPoolExecutor(max_workers=2) as ex:
            scripts = {n: ex.submit(_run, todo[n].setup.argv, todo[n].dir, todo[n].setup.fsize, todo[n].setup.timeout)
                       for n in todo if n.endswith("@script")}
            forked = _run_all({n: (todo[n].setup.argv, todo[n].dir, todo[n].setup.fsize, todo[n].setup.timeout)
                               for n in slow_first if "@" not in n},
                              root / "_io", WORKERS)
            for n, f in scripts.items(): forked[n] = f.result()
        for n, (rc, out, err, sec) in forked.items(): todo[n].rc, todo[n].stdout, todo[n].stderr, todo[n].seconds = rc, out, err, sec
        yield results
    finally:
        for m in _MOUNTS: subprocess.run(["umount", "-l", str(m)], capture_output=True)
        _MOUNTS.clear()


def _leftovers(d: Path) -> list[str]:
    "Temporary files or folders a writer left behind (atomic writers use hidden names: `.NAME.*.tmp`, `.NAME.*.old`)."
    bad = [p for p in d.rglob("*") if p.name.startswith(".")]
    bad += [p for p in (d / "tmp").iterdir() if not p.name.startswith("torchinductor_")]  # the case's TMPDIR is empty again (torch's own cache aside)
    return [str(p.relative_to(d)) for p in bad]


XFAIL = {  # library bugs in notebooks still being written by others (reported, not fixed here)
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=XFAIL[n])) if n in XFAIL else n
                                  for n in [*CASES, *[f"{c}@script" for c in SCRIPT_CASES]]])
def test_exception_bad_input(catalogue, name):
    r = catalogue[name]
    if r.skip: pytest.skip(r.skip)
    s = r.setup
    where = f"\n$ mvsnb {' '.join(map(str, s.argv))}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
    if s.ok:  # degenerate but valid
        assert r.rc == 0 and "error" not in r.stderr and "Traceback" not in r.stderr, where
        for p in s.made: assert Path(p).is_file(), f"{p} not written" + where
        m = json.loads(Path(s.made[0]).read_text())
        assert all(np.isfinite(m[k]) for k in ("accuracy", "completeness", "fscore")) and m["precision"] > 0.9, m
        assert not _leftovers(r.dir), where
        return
    assert r.rc not in (0, None), "exited 0 on bad input" + where
    assert r.rc in (1, 2), f"exit code {r.rc} (a crash or a signal, not an error exit)" + where
    lines = [l for l in r.stderr.splitlines() if l.strip() and ": warning:" not in l]
    assert "Traceback" not in r.stderr, "traceback without --debug" + where
    assert len(lines) == 1, f"expected one error line, got {len(lines)}" + where
    line = lines[0]
    assert line.startswith(f"mvsnb {s.argv[0]}: error: "), where
    assert "unexpected" not in line, "an unexpected exception type reached the user" + where
    for n in s.needles: assert str(n) in line, f"error line does not name {n!r}" + where
    for n in s.stdout_needles: assert n in r.stdout, f"stdout does not mention {n!r}" + where
    for p in s.absent: assert not Path(p).exists(), f"partial output left behind: {p}" + where
    assert _snapshot(s.intact) == r.snapshot, "a file that should have been left alone changed" + where
    assert not _leftovers(r.dir), f"temporary files left behind: {_leftovers(r.dir)}" + where


def test_smoke_catalogue_size(catalogue):
    "The issue asks for at least 30 cases; report the count and the slowest case."
    ran = {n: r for n, r in catalogue.items() if r.setup is not None and "@" not in n and not r.setup.ok}
    if os.environ.get("MVSNB_BAD_INPUTS"): pytest.skip("a selection of cases was run")
    assert len(ran) >= 30, len(ran)
    for n in SCRIPT_CASES:  # the console script and the forked entry point agree
        a, b = catalogue[n], catalogue[f"{n}@script"]
        assert (a.rc, a.stderr.replace(str(a.dir), "D")) == (b.rc, b.stderr.replace(str(b.dir), "D")), (a.stderr, b.stderr)
    slowest = sorted(ran.items(), key=lambda kv: -kv[1].seconds)[:5]
    print(f"\n{len(ran)} bad-input cases run (+{len(CASES) - len(ran)} valid or skipped); slowest: " + ", ".join(f"{n} {r.seconds:.1f} s" for n, r in slowest))


def test_feature_debug_shows_the_traceback(tmp_path):
    "The same one-line error with --debug prints the traceback (for bug reports)."
    (tmp_path / "tmp").mkdir()
    (tmp_path / "pair.txt").write_text("")
    rc, out, err, _ = _run(["--debug", "check", "--scene", tmp_path, "--depth-dir", tmp_path, "--out", tmp_path / "o"], tmp_path)
    assert rc == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("mvsnb check: error: "), err
