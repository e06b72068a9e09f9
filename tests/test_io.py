"""mvsnb.io: round trips for every format, brute-force references for the vectorised PFM/PLY code, Open3D
interoperability, atomic writes, and the table of malformed inputs (each must raise InputError naming the file,
the line where one applies, and the field)."""
import contextlib, struct
from pathlib import Path
import numpy as np
import pytest
import torch
import cv2
import mvsnb.io as io
from mvsnb.io import (CamFile, read_cam_txt, write_cam_txt, read_pair_txt, write_pair_txt, read_pfm, write_pfm,
                      PlyData, read_ply, write_ply, read_image, write_image)
from mvsnb.core import InputError, ShapeError

def expect_input_error(fn, path, line, field, contains):
    "Call `fn`; it must raise InputError whose message starts with `path[:line] [field]` and contains `contains`."
    with pytest.raises(InputError) as ei: fn()
    e, msg = ei.value, str(ei.value)
    assert Path(e.path).name == Path(path).name, msg
    assert (e.line, e.field) == (line, field), f"got line={e.line} field={e.field}: {msg}"
    prefix = f"{path}" + (f":{line}" if line is not None else "") + (f" [{field}]" if field is not None else "")
    assert msg.startswith(prefix + ": "), f"{msg!r} does not start with {prefix!r}"
    assert contains in msg, f"{contains!r} not in {msg!r}"
    return e

def random_rotation(rng):
    Q, R = np.linalg.qr(rng.standard_normal((3, 3)))
    Q = Q * np.sign(np.diag(R))
    return Q if np.linalg.det(Q) > 0 else -Q

# ---------------------------------------------------------------------------------------------- cam.txt
CAM_LINES = ["extrinsic", "1 0 0 0.5", "0 1 0 -0.25", "0 0 1 3", "0 0 0 1", "",  # lines 1-6
             "intrinsic", "50 0 39.5", "0 50 31.5", "0 0 1", "",  # lines 7-11
             "2 0.25 16 5.75"]  # line 12

def cam_text(**changes):
    "CAM_LINES with line numbers (1-based) replaced; `extra=` appends lines."
    lines = list(CAM_LINES)
    for k, v in changes.items():
        if k == "extra": lines += v
        else: lines[int(k[1:]) - 1] = v
    return "\n".join(lines) + "\n"

def test_smoke_cam_base(tmp_path):
    p = tmp_path / "base_cam.txt"; p.write_text(cam_text())
    cam = read_cam_txt(p)
    assert isinstance(cam, CamFile) and cam.w2c.dtype == np.float64 and cam.K.dtype == np.float64
    assert cam.w2c[:3, 3].tolist() == [0.5, -0.25, 3] and cam.K[0, 2] == 39.5
    assert (cam.depth_min, cam.depth_interval, cam.depth_num, cam.depth_max) == (2.0, 0.25, 16, 5.75)
    assert type(cam.depth_num) is int
    assert cam.depth_bounds() == (2.0, 5.75) and cam.depth_bounds(num=5) == (2.0, 3.0)

CAM_BAD = [  # id, file text, line, field, message fragment
    ("empty", "", None, None, "empty camera file"),
    ("blank-only", "\n   \n\t\n", None, None, "empty camera file"),
    ("no-extrinsic", "\n".join(CAM_LINES[6:]), None, "extrinsic", "missing 'extrinsic' section"),
    ("no-intrinsic", "\n".join(CAM_LINES[:6] + CAM_LINES[11:]), None, "intrinsic", "missing 'intrinsic' section"),
    ("no-depth-line", "\n".join(CAM_LINES[:11]), 10, "depth", "missing depth line"),
    ("extrinsic-3-numbers", cam_text(L3="0 1 0"), 3, "extrinsic", "expected 4 numbers, got 3"),
    ("extrinsic-5-numbers", cam_text(L3="0 1 0 0 9"), 3, "extrinsic", "expected 4 numbers, got 5"),
    ("intrinsic-4-numbers", cam_text(L9="0 50 31.5 7"), 9, "intrinsic", "expected 3 numbers, got 4"),
    ("extrinsic-3-rows", cam_text(L5=""), 7, "extrinsic", "'extrinsic' has 3 rows, expected 4"),
    ("extrinsic-5-rows", cam_text(L6="0 0 0 1"), 6, "extrinsic", "'extrinsic' has more than 4 rows"),
    ("intrinsic-4-rows", cam_text(L11="0 0 1"), 11, "intrinsic", "'intrinsic' has more than 3 rows"),
    ("file-ends-in-matrix", "\n".join(CAM_LINES[6:11] + CAM_LINES[:3]), 8, "extrinsic", "file ends after 2 of 4"),
    ("non-numeric", cam_text(L4="0 0 1 abc"), 4, "extrinsic", "not a number: 'abc'"),
    ("nan", cam_text(L8="nan 0 39.5"), 8, "intrinsic", "non-finite value 'nan'"),
    ("inf", cam_text(L2="1 0 0 inf"), 2, "extrinsic", "non-finite value 'inf'"),
    ("depth-1-value", cam_text(L12="2"), 12, "depth", "depth line needs 2 to 4 numbers"),
    ("depth-5-values", cam_text(L12="2 0.25 16 5.75 1"), 12, "depth", "depth line needs 2 to 4 numbers"),
    ("depth-non-numeric", cam_text(L12="2 abc"), 12, "depth", "not a number"),
    ("depth-nan", cam_text(L12="nan 0.25"), 12, "depth", "non-finite"),
    ("zero-interval", cam_text(L12="2 0"), 12, "depth_interval", "depth_interval must be > 0"),
    ("negative-interval", cam_text(L12="2 -0.25 16 5.75"), 12, "depth_interval", "depth_interval must be > 0"),
    ("inverted-range", cam_text(L12="2 0.25 16 1.5"), 12, "depth_max", "must be greater than depth_min"),
    ("empty-range", cam_text(L12="2 0.25 16 2"), 12, "depth_max", "must be greater than depth_min"),
    ("zero-depth-min", cam_text(L12="0 0.25"), 12, "depth_min", "depth_min must be > 0"),
    ("fractional-depth-num", cam_text(L12="2 0.25 16.5 5.75"), 12, "depth_num", "positive integer"),
    ("zero-depth-num", cam_text(L12="2 0.25 0"), 12, "depth_num", "positive integer"),
    ("second-extrinsic", cam_text(extra=CAM_LINES[:5]), 13, "extrinsic", "second 'extrinsic' section (first at line 1)"),
    ("text-after-depth", cam_text(extra=["hello"]), 13, None, "unexpected line after the depth line (line 12)"),
    ("stray-line", cam_text(L6="hello"), 6, None, "unexpected line 'hello' before the 'intrinsic' section"),
    ("keyword-with-text", cam_text(L1="extrinsic 4x4"), 1, "extrinsic", "unexpected text after"),
    ("singular-K", cam_text(L8="0 0 39.5"), 7, "intrinsic", "singular"),
    ("K-not-upper-triangular", cam_text(L10="0 1 1"), 7, "intrinsic", "upper triangular"),
    ("not-a-rotation", cam_text(L2="2 0 0 0.5"), 1, "extrinsic", "not a rotation"),
    ("bad-last-row", cam_text(L5="0 0 0 2"), 1, "extrinsic", "last row must be 0 0 0 1"),
]

