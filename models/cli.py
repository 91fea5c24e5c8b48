"""``dmfnet fuse | info | eval | sample``: the science tools (no HTTP, no training imports; heavy imports lazy)."""

from __future__ import annotations

import argparse
import sys

from models.images.pair_input import MODALITIES
from models.inference.tiling import DEFAULT_OVERLAP, DEFAULT_TILE

RANDOM_BANNER = (
    "!" * 78
    + "\n!! RANDOM-INITIALISED MODEL ({name}): outputs are NOT a trained fusion. For tests and speed only.\n"
    + "!" * 78
)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default=None,
                   help="full (shipped DM-FNet, default), fast (distilled tier), a weights file or random:CONFIG")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 on CUDA and AMX/AVX512-BF16 CPUs, else fp32")
    p.add_argument("--chunk-size", type=int, default=None, help="images per network call (DM-FNet: UNet passes)")
    p.add_argument("--tile-size", type=int, default=DEFAULT_TILE,
                   help=f"images larger than this are fused in overlapping tiles (default {DEFAULT_TILE})")
    p.add_argument("--tile-overlap", type=int, default=DEFAULT_OVERLAP,
                   help=f"pixels shared by neighbouring tiles (default {DEFAULT_OVERLAP})")
    p.add_argument("--runtime", choices=["torch", "onnxruntime", "openvino"], default=None,
                   help="default: onnxruntime for fp32 on CPU, torch for bf16 and CUDA (measured); `fuse` of the fast "
                        "tier runs its shipped graph without torch where that pays (small studies, README)")


READ_AHEAD = True  # volumes are read in a second process while the model loads; bench/study.py compares both


def _graph_pipeline(args: argparse.Namespace, pixels: int | None):
    """The fast tier's shipped graph without torch, where that pays for a one-shot job of ``pixels``
    (:func:`models.inference.graph_fuser.graph_pays`); None: use :func:`_pipeline`."""
    from models.inference.graph_fuser import graph_pays, shipped_graph_fuser

    if not graph_pays(args.weights, args.device, args.precision, getattr(args, "runtime", None), pixels):
        return None
    return shipped_graph_fuser(args.weights, tile_size=args.tile_size, tile_overlap=args.tile_overlap)


def _pipeline(args: argparse.Namespace):
    from models.inference.runtimes import use_runtime
    from models.inference.weights import open_pipeline

    pipe = open_pipeline(args.weights, args.device, precision=args.precision, chunk_size=args.chunk_size,
                         tile_size=args.tile_size, tile_overlap=args.tile_overlap)
    use_runtime(pipe, getattr(args, "runtime", None))
    if pipe.is_random:
        print(RANDOM_BANNER.format(name=pipe.model_name), file=sys.stderr)
    return pipe


