"""Coverage-guided fuzzing (atheris, libFuzzer) of every parser that meets a client's bytes.

Targets (each a check that raises ``Finding`` when the product misbehaves; a clean refusal is fine):

* ``png``   decode_image on PNG bytes. Beyond "no exception but ImageError", a differential oracle: every
            accepted file's pixels must equal Pillow's own decode of the same file (its inflate, its unfilter),
            oriented by the same EXIF rule; a file the service takes that Pillow/zlib refuse is a finding too.
* ``jpeg``, ``tiff``  decode_image on those formats (Pillow's decoders): only ImageError may come out.
* ``pair``  decode_pair on two files cut from one input (the HTTP and CLI path: sizes, modality, colour split).
* ``dicom`` the volume reader's header parsing: pydicom.dcmread + volume_from_datasets; only the reader's
            refusals (GeometryError, InvalidDicomError) may come out.

Seeds live in tests/fuzz/seeds/<target>/ (``--write-seeds`` makes them from phantoms), findings are written to
tests/fuzz/findings/<target>/ and replayed by tests/models/images/test_fuzz.py as regression cases.

    python bench/fuzz.py png --seconds 600          # a long run; prints executions, coverage, findings
    python bench/fuzz.py all --seconds 60 --seed 1  # each target in turn
    python bench/fuzz.py --write-seeds
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FUZZ_DIR = ROOT / "tests" / "fuzz"
TARGETS = ("png", "jpeg", "tiff", "pair", "dicom")


class Finding(AssertionError):
    """The product did something it must not with these bytes (crashed, accepted a wrong picture, ...)."""


def pillow_reference(data: bytes) -> np.ndarray | None:
    """Pillow's decode of a PNG (its own zlib inflate and unfilter), oriented by its EXIF rule, as the service's
    [0, 1] float planes; None when Pillow refuses the file."""
    from PIL import Image, ImageOps

    try:
        im = Image.open(io.BytesIO(data), formats=("PNG",))
        im.load()
        im = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - any refusal of Pillow's is a refusal
        return None
    if im.mode in ("I;16", "I;16B", "I", "I;16L"):
        return np.asarray(im).astype(np.float32) / np.float32(65535)
    if im.mode not in ("L", "RGB"):
        im = im.convert("L" if im.mode in ("1", "LA") else "RGB")
    arr = np.asarray(im)
    if arr.ndim == 3 and (arr == arr[..., :1]).all():
        arr = arr[..., 0]
    return arr.astype(np.float32) / np.float32(255)


def _decode(data: bytes):  # noqa: ANN202 - DecodedImage or None (refused)
    from models.images.imaging import ImageError, decode_image

    try:
        return decode_image(data, max_pixels=1 << 20)
    except ImageError:
        return None
    except MemoryError:
        return None
    except Exception as exc:
        raise Finding(f"decode_image raised {type(exc).__name__}: {exc}") from exc


def check_png(data: bytes) -> None:
    """decode_image refuses cleanly, or gives exactly Pillow's pixels of a file Pillow (and zlib) accept."""
    import zlib

    got = _decode(data)
    if got is None or not data.startswith(b"\x89PNG"):
        return
    want = pillow_reference(data)
    if want is None:
        raise Finding("accepted a PNG that Pillow refuses")
    if got.pixels.shape != want.shape or not np.array_equal(got.pixels, want):
        raise Finding("accepted PNG decodes to other pixels than Pillow's")
    from models.images.png_reader import read_layout

    layout = read_layout(data)
    stream = b"".join(data[o:o + n] for o, n in layout.idat)
    try:
        rows = zlib.decompress(stream)
    except zlib.error as exc:
        raise Finding(f"accepted image data that zlib refuses ({exc})") from None
    if len(rows) != layout.image_data_bytes:
        raise Finding("accepted image data whose size is not the header's")


def check_decoder(data: bytes) -> None:
    """decode_image on any bytes: a DecodedImage or an ImageError, nothing else."""
    _decode(data)