@pytest.mark.parametrize("text,line,field,contains", [c[1:] for c in CAM_BAD], ids=[c[0] for c in CAM_BAD])
def test_exception_cam_malformed(tmp_path, text, line, field, contains):
    p = tmp_path / "00000003_cam.txt"; p.write_text(text)
    expect_input_error(lambda: read_cam_txt(p), p, line, field, contains)

def test_exception_cam_missing_and_binary(tmp_path):
    expect_input_error(lambda: read_cam_txt(tmp_path / "nope_cam.txt"), tmp_path / "nope_cam.txt", None, None, "not found")
    p = tmp_path / "png_cam.txt"; p.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    expect_input_error(lambda: read_cam_txt(p), p, None, None, "not a text file")

CAM_LAYOUTS = {  # all must parse to the base camera
    "no-blank-lines": "\n".join(l for l in CAM_LINES if l),
    "many-blank-lines": "\n\n\n" + "\n\n".join(CAM_LINES) + "\n\n\n\n",
    "crlf-and-trailing-space": "\r\n".join(l + "  \t" for l in CAM_LINES),
    "tabs-and-indent": "\n".join("\t " + l.replace(" ", "\t") for l in CAM_LINES),
    "no-final-newline": "\n".join(CAM_LINES),
    "sections-swapped": "\n".join(CAM_LINES[6:11] + CAM_LINES[:6] + CAM_LINES[11:]),
    "uppercase-keywords": cam_text(L1="EXTRINSIC", L7="Intrinsic"),
    "utf8-bom": "\ufeff" + cam_text(),
}

@pytest.mark.parametrize("name", list(CAM_LAYOUTS))
def test_feature_cam_layouts(tmp_path, name):
    p = tmp_path / "cam.txt"; p.write_bytes(CAM_LAYOUTS[name].encode("utf-8"))
    (tmp_path / "ref.txt").write_text(cam_text())
    cam, ref = read_cam_txt(p), read_cam_txt(tmp_path / "ref.txt")
    assert np.array_equal(cam.w2c, ref.w2c) and np.array_equal(cam.K, ref.K)
    assert (cam.depth_min, cam.depth_interval, cam.depth_num, cam.depth_max) == (2.0, 0.25, 16, 5.75)

@pytest.mark.parametrize("depth", [(425.0, 2.5), (425.0, 2.5, 192), (425.0, 2.5, 192, 935.0), (0.1234567891234, 1e-7, 3, 0.2)])
def test_feature_cam_roundtrip_exact(tmp_path, depth):
    rng = np.random.default_rng(len(depth))
    for i in range(5):
        w2c = np.eye(4); w2c[:3, :3] = random_rotation(rng); w2c[:3, 3] = rng.normal(0, 300, 3)
        K = np.array([[rng.uniform(40, 3000), 0, rng.uniform(10, 900)], [0, rng.uniform(40, 3000), rng.uniform(10, 700)], [0, 0, 1]])
        K[0, 1] = rng.normal() * (i % 2)  # skew, sometimes
        p = write_cam_txt(tmp_path / f"{i:08d}_cam.txt", w2c, K, *depth)
        cam = read_cam_txt(p)
        assert np.array_equal(cam.w2c, w2c) and np.array_equal(cam.K, K)  # bit-exact float64
        assert (cam.depth_min, cam.depth_interval) == depth[:2]
        assert cam.depth_num == (depth[2] if len(depth) > 2 else None)
        assert cam.depth_max == (depth[3] if len(depth) > 3 else None)

def test_feature_cam_write_accepts_tensors(tmp_path):
    w2c, K = torch.eye(4, dtype=torch.float64), torch.tensor([[50., 0, 39.5], [0, 50., 31.5], [0, 0, 1]])
    cam = read_cam_txt(write_cam_txt(tmp_path / "t_cam.txt", w2c, K, 2.0, 0.5))
    assert np.array_equal(cam.K, K.double().numpy())