def _fuse(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from models.images.imaging import ImageError, encode_png
    from models.images.pair_input import decode_pair
    from models.images.pairs import discover_pairs

    if bool(args.pairs) == bool(args.mri):
        print("error: give MRI OTHER -o OUT.png, or --pairs DIR --out OUTDIR", file=sys.stderr)
        return 2
    if args.mri and (not args.other or not args.output):
        print("error: single-pair mode needs MRI OTHER -o OUT.png", file=sys.stderr)
        return 2
    if args.pairs and not args.out:
        print("error: --pairs needs --out OUTDIR", file=sys.stderr)
        return 2
    from models.volumes.cli import estimated_pixels, fuse_volume_files, is_volume_input, start_reading

    if args.mri and (is_volume_input(args.mri) or is_volume_input(args.other)):
        graph = _graph_pipeline(args, estimated_pixels(args.mri))
        if graph is not None or not READ_AHEAD:  # without torch's import there is nothing to read beside
            return fuse_volume_files(args, graph or _pipeline(args))
        inputs = start_reading(args)  # before the model: the volumes are read on the other core meanwhile
        try:
            return fuse_volume_files(args, _pipeline(args), inputs)
        finally:
            inputs.close()
    if args.mri:
        try:
            pair = decode_pair(args.mri, args.other, args.modality, args.resize)
        except ImageError as exc:
            print(f"error: {exc.detail}", file=sys.stderr)
            return 1
        pipe = _graph_pipeline(args, pair.size[0] * pair.size[1]) or _pipeline(args)
        text = pipe.provenance()
        result = pipe.fuse([pair])[0]
        Path(args.output).write_bytes(encode_png(result.pixels, args.bit_depth, text))
        print(f"wrote {args.output} ({result.modality}, {result.pixels.shape[1]}x{result.pixels.shape[0]})")
        return 0
    pipe = _pipeline(args)
    text = pipe.provenance()
    pairs = discover_pairs(args.pairs)
    out = Path(args.out)
    failures = 0
    bar = tqdm(total=len(pairs), desc="fuse", unit="pair")
    for i in range(0, len(pairs), args.batch_size):
        chunk = pairs[i : i + args.batch_size]
        prepared, targets = [], []
        for p in chunk:
            try:
                labels = (f"{p.task}/{p.pair_id} mri", f"{p.task}/{p.pair_id} {p.modality}")
                prepared.append(decode_pair(p.mri, p.functional, p.modality, args.resize, labels=labels))
                targets.append(out / p.task / f"{p.pair_id}.png")
            except ImageError as exc:
                failures += 1
                bar.write(f"skipped: {exc.detail}")
        for target, result in zip(targets, pipe.fuse(prepared)):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(encode_png(result.pixels, args.bit_depth, text))
        bar.update(len(chunk))
    bar.close()
    print(f"fused {len(pairs) - failures} pairs into {out}" + (f"; {failures} skipped" if failures else ""))
    return 1 if failures else 0


def _info(args: argparse.Namespace) -> int:
    import json

    import torch

    pipe = _pipeline(args)
    info = {
        "dmfnet": __import__("models").__version__,
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "threads": torch.get_num_threads(),
        **pipe.describe(),
    }
    print(json.dumps(info, indent=2))
    return 0


def _compared(args: argparse.Namespace, pairs: list) -> dict | None:
    """{NAME: folder} of ``--fused`` (as "fused") and every ``--compare NAME=DIR``; None (and a message) when one
    is malformed, named like a built-in method, or lacks a pair's image."""
    from pathlib import Path

    from models.evaluation import report

    dirs = {"fused": Path(args.fused)} if args.fused else {}
    for item in args.compare or []:
        name, sep, folder = item.partition("=")
        name = name.strip()
        if not sep or not name or not folder or name in report.METHODS or name in dirs:
            print(f"error: --compare {item!r}: give NAME=DIR with a new NAME (not one of "
                  f"{', '.join(report.METHODS)}, not twice)", file=sys.stderr)
            return None
        dirs[name] = Path(folder)
    for name, folder in dirs.items():
        missing = report.missing_fused(folder, pairs)
        if missing:
            print(f"error: {name}: {folder} lacks {len(missing)} of {len(pairs)} fused images (first: {missing[0]}; "
                  "expected TASK/ID.png as `dmfnet fuse --pairs` writes)", file=sys.stderr)
            return None
    return dirs


def _eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from models.evaluation import report
    from models.evaluation.plot import metrics_plot
    from models.images.pairs import discover_pairs

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    bad = [m for m in methods if m not in report.METHODS]
    if bad or not methods:
        print(f"error: unknown method(s) {bad}; choose from {', '.join(report.METHODS)}", file=sys.stderr)
        return 2
    pairs = report.select_split(discover_pairs(args.pairs), args.split, Path(args.split_file))
    dirs = _compared(args, pairs)
    if dirs is None:
        return 2
    if args.fused:
        methods = [m for m in methods if m != "model"]  # the folder stands for the model
    methods = [*(["fused"] if args.fused else []), *methods, *(n for n in dirs if n != "fused")]
    sheet = report.sheet_pairs(pairs)
    keep = {(p.task, p.pair_id) for p in sheet}
    pipe = _pipeline(args) if "model" in methods else None
    rows, kept = report.evaluate(pairs, methods, pipe, dirs, args.batch_size, not args.json, keep, args.workers)
    summary = report.summarize(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.contact_sheet(sheet, kept, out / "contact_sheet.png")
    title = f"Fusion evaluation: {len(pairs)} pairs of {args.pairs} (split: {args.split})"
    if pipe is not None:
        title += f", model {pipe.model_name} ({(pipe.weights_sha256 or pipe.weights_path or '')[:12]})"
    metrics_plot(summary, out / "metrics.png", report.BASELINES)
    path = report.write_report(rows, summary, out, title, "contact_sheet.png", "metrics.png")
    if args.json:
        doc = {t: {k: v for k, v in s.items() if not k.endswith("_std")} for t, s in summary[methods[0]].items()}
        if len(methods) > 1:
            doc = {m: {t: {k: v for k, v in s.items() if not k.endswith("_std")} for t, s in summary[m].items()}
                   for m in methods}
        print(json.dumps(doc))
    else:
        print(report.markdown_table(summary))
        print(f"report: {path}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    from models.images.imaging import encode_png
    from models.images.phantoms import phantom_pair

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.volumes:
        from models.volumes import phantom as pv
        from models.volumes.nifti import save_nifti

        note = "synthetic phantom, not patient data"
        save_nifti(out / "t1.nii.gz", pv.sample("MR", 128, 1.5, 40, 1.5), f"MR {note}")
        save_nifti(out / "pet.nii.gz", pv.sample("PT", 64, 3.0, 20, 3.0, centre=[4, -3, 0]), f"PET {note}")
        print(f"wrote a synthetic phantom (not patient data) to {out}: t1.nii.gz (128 px, 1.5 mm, 40 slices) and "
              "pet.nii.gz (64 px, 3 mm, 20 slices, another grid; hot lesion at LPS 22, -18, 6 mm); try: dmfnet fuse "
              f"{out / 't1.nii.gz'} {out / 'pet.nii.gz'} --modality pet -o fused.nii.gz --weights fast")
        return 0
    for modality in MODALITIES:
        mri, other = phantom_pair(modality, args.size, args.size, seed=args.seed)
        (out / f"sample_{modality}_mri.png").write_bytes(encode_png(mri))
        (out / f"sample_{modality}_{modality}.png").write_bytes(encode_png(other))
    print(f"wrote synthetic phantom pairs (not patient data) to {out}: sample_{{ct,pet,spect}}_mri.png + "
          "sample_ct_ct.png, sample_pet_pet.png, sample_spect_spect.png")
    return 0


def _export(args: argparse.Namespace) -> int:
    import torch

    from models.inference.export import export_onnx, triton_repository
    from models.inference.weights import open_pipeline

    pipe = open_pipeline(args.weights, "cpu", precision="fp32")
    path = export_onnx(pipe, args.output)
    x = torch.zeros(1, 1, pipe.size_multiple, pipe.size_multiple)
    print(f"wrote {path} ({pipe.model_name}, inputs {', '.join(pipe.graph_feeds(x, x))}; "
          f"pad H and W to a multiple of {pipe.size_multiple})")
    if args.triton:
        print(f"wrote Triton model {triton_repository(pipe, path, args.triton)}")
    return 0


def add_parsers(sub) -> None:
    """Register ``sample``, ``fuse``, ``info`` and ``eval``."""
    from models.volumes.cli import add_volume_args

    sp = sub.add_parser("sample", help="write synthetic phantom pairs (MRI + CT/PET/SPECT) to try the tool on")
    sp.add_argument("out", nargs="?", default=".", help="output directory (default: current)")
    sp.add_argument("--size", type=int, default=256)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--volumes", action="store_true", help="write a NIfTI MR + PET phantom pair on different grids")
    sp.set_defaults(func=_sample)

    f = sub.add_parser("fuse", help="fuse one pair, one pair of volumes (NIfTI / DICOM folders), or every pair "
                                    "of a directory (batched)")
    f.add_argument("mri", nargs="?", help="MRI image (PNG/JPEG/TIFF, 8/16-bit), or volume (.nii/.nii.gz or a "
                                          "DICOM series folder)")
    f.add_argument("other", nargs="?", help="CT, PET or SPECT image of the same size, or volume (any grid, "
                                            "placed in mm)")
    f.add_argument("-o", "--output", help="output PNG (single pair); volumes: .nii.gz or a folder (DICOM)")
    f.add_argument("--modality", choices=list(MODALITIES), help="default: pet if colour, else ct")
    f.add_argument("--pairs", help="directory of TASK/ID_mri.png + TASK/ID_ct|pet|spect.png pairs")
    f.add_argument("--out", help="output directory for --pairs (OUT/TASK/ID.png)")
    f.add_argument("--batch-size", type=int, default=8, help="pairs (volumes: slices) per pipeline call")
    f.add_argument("--resize", action="store_true", help="resize the functional image to the MRI's size")
    f.add_argument("--bit-depth", type=int, choices=[8, 16], default=8, help="output PNG bit depth (16: gray only)")
    add_volume_args(f)
    _add_model_args(f)
    f.set_defaults(func=_fuse)

    i = sub.add_parser("info", help="device, dtype, configuration, weights and checksum")
    _add_model_args(i)
    i.set_defaults(func=_info)

    e = sub.add_parser("eval", help="score fusion methods with the standard metrics; CSV/Markdown/contact sheet")
    e.add_argument("--pairs", required=True, help="pairs directory (harvard layout or NAME_mri/NAME_ct|pet|spect)")
    e.add_argument("--method", default="model", help="comma list of: model, average, max, laplacian, dwt")
    e.add_argument("--fused", help="score already-fused images laid out as `dmfnet fuse --pairs` writes them")
    e.add_argument("--compare", action="append", metavar="NAME=DIR",
                   help="also score another method's fused images (TASK/ID.png), shown as NAME; repeatable")
    e.add_argument("--out", default="reports/eval", help="report directory")
    e.add_argument("--split", choices=["all", "train", "val"], default="all", help="restrict to a split's cases")
    e.add_argument("--split-file", default="configs/harvard_split.json", help="split file for --split")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--workers", type=int, default=None, help="scoring processes (default: one per core)")
    e.add_argument("--json", action="store_true", help="print the per-task summary as one JSON object")
    _add_model_args(e)
    e.set_defaults(func=_eval)

    x = sub.add_parser("export", help="export a model as one ONNX graph (dynamic size), optionally for Triton")
    x.add_argument("--weights", default=None, help="full (default), fast, a weights file or random:CONFIG")
    x.add_argument("--format", choices=["onnx"], default="onnx")
    x.add_argument("-o", "--output", required=True, help="output .onnx file")
    x.add_argument("--triton", help="also write an NVIDIA Triton model repository into this folder")
    x.set_defaults(func=_export)