def check_pair(data: bytes) -> None:
    """decode_pair on two files cut from one input at a position its first two bytes choose."""
    from models.images.imaging import ImageError
    from models.images.pair_input import decode_pair

    if len(data) < 3:
        return
    cut = 2 + int.from_bytes(data[:2], "big") % max(1, len(data) - 2)
    try:
        decode_pair(data[2:cut], data[cut:], max_pixels=1 << 20)
    except (ImageError, MemoryError):
        return
    except Exception as exc:
        raise Finding(f"decode_pair raised {type(exc).__name__}: {exc}") from exc


def check_dicom(data: bytes) -> None:
    """The volume reader's parse of one DICOM file: a Volume or a named refusal."""
    from models.volumes.io import DicomReadError, read_dicom_bytes
    from models.volumes.volume import GeometryError

    try:
        read_dicom_bytes([data])
    except (GeometryError, DicomReadError, MemoryError):
        return
    except Exception as exc:
        raise Finding(f"the DICOM reader raised {type(exc).__name__}: {exc}") from exc


CHECKS = {"png": check_png, "jpeg": check_decoder, "tiff": check_decoder, "pair": check_pair,
          "dicom": check_dicom}


def write_seeds() -> None:
    """Small valid files of each target's kind, made from the product's phantoms (committed in tests/fuzz/seeds)."""
    from PIL import Image

    from models.images.imaging import encode_png, to_uint
    from models.images.phantoms import phantom_pair

    mri, pet = phantom_pair("pet", 32, 40, seed=2)
    gray, rgb = to_uint(mri), to_uint(pet)
    seeds: dict[str, dict[str, bytes]] = {t: {} for t in TARGETS}
    seeds["png"]["ours_gray.png"] = encode_png(mri)
    seeds["png"]["ours_rgb.png"] = encode_png(pet)
    for name, arr, save in (("pillow_gray", gray, {}), ("pillow_rgb", rgb, {"optimize": True}),
                            ("trns", rgb, {"transparency": (0, 0, 0)}), ("gray16", gray.astype(np.uint16) * 257, {}),
                            ("palette", None, {}), ("rgba", np.dstack([rgb, gray]), {})):
        buf = io.BytesIO()
        image = Image.fromarray(rgb).quantize(8) if arr is None else Image.fromarray(arr)
        image.save(buf, "PNG", **save)
        seeds["png"][f"{name}.png"] = buf.getvalue()
    for name, arr in (("gray", gray), ("rgb", rgb)):
        for fmt, target, ext in (("JPEG", "jpeg", "jpg"), ("TIFF", "tiff", "tif")):
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, fmt, **({"compression": "tiff_deflate"} if fmt == "TIFF" else {}))
            seeds[target][f"{name}.{ext}"] = buf.getvalue()
    first, second = seeds["png"]["ours_gray.png"], seeds["png"]["ours_rgb.png"]
    seeds["pair"]["pet_pair.bin"] = (len(first) + 2).to_bytes(2, "big") + first + second
    seeds["dicom"]["mr_slice.dcm"] = _dicom_seed((mri * 4000).astype(np.uint16))
    for target, files in seeds.items():
        folder = FUZZ_DIR / "seeds" / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        print(f"{target}: {len(files)} seeds in {folder.relative_to(ROOT)}")