@pytest.mark.parametrize("kwargs,field,contains", [
    (dict(depth_interval=0.0), "depth_interval", "must be > 0"),
    (dict(depth_num=16, depth_max=1.0), "depth_max", "greater than depth_min"),
    (dict(depth_max=9.0), "depth_num", "depth_max needs depth_num"),
    (dict(K=np.zeros((3, 3))), "intrinsic", "singular"),
    (dict(w2c=np.full((4, 4), np.nan)), "extrinsic", "NaN"),
])
def test_exception_cam_write_refuses_bad_input(tmp_path, kwargs, field, contains):
    args = dict(w2c=np.eye(4), K=np.array([[50., 0, 39.5], [0, 50., 31.5], [0, 0, 1]]), depth_min=2.0, depth_interval=0.5) | kwargs
    p = tmp_path / "w_cam.txt"
    expect_input_error(lambda: write_cam_txt(p, **args), p, None, field, contains)
    assert not p.exists()

# ---------------------------------------------------------------------------------------------- pair.txt
PAIR_LINES = ["3", "0", "2 1 10.5 2 3.0", "1", "2 0 10.5 2 1.0", "2", "2 0 3.0 1 1.0"]
PAIR_OK = [(0, [(1, 10.5), (2, 3.0)]), (1, [(0, 10.5), (2, 1.0)]), (2, [(0, 3.0), (1, 1.0)])]

def pair_text(**changes):
    lines = list(PAIR_LINES)
    for k, v in changes.items():
        if k == "extra": lines += v
        else: lines[int(k[1:]) - 1] = v
    return "\n".join(lines) + "\n"

def test_smoke_pair_base(tmp_path):
    p = tmp_path / "pair.txt"; p.write_text(pair_text())
    assert read_pair_txt(p) == PAIR_OK and read_pair_txt(p, num_views=3) == PAIR_OK

PAIR_BAD = [  # id, text, num_views, line, field, fragment
    ("empty", "", None, None, None, "empty pair file"),
    ("count-too-big", pair_text(L1="4"), None, 7, "num_views", "line 1 says 4 views but the file ends after 3"),
    ("count-too-small", pair_text(L1="2"), 3, 6, None, "unexpected content after the 2 views"),
    ("count-non-numeric", pair_text(L1="three"), None, 1, "num_views", "not an integer: 'three'"),
    ("count-zero", pair_text(L1="0"), None, 1, "num_views", "out of range"),
    ("count-two-tokens", pair_text(L1="3 3"), None, 1, "num_views", "first line must be the number of views"),
    ("more-views-than-scene", pair_text(), 2, 1, "num_views", "lists 3 views but the scene has 2"),
    ("odd-tokens", pair_text(L3="2 1 10.5 2"), None, 3, "src", "odd number of values"),
    ("count-mismatch", pair_text(L3="3 1 10.5 2 3.0"), None, 3, "num_src", "says 3 sources but lists 2"),
    ("src-count-non-numeric", pair_text(L3="x 1 10.5 2 3.0"), None, 3, "num_src", "not an integer"),
    ("src-id-ge-N", pair_text(L5="2 0 10.5 3 1.0"), None, 5, "src_id", "3 is out of range [0, 2]"),
    ("src-id-ge-num_views", pair_text(L5="2 0 10.5 12 1.0"), 10, 5, "src_id", "12 is out of range [0, 9]"),
    ("src-id-negative", pair_text(L3="2 -1 10.5 2 3.0"), None, 3, "src_id", "out of range"),
    ("src-id-fractional", pair_text(L3="2 1.5 10.5 2 3.0"), None, 3, "src_id", "not an integer: '1.5'"),
    ("src-is-ref", pair_text(L3="2 0 10.5 2 3.0"), None, 3, "src_id", "view 0 is listed as its own source"),
    ("src-twice", pair_text(L3="2 1 10.5 1 3.0"), None, 3, "src_id", "listed twice"),
    ("score-non-numeric", pair_text(L3="2 1 abc 2 3.0"), None, 3, "score", "not a number: 'abc'"),
    ("score-nan", pair_text(L7="2 0 nan 1 1.0"), None, 7, "score", "non-finite"),
    ("ref-twice", pair_text(L4="0"), None, 4, "ref_id", "reference 0 listed twice (first at line 2)"),
    ("ref-out-of-range", pair_text(L6="7"), None, 6, "ref_id", "7 is out of range [0, 2]"),
    ("ref-two-tokens", pair_text(L2="0 1"), None, 2, "ref_id", "expected a single reference id"),
    ("ref-non-numeric", pair_text(L2="zero"), None, 2, "ref_id", "not an integer"),
]

@pytest.mark.parametrize("text,num_views,line,field,contains", [c[1:] for c in PAIR_BAD], ids=[c[0] for c in PAIR_BAD])
def test_exception_pair_malformed(tmp_path, text, num_views, line, field, contains):
    p = tmp_path / "pair.txt"; p.write_text(text)
    expect_input_error(lambda: read_pair_txt(p, num_views=num_views), p, line, field, contains)

def test_exception_pair_missing(tmp_path):
    expect_input_error(lambda: read_pair_txt(tmp_path / "pair.txt"), tmp_path / "pair.txt", None, None, "pair file not found")

def test_feature_pair_tolerant_layout(tmp_path):
    p = tmp_path / "pair.txt"
    p.write_text("\n  3 \r\n\n0\n2 1 10.5\t2 3.0   \n\n1\n2 0 10.5 2 1.0\n2\n2 0 3.0 1 1.0\n\n\n")
    assert read_pair_txt(p) == PAIR_OK
    p.write_text("2\n0\n0\n3\n1 0 1.0\n")  # no sources; ids above N are fine when the scene has more views
    assert read_pair_txt(p, num_views=5) == [(0, []), (3, [(0, 1.0)])]

def test_feature_pair_roundtrip(tmp_path):
    from mvsnb.camera import look_at, intrinsics, view_selection_scores, select_pairs
    ang = torch.linspace(0, 0.8, 5)
    eyes = torch.stack([3 * torch.cos(ang), 3 * torch.sin(ang), torch.ones(5)], -1)
    pairs = select_pairs(view_selection_scores(intrinsics(50., 50., 39.5, 31.5)[None].repeat(5, 1, 1),
                                               look_at(eyes, torch.zeros(5, 3))), num_src=3)
    assert read_pair_txt(write_pair_txt(tmp_path / "pair.txt", pairs), num_views=5) == pairs  # exact floats
    rng = np.random.default_rng(0)
    odd = [(4, [(0, float(rng.uniform(0, 5000)))]), (0, [(4, 1e-300), (2, 123456.789)]), (2, [])]
    assert read_pair_txt(write_pair_txt(tmp_path / "odd.txt", odd), num_views=5) == odd
    expect_input_error(lambda: write_pair_txt(tmp_path / "dup.txt", [(0, []), (0, [])]), tmp_path / "dup.txt",
                       None, "ref_id", "appears twice")
    expect_input_error(lambda: write_pair_txt(tmp_path / "none.txt", []), tmp_path / "none.txt", None, "num_views", "no views")

# ---------------------------------------------------------------------------------------------- PFM
def pfm_reference_bytes(a, big_endian=False):
    "Brute-force PFM encoder: per-row, per-value struct packing, bottom row first."
    H, W = a.shape[:2]; C = 1 if a.ndim == 2 else a.shape[2]
    out = f"{'Pf' if C == 1 else 'PF'}\n{W} {H}\n{1.0 if big_endian else -1.0}\n".encode()
    fmt = ">f" if big_endian else "<f"
    for i in range(H - 1, -1, -1):
        for j in range(W):
            for c in range(C): out += struct.pack(fmt, float(a[i, j] if C == 1 else a[i, j, c]))
    return out

@pytest.mark.parametrize("shape", [(6, 8), (5, 7, 3), (1, 1), (1, 9, 3)])
def test_feature_pfm_roundtrip_exact(tmp_path, shape):
    rng = np.random.default_rng(sum(shape))
    a = (rng.standard_normal(shape) * 10 ** rng.uniform(-30, 30, shape)).astype(np.float32)
    a.flat[0] = np.inf; a.flat[-1] = np.nan  # PFM stores anything float32 can hold
    p = write_pfm(tmp_path / "a.pfm", a)
    b = read_pfm(p)
    assert b.dtype == np.float32 and b.shape == shape and b.flags.c_contiguous
    assert np.array_equal(b, a, equal_nan=True)
    assert p.read_bytes() == pfm_reference_bytes(a)  # vectorised writer == per-value reference (rows flipped)

@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("shape", [(4, 6), (3, 5, 3)])
def test_feature_pfm_read_reference_files(tmp_path, big_endian, shape):
    a = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) / 7
    p = tmp_path / "ref.pfm"; p.write_bytes(pfm_reference_bytes(a, big_endian))
    b = read_pfm(p)
    assert np.array_equal(b, a) and b.dtype == np.float32 and b.dtype.byteorder in "=<|"
    assert b[0, 0 if a.ndim == 2 else (0, 0)].tolist() == a[0, 0 if a.ndim == 2 else (0, 0)].tolist()  # top row first

def test_feature_pfm_write_variants(tmp_path):
    d = np.linspace(1, 2, 12).reshape(3, 4)  # float64 → stored as float32
    assert np.array_equal(read_pfm(write_pfm(tmp_path / "d.pfm", d)), d.astype(np.float32))
    assert read_pfm(write_pfm(tmp_path / "d1.pfm", d[..., None])).shape == (3, 4)
    assert np.array_equal(read_pfm(write_pfm(tmp_path / "t.pfm", torch.tensor(d))), d.astype(np.float32))
    for bad in (np.zeros((2, 3, 2)), np.zeros(5), np.zeros((0, 3))):
        with pytest.raises(ShapeError): write_pfm(tmp_path / "bad.pfm", bad)

GOOD_PFM = b"Pf\n3 2\n-1.0\n" + np.arange(6, dtype="<f4").tobytes()
PFM_BAD = [  # id, bytes, line, field, fragment
    ("empty", b"", 1, "header", "empty PFM file"),
    ("not-pfm", b"P6\n3 2\n255\n" + bytes(18), 1, "header", "not a PFM file"),
    ("png", b"\x89PNG\r\n\x1a\n" + bytes(40), 1, "header", "not a PFM file"),
    ("no-newline", b"Pf", 1, "header", "truncated or malformed header"),
    ("header-ends-early", b"Pf\n3 2", 2, "header", "truncated or malformed header"),
    ("size-one-token", b"Pf\n3\n-1.0\n" + bytes(24), 2, "size", "expected 'width height'"),
    ("size-non-numeric", b"Pf\na b\n-1.0\n" + bytes(24), 2, "size", "not an integer: 'a'"),
    ("size-zero", b"Pf\n0 2\n-1.0\n", 2, "size", "non-positive size 0x2"),
    ("size-negative", b"Pf\n3 -2\n-1.0\n" + bytes(24), 2, "size", "non-positive size 3x-2"),
    ("scale-zero", b"Pf\n3 2\n0\n" + bytes(24), 3, "scale", "scale must be non-zero"),
    ("scale-non-numeric", b"Pf\n3 2\nabc\n" + bytes(24), 3, "scale", "not a number"),
    ("truncated-data", GOOD_PFM[:-4], None, "data", "truncated data: 3x2x1 float32 needs 24 bytes, file has 20"),
    ("colour-truncated", b"PF" + GOOD_PFM[2:], None, "data", "needs 72 bytes, file has 24"),
]