def _dicom_seed(pixels: np.ndarray) -> bytes:
    """One small MR slice, explicit VR little endian, with the geometry the reader needs."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["fuzz-seed"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID = "MR", generate_uid(entropy_srcs=["fuzz-series"])
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 3.0
    ds.WindowCenter, ds.WindowWidth = 2000, 4000
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _fix_png(data: bytes, rng: np.random.Generator) -> bytes:
    """Make a mutated PNG's chunk CRCs right again, and sometimes its image data a valid zlib stream of mutated
    rows, so that mutations reach past the checksums (a random flip is otherwise almost always a CRC refusal)."""
    import zlib

    import atheris

    if not data.startswith(b"\x89PNG"):
        return data
    out, pos = bytearray(data[:8]), 8
    idat_rows = rng.random() < 0.5
    while pos + 8 <= len(data):
        length = min(int.from_bytes(data[pos:pos + 4], "big"), len(data) - pos - 8)
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IDAT" and idat_rows:
            try:
                rows = zlib.decompressobj().decompress(body, 1 << 20)
            except zlib.error:
                rows = body
            body = zlib.compress(atheris.Mutate(rows, len(rows) + 64) if rng.random() < 0.7 else rows,
                                 int(rng.integers(0, 10)))
        out += len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")
        pos += 12 + length
    return bytes(out)


def _fuzz_child(target: str, seconds: int, seed: int, corpus: Path, findings: Path) -> None:
    """Run libFuzzer on one target in this process (atheris exits the process when done)."""
    import atheris

    with atheris.instrument_imports():
        import models.images.imaging  # noqa: F401
        import models.images.pair_input  # noqa: F401
        import models.images.png_reader  # noqa: F401
        import models.volumes.io  # noqa: F401
    check = CHECKS[target]

    def one_input(data: bytes) -> None:
        check(data)

    rng = np.random.default_rng(seed)

    def mutate(data: bytes, max_size: int, _seed: int) -> bytes:
        mutated = atheris.Mutate(data, max_size)
        if target == "png" and rng.random() < 0.9:
            return _fix_png(mutated, rng)[:max_size]
        return mutated

    args = [sys.argv[0], f"-max_total_time={seconds}", f"-seed={seed}", "-rss_limit_mb=4096", "-timeout=20",
            f"-artifact_prefix={findings}/", "-print_final_stats=1", "-max_len=65536", str(corpus),
            str(FUZZ_DIR / "seeds" / target)]
    atheris.Setup(args, one_input, custom_mutator=mutate)
    atheris.Fuzz()


def run(target: str, seconds: int, seed: int) -> dict:
    """Fuzz one target for ``seconds`` in a child process; returns executions, coverage and new findings."""
    corpus = ROOT / "runs" / "fuzz" / target  # the growing corpus: git-ignored, kept between runs
    findings = FUZZ_DIR / "findings" / target
    corpus.mkdir(parents=True, exist_ok=True)
    findings.mkdir(parents=True, exist_ok=True)
    before = set(findings.iterdir())
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, __file__, "--child", target, "--seconds", str(seconds), "--seed", str(seed)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    log = proc.stderr
    runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log)
    cov = re.findall(r"cov: (\d+) ft: (\d+)", log)
    new = sorted(str(p.relative_to(ROOT)) for p in set(findings.iterdir()) - before)
    finding_lines = [line for line in log.splitlines() if "Finding" in line or "Uncaught Python exception" in line]
    return {"target": target, "seconds": round(time.monotonic() - t0, 1), "executions": int(runs[-1]) if runs else 0,
            "coverage": int(cov[-1][0]) if cov else 0, "features": int(cov[-1][1]) if cov else 0,
            "exit": proc.returncode, "findings": new, "messages": finding_lines[:5]}


def main() -> None:
    """Command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", nargs="?", choices=(*TARGETS, "all"))
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--write-seeds", action="store_true")
    ap.add_argument("--child", metavar="TARGET", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _fuzz_child(args.child, args.seconds, args.seed, ROOT / "runs" / "fuzz" / args.child,
                    FUZZ_DIR / "findings" / args.child)
        return
    if args.write_seeds:
        write_seeds()
        return
    if not args.target:
        ap.error("name a target, 'all' or --write-seeds")
    results = [run(t, args.seconds, args.seed) for t in (TARGETS if args.target == "all" else (args.target,))]
    print(f"{'target':<7} {'seconds':>8} {'executions':>11} {'exec/s':>7} {'coverage':>9} {'findings':>9}")
    for r in results:
        print(f"{r['target']:<7} {r['seconds']:>8} {r['executions']:>11} {r['executions'] / r['seconds']:>7.0f} "
              f"{r['coverage']:>9} {len(r['findings']):>9}")
        for line in r["messages"]:
            print("   ", line)
    print(json.dumps(results))
    sys.exit(1 if any(r["findings"] for r in results) else 0)


if __name__ == "__main__":
    main()