@pytest.mark.parametrize("data,line,field,contains", [c[1:] for c in PFM_BAD], ids=[c[0] for c in PFM_BAD])
def test_exception_pfm_malformed(tmp_path, data, line, field, contains):
    p = tmp_path / "depth_0003.pfm"; p.write_bytes(data)
    expect_input_error(lambda: read_pfm(p), p, line, field, contains)

def test_exception_pfm_missing(tmp_path):
    expect_input_error(lambda: read_pfm(tmp_path / "x.pfm"), tmp_path / "x.pfm", None, None, "not found")

# ---------------------------------------------------------------------------------------------- PLY
def ply_reference_parse(path):
    "Brute-force reader for the files mvsnb writes: header by lines, body record by record with struct."
    data = path.read_bytes()
    head_end = data.index(b"end_header\n") + len(b"end_header\n")
    head = data[:head_end].decode().splitlines()
    binary = "format binary_little_endian 1.0" in head
    nv = int(next(l for l in head if l.startswith("element vertex")).split()[2])
    nf = int(next((l for l in head if l.startswith("element face")), "e f 0").split()[2])
    props = [l.split()[1:] for l in head if l.startswith("property") and "list" not in l]
    code = {"float": "f", "double": "d", "uchar": "B"}
    verts, faces = [], []
    if binary:
        fmt = "<" + "".join(code[t] for t, _ in props); size, pos = struct.calcsize(fmt), head_end
        for _ in range(nv): verts.append(struct.unpack_from(fmt, data, pos)); pos += size
        for _ in range(nf):
            n = data[pos]; faces.append(struct.unpack_from(f"<{n}i", data, pos + 1)); pos += 1 + 4 * n
    else:
        lines = data[head_end:].decode().splitlines()
        cast = {"float": np.float32, "double": float, "uchar": int}
        verts = [tuple(float(cast[t](x)) for (t, _), x in zip(props, l.split(), strict=True)) for l in lines[:nv]]
        faces = [tuple(int(x) for x in l.split()[1:]) for l in lines[nv:nv + nf]]
    return [n for _, n in props], np.array(verts, dtype=np.float64).reshape(nv, len(props)), np.array(faces, dtype=int).reshape(nf, 3)

def tiny_mesh(dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    pts = rng.uniform(-1, 1, (7, 3)).astype(dtype)
    nrm = rng.standard_normal((7, 3)).astype(dtype)
    rgb = rng.integers(0, 256, (7, 3)).astype(np.uint8)
    tri = np.array([[0, 1, 2], [2, 3, 4], [4, 5, 6], [6, 0, 3]])
    return pts, rgb, nrm, tri

@pytest.mark.parametrize("binary", [True, False], ids=["binary", "ascii"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("extras", ["none", "colors", "normals", "all"])
def test_feature_ply_roundtrip(tmp_path, binary, dtype, extras):
    pts, rgb, nrm, tri = tiny_mesh(dtype)
    kw = dict(colors=rgb if extras in ("colors", "all") else None, normals=nrm if extras in ("normals", "all") else None,
              faces=tri if extras == "all" else None)
    p = write_ply(tmp_path / "m.ply", pts, binary=binary, **kw)
    ply = read_ply(p)
    assert isinstance(ply, PlyData) and ply.points.dtype == dtype and np.array_equal(ply.points, pts)  # exact, ascii too
    for got, want in ((ply.colors, kw["colors"]), (ply.normals, kw["normals"]), (ply.faces, kw["faces"])):
        assert (got is None) == (want is None) and (want is None or np.array_equal(got, want))
    if ply.colors is not None: assert ply.colors.dtype == np.uint8
    if ply.faces is not None: assert ply.faces.dtype == np.int64 and ply.faces.shape == (4, 3)
    names, vals, faces = ply_reference_parse(p)  # vectorised writer == brute-force reading of its bytes
    want = [pts] + ([nrm] if kw["normals"] is not None else []) + ([rgb] if kw["colors"] is not None else [])
    assert np.array_equal(vals, np.concatenate([w.astype(np.float64) for w in want], 1))
    assert names[:3] == ["x", "y", "z"]
    if kw["faces"] is not None: assert np.array_equal(faces, tri)

def test_feature_ply_empty_and_inputs(tmp_path):
    for binary in (True, False):
        ply = read_ply(write_ply(tmp_path / "e.ply", np.zeros((0, 3), np.float32), faces=np.zeros((0, 3), int), binary=binary))
        assert ply.points.shape == (0, 3) and ply.faces.shape == (0, 3)
    pts = torch.rand(5, 3)
    ply = read_ply(write_ply(tmp_path / "t.ply", pts, colors=torch.ones(5, 3) * 0.5))  # tensors; float colours in [0,1]
    assert np.array_equal(ply.points, pts.numpy()) and (ply.colors == 128).all()
    with pytest.raises(ShapeError): write_ply(tmp_path / "b.ply", np.zeros((4, 2)))
    with pytest.raises(ShapeError): write_ply(tmp_path / "b.ply", np.zeros((4, 3)), colors=np.zeros((3, 3), np.uint8))
    expect_input_error(lambda: write_ply(tmp_path / "b.ply", np.zeros((4, 3)), faces=np.array([[0, 1, 4]])),
                       tmp_path / "b.ply", None, "faces", "faces must be integer indices in [0, 3]")
    expect_input_error(lambda: write_ply(tmp_path / "b.ply", np.zeros((1, 3)), colors=np.array([[2.0, 0, 0]])),
                       tmp_path / "b.ply", None, "colors", "[0,1]")
    assert not (tmp_path / "b.ply").exists()

def test_feature_ply_big_endian_and_extra_elements(tmp_path):
    pts = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9.5]], ">f8")
    head = ("ply\nformat binary_big_endian 1.0\ncomment hand-made\nobj_info x\nelement vertex 3\n"
            "property double x\nproperty double y\nproperty double z\nproperty float confidence\n"
            "element face 1\nproperty uchar flags\nproperty list uchar uint vertex_index\n"
            "element edge 2\nproperty list uchar int vertex_pair\nend_header\n")
    vert = np.empty(3, [("x", ">f8"), ("y", ">f8"), ("z", ">f8"), ("c", ">f4")])
    vert["x"], vert["y"], vert["z"], vert["c"] = pts[:, 0], pts[:, 1], pts[:, 2], 0.5
    face = np.array([(7, 3, (2, 1, 0))], [("f", "u1"), ("n", "u1"), ("v", ">u4", (3,))])
    p = tmp_path / "be.ply"; p.write_bytes(head.encode() + vert.tobytes() + face.tobytes() + b"\x02\x00")  # edges: junk, unread
    ply = read_ply(p)
    assert np.array_equal(ply.points, pts.astype(np.float64)) and ply.faces.tolist() == [[2, 1, 0]]
    assert ply.colors is None and ply.normals is None

def test_feature_ply_float_colors_and_diffuse(tmp_path):
    p = tmp_path / "c.ply"
    p.write_text("ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\nproperty float y\nproperty float z\n"
                 "property float diffuse_red\nproperty float diffuse_green\nproperty float diffuse_blue\nend_header\n"
                 "0 0 0 1 0 0.5\n\n1 1 1 0 1 0\n")
    ply = read_ply(p)
    assert ply.colors.tolist() == [[255, 0, 128], [0, 255, 0]] and ply.points.dtype == np.float32

@pytest.mark.open3d
@pytest.mark.parametrize("ascii_", [False, True], ids=["binary", "ascii"])
def test_feature_ply_open3d_interop(tmp_path, ascii_):
    o3d = pytest.importorskip("open3d")
    pts, rgb, nrm, tri = tiny_mesh(np.float64, seed=3)
    tol = dict(atol=1e-5, rtol=1e-5) if ascii_ else dict(atol=0, rtol=0)  # Open3D writes ASCII with 6 digits
    mesh = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(pts), o3d.utility.Vector3iVector(tri))
    mesh.vertex_colors = o3d.utility.Vector3dVector(rgb / 255.0)
    mesh.compute_vertex_normals()
    assert o3d.io.write_triangle_mesh(str(tmp_path / "o3d_mesh.ply"), mesh, write_ascii=ascii_)
    ply = read_ply(tmp_path / "o3d_mesh.ply")
    np.testing.assert_allclose(ply.points, pts, **tol); assert np.array_equal(ply.faces, tri)
    assert np.array_equal(ply.colors, rgb)
    np.testing.assert_allclose(ply.normals, np.asarray(mesh.vertex_normals), **tol)
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts))
    pcd.normals = o3d.utility.Vector3dVector(nrm); pcd.colors = o3d.utility.Vector3dVector(rgb / 255.0)
    assert o3d.io.write_point_cloud(str(tmp_path / "o3d_pcd.ply"), pcd, write_ascii=ascii_)
    ply = read_ply(tmp_path / "o3d_pcd.ply")
    np.testing.assert_allclose(ply.points, pts, **tol); np.testing.assert_allclose(ply.normals, nrm, **tol)
    assert np.array_equal(ply.colors, rgb) and ply.faces is None
    # and Open3D reads what mvsnb writes
    write_ply(tmp_path / "ours.ply", pts, rgb, nrm, tri, binary=not ascii_)
    back = o3d.io.read_triangle_mesh(str(tmp_path / "ours.ply"))
    assert np.array_equal(np.asarray(back.vertices), pts) and np.array_equal(np.asarray(back.triangles), tri)
    np.testing.assert_allclose(np.asarray(back.vertex_colors), rgb / 255.0, atol=1e-9)
    back = o3d.io.read_point_cloud(str(tmp_path / "ours.ply"))
    assert np.array_equal(np.asarray(back.points), pts) and np.array_equal(np.asarray(back.normals), nrm)

PLY_HEAD = ["ply", "format ascii 1.0", "element vertex 3", "property float x", "property float y", "property float z",
            "property uchar red", "property uchar green", "property uchar blue", "element face 1",
            "property list uchar int vertex_indices", "end_header"]  # lines 1-12
PLY_BODY = ["0 0 0 255 0 0", "1 0 0 0 255 0", "0 1 0 0 0 255", "3 0 1 2"]  # lines 13-16

def ply_text(drop=(), **changes):
    lines = PLY_HEAD + PLY_BODY
    for k, v in changes.items():
        if k == "extra": lines = lines + v
        else: lines[int(k[1:]) - 1] = v
    return ("\n".join(l for i, l in enumerate(lines, 1) if i not in drop) + "\n").encode()

def binary_tri_quad():
    head = "\n".join(PLY_HEAD[:1] + ["format binary_little_endian 1.0"] + PLY_HEAD[2:9] + ["element face 2"] + PLY_HEAD[10:]) + "\n"
    vert = np.zeros(3, [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("r", "u1"), ("g", "u1"), ("b", "u1")])
    return head.encode() + vert.tobytes() + b"\x03" + np.array([0, 1, 2], "<i4").tobytes() + b"\x04" + np.array([0, 1, 2, 0], "<i4").tobytes()

def binary_base():
    return (b"ply\nformat binary_little_endian 1.0\n" + "\n".join(PLY_HEAD[2:]).encode() + b"\n"
            + np.zeros(3, "<f4,<f4,<f4,u1,u1,u1").tobytes() + b"\x03" + np.array([0, 1, 2], "<i4").tobytes())

PLY_BAD = [  # id, bytes, line, field, fragment
    ("empty", b"", 1, "header", "not a PLY file"),
    ("not-ply", b"solid stl\nfacet normal 0 0 1\n", 1, "header", "not a PLY file"),
    ("ply-prefix", b"plywood\n", 1, "header", "not a PLY file"),
    ("unsupported-format", ply_text(L2="format binary_middle_endian 1.0"), 2, "format", "unsupported format 'binary_middle_endian 1.0'"),
    ("no-format", ply_text(drop=(2,)), 2, "format", "missing 'format' line"),
    ("unknown-type", ply_text(L4="property float128 x"), 4, "property", "unknown property type 'float128'"),
    ("unknown-list-type", ply_text(L11="property list uchar long vertex_indices"), 11, "property", "unknown property type 'long'"),
    ("bad-element-count", ply_text(L3="element vertex many"), 3, "element", "not an integer: 'many'"),
    ("garbage-header-line", ply_text(L9="elephant 3"), 9, "header", "malformed header line 'elephant 3'"),
    ("no-end-header", "\n".join(PLY_HEAD[:-1]).encode() + b"\n", 12, "header", "no 'end_header' line"),
    ("ascii-vertices-truncated", ply_text(drop=(15, 16)), 14, "vertex", "truncated: element 'vertex' needs 3 lines, 2 left"),
    ("ascii-faces-truncated", ply_text(drop=(16,)), 15, "face", "truncated: element 'face' needs 1 lines, 0 left"),
    ("ascii-short-row", ply_text(L14="1 0 0 0 255"), 14, "vertex", "expected 6 values, got 5"),
    ("ascii-non-numeric", ply_text(L15="0 1 zero 0 0 255"), 15, "vertex", "not a number: 'zero'"),
    ("ascii-quad-after-tri", ply_text(L10="element face 2", extra=["4 0 1 2 0"]), 17, "face", "only equal-length lists"),
    ("ascii-all-quads", ply_text(L16="4 0 1 2 0"), None, "face", "only triangles are supported"),
    ("ascii-face-index-out-of-range", ply_text(L16="3 0 1 5"), None, "face", "face 0 indexes a vertex outside [0, 2]"),
    ("ascii-bad-list-length", ply_text(L16="x 0 1 2"), 16, "face", "not a number: 'x'"),
    ("binary-truncated-faces", binary_base()[:-5], None, "face", "truncated: element 'face' needs 13 bytes, 8 left"),
    ("binary-truncated-vertices", binary_base()[:-30], None, "vertex", "truncated: element 'vertex' needs 45 bytes"),
    ("binary-quad-after-tri", binary_tri_quad(), None, "face", "face 1 has 4 entries in 'vertex_indices', face 0 has 3"),
    ("no-vertex-element", b"ply\nformat ascii 1.0\nelement face 0\nproperty list uchar int vertex_indices\nend_header\n", None, "vertex", "no 'vertex' element"),
    ("vertex-without-z", ply_text(L6="property float w"), None, "vertex", "lacks x, y or z"),
    ("face-without-indices", ply_text(L11="property list uchar int corners"), None, "face", "lacks a 'vertex_indices' list"),
]

@pytest.mark.parametrize("data,line,field,contains", [c[1:] for c in PLY_BAD], ids=[c[0] for c in PLY_BAD])
def test_exception_ply_malformed(tmp_path, data, line, field, contains):
    p = tmp_path / "fused_scan4.ply"; p.write_bytes(data)
    expect_input_error(lambda: read_ply(p), p, line, field, contains)

def test_smoke_ply_fixtures_are_valid(tmp_path):
    "The malformed cases above are mutations of files that do read."
    for data in (ply_text(), binary_base()):
        p = tmp_path / "ok.ply"; p.write_bytes(data)
        ply = read_ply(p)
        assert ply.points.shape == (3, 3) and ply.faces.tolist() == [[0, 1, 2]]
    expect_input_error(lambda: read_ply(tmp_path / "none.ply"), tmp_path / "none.ply", None, None, "PLY file not found")

# ---------------------------------------------------------------------------------------------- atomic writes
def test_feature_ply_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    p = write_ply(tmp_path / "cloud.ply", np.ones((4, 3), np.float32))
    before = p.read_bytes()
    seen = {}
    def exploding_body(*args, **kwargs):  # runs after the header went into the temporary file
        seen["tmp"] = [f.name for f in tmp_path.iterdir() if f.name != "cloud.ply"]
        raise OSError("disk full")
    monkeypatch.setattr(io, "_ply_body", exploding_body)
    with pytest.raises(OSError, match="disk full"): write_ply(p, np.zeros((9, 3), np.float32))
    assert len(seen["tmp"]) == 1 and seen["tmp"][0].startswith(".cloud.ply.")  # it really was mid-write
    assert p.read_bytes() == before and sorted(f.name for f in tmp_path.iterdir()) == ["cloud.ply"]

WRITERS = {
    "cam": (lambda p, v: write_cam_txt(p, np.eye(4), np.array([[50., 0, 3], [0, 50., 3], [0, 0, 1]]), 1.0 + v, 0.5), "x_cam.txt"),
    "pair": (lambda p, v: write_pair_txt(p, [(0, [(1, float(v))]), (1, [])]), "pair.txt"),
    "pfm": (lambda p, v: write_pfm(p, np.full((3, 4), v, np.float32)), "d.pfm"),
    "ply-ascii": (lambda p, v: write_ply(p, np.full((2, 3), v), binary=False), "a.ply"),
    "png": (lambda p, v: write_image(p, np.full((3, 4, 3), v / 4)), "i.png"),
    "jpg": (lambda p, v: write_image(p, np.full((3, 4), v / 4)), "i.jpg"),
}

@pytest.mark.parametrize("name", list(WRITERS))
def test_feature_every_writer_is_atomic(tmp_path, monkeypatch, name):
    write, fname = WRITERS[name]
    p = tmp_path / fname
    assert write(p, 1) == p
    before = p.read_bytes()
    real = io.atomic_path
    @contextlib.contextmanager
    def failing_atomic_path(path):
        with real(path) as t:
            yield t
            assert t.stat().st_size > 0
            raise OSError("power cut before the rename")
    monkeypatch.setattr(io, "atomic_path", failing_atomic_path)
    with pytest.raises(OSError, match="power cut"): write(p, 2)
    assert p.read_bytes() == before and [f.name for f in tmp_path.iterdir()] == [fname]

# ---------------------------------------------------------------------------------------------- images
def test_feature_image_png_roundtrip_and_channel_order(tmp_path):
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    img = u8.astype(np.float32) / 255
    p = write_image(tmp_path / "a.png", img)
    back = read_image(p)
    assert back.dtype == np.float32 and back.shape == (6, 8, 3)
    assert np.array_equal(np.round(back * 255).astype(np.uint8), u8)
    assert np.array_equal(read_image(p, raw=True), u8)
    bgr = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)  # OpenCV's own view of the file: reversed channels
    assert np.array_equal(bgr, u8[..., ::-1])
    write_image(tmp_path / "u8.png", u8)
    assert np.array_equal(read_image(tmp_path / "u8.png", raw=True), u8)

def test_feature_image_bit_depths_and_grey(tmp_path):
    u16 = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1365)
    p = write_image(tmp_path / "d16.png", u16)
    assert read_image(p, raw=True).dtype == np.uint16 and np.array_equal(read_image(p, raw=True), u16)
    f = read_image(p)
    assert f.shape == (6, 8, 3) and np.array_equal(f[..., 0], f[..., 2])
    np.testing.assert_allclose(f[..., 1], u16 / 65535, atol=1e-7)
    mask = np.eye(6, 8, dtype=bool)
    m = read_image(write_image(tmp_path / "m.png", mask), raw=True)
    assert m.shape == (6, 8) and np.array_equal(m == 255, mask) and np.array_equal(m == 0, ~mask)
    cv2.imwrite(str(tmp_path / "rgba.png"), np.dstack([np.full((2, 3, 3), (10, 20, 30), np.uint8), np.zeros((2, 3), np.uint8)]))
    assert read_image(tmp_path / "rgba.png", raw=True)[0, 0].tolist() == [30, 20, 10]  # BGRA → RGB, alpha dropped

def test_feature_image_jpeg(tmp_path):
    yy, xx = np.mgrid[0:48, 0:64] / 64.0
    img = np.stack([xx, yy, 0.5 * np.ones_like(xx)], -1).astype(np.float32)  # smooth: JPEG keeps it close
    back = read_image(write_image(tmp_path / "a.jpeg", img))
    assert back.shape == img.shape and np.abs(back - img).mean() < 0.01
    assert back[..., 0].mean() > back[..., 1].mean() - 0.2 and abs(back[:, -1, 0].mean() - img[:, -1, 0].mean()) < 0.03

IMG_BAD = [  # id, file bytes (None: no file), fragment
    ("missing", None, "image file not found"),
    ("empty", b"", "cannot decode image"),
    ("garbage", b"this is not an image at all" * 10, "cannot decode image"),
    ("truncated-png", cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()[:30], "cannot decode image"),
]

@pytest.mark.parametrize("data,contains", [c[1:] for c in IMG_BAD], ids=[c[0] for c in IMG_BAD])
def test_exception_image_unreadable(tmp_path, data, contains):
    p = tmp_path / "00000007.png"
    if data is not None: p.write_bytes(data)
    expect_input_error(lambda: read_image(p), p, None, None, contains)

def test_exception_image_write(tmp_path):
    expect_input_error(lambda: write_image(tmp_path / "a.bmp", np.zeros((2, 2))), tmp_path / "a.bmp", None, None, "unsupported image suffix '.bmp'")
    expect_input_error(lambda: write_image(tmp_path / "a.jpg", np.zeros((2, 2), np.uint16)), tmp_path / "a.jpg", None, None, "16-bit")
    expect_input_error(lambda: write_image(tmp_path / "a.png", np.full((2, 2), np.nan)), tmp_path / "a.png", None, None, "NaN")
    expect_input_error(lambda: write_image(tmp_path / "a.png", np.full((2, 2), 300)), tmp_path / "a.png", None, None, "[0,255]")
    for bad in (np.zeros((3, 2, 2)), np.zeros(4), np.zeros((0, 2, 3))):
        with pytest.raises(ShapeError): write_image(tmp_path / "a.png", bad)
    assert list(tmp_path.iterdir()) == []
