#!/usr/bin/env python3
"""Inference benchmark: our sliding-window engine against MONAI's ``sliding_window_inference``.

    python bench/inference.py [--device cpu|cuda] [--volume 128,192,192] [--patch 64,128,128]
                              [--overlap 0.5] [--batch 2] [--repeats 3] [--threads N] [--quick]
                              [--variants a,b,...] [--budget-s S] [--out bench/out]

One fixed model (an nnU-Net-style 3D U-Net, ~5.6 M parameters, seeded random weights; plain torch, so
that no MONAI is needed to build it), exported once to ONNX in a temporary folder, and one CT-like
volume. Every variant computes softmax probabilities of the whole volume with the same patch, overlap,
batch and Gaussian blending (sigma 0.125 * patch), starting from the volume in host memory and ending
with the probabilities in host memory.

- baseline: MONAI ``sliding_window_inference`` with the torch module, eager, under ``no_grad``; where
  MONAI is not installed, a plain torch sliding-window loop doing the same work (windows gathered with
  ``torch.cat``, weighted, added into output and count tensors on the device).
- ours: ``SlidingWindowInferer`` with the torch backend and (CPU) the onnxruntime backend (its default
  ``sessions="auto"``: the 2 windows of a batch run in 2 concurrent sessions of half the threads each);
  on CUDA also autocast fp16/bf16, ``torch.compile`` and CUDA-graph variants, onnxruntime's CUDA EP and
  TensorRT where installed. ``--all-cpu`` adds channels-last, bf16, ``torch.compile`` and onnxruntime
  with one session of all threads.

Runs are interleaved (one of each variant per round) so that a machine shared with other work slows all
variants alike; each figure is the best of ``--repeats``. Each variant's result is compared with the
fp32 baseline's (max absolute difference of probabilities). Prints a table, PASS/FAIL for onnxruntime
(CPU) against the 1.3x target, and writes ``<out>/inference[-cuda].json`` after every round.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipelines.inference import (  # noqa: E402
    BackendUnavailable,
    InferenceError,
    OnnxRuntimeBackend,
    SlidingWindowConfig,
    SlidingWindowInferer,
    TorchBackend,
    export_onnx,
    importance_map,
    physical_cores,
    window_starts,
)

TARGET_ORT = 1.3  # ours with onnxruntime >= 1.3x faster than the MONAI baseline on CPU

# The model


class ConvBlock(torch.nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__(
            torch.nn.Conv3d(cin, cout, 3, stride=stride, padding=1),
            torch.nn.InstanceNorm3d(cout, affine=True),
            torch.nn.LeakyReLU(0.01, inplace=True),
            torch.nn.Conv3d(cout, cout, 3, padding=1),
            torch.nn.InstanceNorm3d(cout, affine=True),
            torch.nn.LeakyReLU(0.01, inplace=True),
        )


class BenchUNet(torch.nn.Module):
    """nnU-Net-style 3D U-Net (as MONAI's DynUNet): two conv-instnorm-lrelu per stage, strided-conv
    downsampling, transposed-conv upsampling, skip concatenation, 1x1x1 head."""

    def __init__(self, in_channels: int, out_channels: int, filters: Sequence[int]) -> None:
        super().__init__()
        self.down = torch.nn.ModuleList(
            ConvBlock(cin, cout, 1 if i == 0 else 2)
            for i, (cin, cout) in enumerate(zip([in_channels, *filters[:-1]], filters, strict=True))
        )
        self.up = torch.nn.ModuleList(
            torch.nn.ConvTranspose3d(filters[i + 1], filters[i], 2, stride=2) for i in range(len(filters) - 1)
        )
        self.dec = torch.nn.ModuleList(
            ConvBlock(2 * filters[i], filters[i], 1) for i in range(len(filters) - 1)
        )
        self.head = torch.nn.Conv3d(filters[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for i in reversed(range(len(self.up))):
            x = self.dec[i](torch.cat([self.up[i](x), skips[i]], dim=1))
        out: torch.Tensor = self.head(x)
        return out


def build_model(quick: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    filters = (8, 16, 32, 64) if quick else (16, 32, 64, 128, 256)
    return BenchUNet(1, 3, filters).eval()


def ct_like_volume(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """Air around an elliptic body of soft tissue with a liver-like and a few lesion-like blobs, noise,
    then windowed to [-200, 300] HU and scaled to about [-1, 1] (as a CT pipeline normalises)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in shape), indexing="ij")
    hu = np.full(shape, -1000.0, np.float32)
    body = (y / 0.8) ** 2 + (x / 0.95) ** 2 < 1
    hu[body] = 40.0
    liver = ((z - 0.1) / 0.6) ** 2 + ((y + 0.1) / 0.4) ** 2 + ((x + 0.35) / 0.45) ** 2 < 1
    hu[liver] = 60.0
    for _ in range(4):
        c = rng.uniform(-0.3, 0.3, 3)
        lesion = ((z - c[0]) / 0.08) ** 2 + ((y - c[1] - 0.1) / 0.08) ** 2 + (
            (x - c[2] + 0.35) / 0.08
        ) ** 2 < 1
        hu[lesion & liver] = 20.0
    hu += rng.normal(0.0, 15.0, shape).astype(np.float32)
    return ((np.clip(hu, -200, 300) - 50) / 250).astype(np.float32)[None]


# Baselines


def monai_available() -> bool:
    try:
        import monai.inferers  # noqa: F401
    except ImportError:
        return False
    return True


def plain_torch_sliding_window(
    inputs: torch.Tensor,
    patch: Sequence[int],
    batch: int,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    overlap: float,
) -> torch.Tensor:
    """What MONAI's loop does, without MONAI: pad, gather windows with torch.cat, weight, accumulate."""
    size = list(inputs.shape[2:])
    pad_lo = [max(p - s, 0) // 2 for s, p in zip(size, patch, strict=True)]
    pad_hi = [max(p - s, 0) - lo for s, p, lo in zip(size, patch, pad_lo, strict=True)]
    if any(pad_lo) or any(pad_hi):
        pads = [v for lo, hi in zip(reversed(pad_lo), reversed(pad_hi), strict=True) for v in (lo, hi)]
        inputs = F.pad(inputs, pads)
    grid = list(inputs.shape[2:])
    starts = window_starts(grid, patch, (overlap,) * len(patch))
    weights = importance_map(patch, "gaussian", 0.125, inputs.device)[None, None]
    out: torch.Tensor | None = None
    count = torch.zeros([1, 1, *grid], device=inputs.device)
    for first in range(0, len(starts), batch):
        chunk = starts[first : first + batch]
        slices = [tuple(slice(s, s + p) for s, p in zip(st, patch, strict=True)) for st in chunk]
        x = torch.cat([inputs[(slice(None), slice(None), *sl)] for sl in slices])
        y = predictor(x).float() * weights
        if out is None:
            out = torch.zeros([1, y.shape[1], *grid], device=inputs.device)
        for j, sl in enumerate(slices):
            out[(slice(None), slice(None), *sl)] += y[j : j + 1]
            count[(slice(None), slice(None), *sl)] += weights
    assert out is not None
    out /= count
    crop = tuple(slice(lo, lo + s) for lo, s in zip(pad_lo, size, strict=True))
    return out[(slice(None), slice(None), *crop)]


# Variants


Runner = Callable[[np.ndarray], np.ndarray]  # (1, D, H, W) volume -> (K, D, H, W) probabilities


@dataclass
class Variant:
    name: str
    description: str
    precision: str
    setup: Callable[[], Runner]
    run: Runner | None = None
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # CPU seconds of this process, all threads
    skipped: str | None = None  # why it cannot run here
    default_off: str | None = None  # why it does not run unless named in --variants
    max_abs_diff: float | None = None
    setup_s: float = 0.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_variants(
    args: argparse.Namespace,
    model: torch.nn.Module,
    vol: np.ndarray,
    onnx_path: Path | None,
    onnx_error: str | None,
    device: torch.device,
) -> list[Variant]:
    patch, batch, overlap = tuple(args.patch), args.batch, args.overlap
    cfg = SlidingWindowConfig(patch_size=patch, overlap=overlap, batch_size=batch, activation="softmax")
    have_monai = monai_available() and not args.no_monai
    gpu_set = device.type == "cuda" or args.set == "gpu"
    baseline_name = "monai" if have_monai else "plain-torch-loop"
    variants: list[Variant] = []

    def baseline(amp: torch.dtype | None) -> Callable[[], Runner]:
        def setup() -> Runner:
            net = copy.deepcopy(model).to(device)
            if have_monai:
                from monai.inferers.utils import sliding_window_inference as swi

                def infer(x: torch.Tensor) -> torch.Tensor:
                    out = swi(x, patch, batch, net, overlap=overlap, mode="gaussian", sigma_scale=0.125)
                    assert isinstance(out, torch.Tensor)
                    return out
            else:

                def infer(x: torch.Tensor) -> torch.Tensor:
                    return plain_torch_sliding_window(x, patch, batch, net, overlap)

            def run(volume: np.ndarray) -> np.ndarray:
                autocast = torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)
                with torch.no_grad(), autocast:
                    logits = infer(torch.from_numpy(volume)[None].to(device))
                    probs = torch.softmax(logits.float(), dim=1)[0]
                return probs.cpu().numpy()

            return run

        return setup

    def ours(**options: Any) -> Callable[[], Runner]:
        def setup() -> Runner:
            return SlidingWindowInferer(TorchBackend(copy.deepcopy(model), device, **options), cfg)

        return setup

    def ours_ort(providers: Sequence[str], sessions: int | Literal["auto"] = "auto") -> Callable[[], Runner]:
        def setup() -> Runner:
            assert onnx_path is not None
            backend = OnnxRuntimeBackend(
                onnx_path, providers=list(providers), intra_op_threads=args.threads, sessions=sessions
            )
            return SlidingWindowInferer(backend, cfg)

        return setup

    def ours_trt(fp16: bool) -> Callable[[], Runner]:
        def setup() -> Runner:
            from pipelines.inference import TensorRTBackend

            assert onnx_path is not None
            backend = TensorRTBackend(
                onnx_path, onnx_path.parent / "trt-cache", device=device, fp16=fp16, max_batch=batch
            )
            return SlidingWindowInferer(backend, cfg)

        return setup

    desc_base = (
        "MONAI sliding_window_inference" if have_monai else "plain torch sliding-window loop (no MONAI)"
    )
    variants.append(Variant(f"{baseline_name}", f"{desc_base}, torch eager", "fp32", baseline(None)))
    if gpu_set:
        variants.append(
            Variant(f"{baseline_name}-fp16", f"{desc_base}, autocast fp16", "fp16", baseline(torch.float16))
        )
        if device.type != "cuda":
            variants[-1].skipped = "autocast fp16 needs CUDA"
    variants.append(Variant("ours-torch", "ours, torch eager", "fp32", ours()))
    if not gpu_set:
        variants.append(
            Variant("ours-torch-cl", "ours, torch eager channels-last", "fp32", ours(channels_last=True))
        )
        variants.append(Variant("ours-torch-bf16", "ours, torch autocast bf16", "bf16", ours(amp="bf16")))
        variants.append(Variant("ours-torch-compile", "ours, torch.compile", "fp32", ours(compile=True)))
        cpu_ep = ["CPUExecutionProvider"]
        variants += [
            Variant(
                "ours-onnxruntime-1session",
                "ours, onnxruntime CPU EP, one session",
                "fp32",
                ours_ort(cpu_ep, 1),
            ),
            Variant("ours-onnxruntime", "ours, onnxruntime CPU EP (sessions auto)", "fp32", ours_ort(cpu_ep)),
        ]
    else:
        bf16_off = None if device.type == "cuda" else "bf16 convolutions on CPUs are slow; --variants runs it"
        variants += [
            Variant("ours-torch-fp16", "ours, torch autocast fp16", "fp16", ours(amp="fp16")),
            Variant(
                "ours-torch-bf16", "ours, torch autocast bf16", "bf16", ours(amp="bf16"), default_off=bf16_off
            ),
            Variant(
                "ours-torch-graphs-fp16",
                "ours, CUDA graphs, fp16",
                "fp16",
                ours(amp="fp16", cuda_graphs=True),
            ),
        ]
        import onnxruntime as ort  # type: ignore[import-untyped]

        cuda_ep = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        variants.append(
            Variant("ours-onnxruntime-cuda", "ours, onnxruntime CUDA EP", "fp32", ours_ort(cuda_ep))
        )
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            variants[-1].skipped = f"onnxruntime {ort.__version__} here has no CUDA EP (CPU build)"
        variants.append(Variant("ours-tensorrt-fp16", "ours, TensorRT engine, fp16", "fp16", ours_trt(True)))
        # Last: the slowest to set up (compilation), so a spent time budget costs the fewest figures.
        variants += [
            Variant(
                "ours-torch-compile-fp16", "ours, torch.compile, fp16", "fp16", ours(amp="fp16", compile=True)
            ),
            Variant(
                "ours-torch-compile-graphs-fp16",
                "ours, torch.compile reduce-overhead, fp16",
                "fp16",
                ours(amp="fp16", compile=True, cuda_graphs=True),
            ),
        ]
    for v in variants:
        if onnx_path is None and ("onnxruntime" in v.name or "tensorrt" in v.name) and v.skipped is None:
            v.skipped = f"no ONNX file: {onnx_error}"
    if args.variants:
        wanted = set(args.variants.split(","))
        unknown = wanted - {v.name for v in variants}
        if unknown:
            raise SystemExit(
                f"unknown variants {sorted(unknown)}; known: {', '.join(v.name for v in variants)}"
            )
        for v in variants:
            if v.name not in wanted and v.name != variants[0].name:
                v.skipped = v.skipped or "not selected (--variants)"
    else:
        for v in variants:
            extra = ("ours-torch-cl", "ours-torch-bf16", "ours-torch-compile", "ours-onnxruntime-1session")
            if v.name in extra and not gpu_set:
                v.default_off = None if args.all_cpu else "extra CPU variant (--all-cpu runs it)"
            v.skipped = v.skipped or v.default_off
    return variants


# Driver


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    def ints(text: str) -> list[int]:
        return [int(v) for v in text.split(",")]

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--volume", type=ints, default=None, help="D,H,W (default 128,192,192; quick 48,96,96)")
    p.add_argument("--patch", type=ints, default=None, help="D,H,W (default 64,128,128; quick 32,64,64)")
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default 3; quick 1)")
    p.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads (physical cores)")
    p.add_argument("--quick", action="store_true", help="small model and volume: a check that it all runs")
    p.add_argument("--variants", default="", help="comma-separated names to run (the baseline always runs)")
    p.add_argument("--all-cpu", action="store_true", help="also time channels-last, bf16 and compile on CPU")
    p.add_argument(
        "--set", choices=("auto", "cpu", "gpu"), default="auto", help="variant set (auto: by device)"
    )
    p.add_argument(
        "--schedule",
        choices=("auto", "interleaved", "sequential"),
        default="auto",
        help="interleaved rounds (auto on CPU: shared machines) or one variant after another (auto on CUDA)",
    )
    p.add_argument(
        "--no-monai", action="store_true", help="use the plain torch baseline even if MONAI is here"
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=0.0,
        help="set up no variant after S seconds; interleaved rounds after the first stop 60 s later",
    )
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    args = p.parse_args(argv)
    args.volume = args.volume or ([48, 96, 96] if args.quick else [128, 192, 192])
    args.patch = args.patch or ([32, 64, 64] if args.quick else [64, 128, 128])
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.threads = args.threads or physical_cores()
    if args.schedule == "auto":
        args.schedule = "interleaved" if args.device == "cpu" else "sequential"
    return args


def export_model(
    model: torch.nn.Module, patch: Sequence[int], folder: Path
) -> tuple[Path | None, str | None]:
    path = folder / "bench_unet.onnx"
    errors = []
    exporters: tuple[Literal["dynamo", "torchscript"], ...] = ("dynamo", "torchscript")
    for exporter in exporters:
        try:
            export_onnx(model.cpu(), (1, 1, *patch), path, exporter=exporter)
            return path, None
        except Exception as exc:  # an exporter missing its dependencies (onnxscript) or failing
            errors.append(f"{exporter}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return None, "; ".join(errors)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print(f"CUDA is not available (torch {torch.__version__}); use --device cpu", file=sys.stderr)
            return 2
        torch.backends.cudnn.benchmark = True
        device = torch.device("cuda", device.index or 0)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" chatter
    model = build_model(args.quick)
    params = sum(p.numel() for p in model.parameters())
    vol = ct_like_volume(args.volume)
    cfg = SlidingWindowConfig(patch_size=tuple(args.patch), overlap=args.overlap, batch_size=args.batch)
    n_windows = len(
        window_starts(
            [max(v, p) for v, p in zip(args.volume, args.patch, strict=True)], cfg.patch_size, cfg.overlaps
        )
    )
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print(
        f"model BenchUNet {params / 1e6:.2f} M params; volume 1x{'x'.join(map(str, args.volume))}; "
        f"patch {'x'.join(map(str, args.patch))}; overlap {args.overlap}; batch {args.batch}; "
        f"{n_windows} windows; device {gpu or 'cpu'}; threads {args.threads}; torch {torch.__version__}; "
        f"best of {args.repeats}"
    )
    if not monai_available():
        print("MONAI is not installed: the baseline is a plain torch sliding-window loop doing MONAI's work")

    with tempfile.TemporaryDirectory(prefix="segnode-bench-") as tmp:
        t0 = time.perf_counter()
        onnx_path, onnx_error = export_model(model, args.patch, Path(tmp))
        print(
            f"ONNX export + parity check: {time.perf_counter() - t0:.1f} s"
            + (f" (FAILED: {onnx_error})" if onnx_error else "")
        )
        variants = make_variants(args, model, vol, onnx_path, onnx_error, device)
        report = {
            "device": gpu or "cpu",
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
            "model_params": params,
            "volume": args.volume,
            "patch": args.patch,
            "overlap": args.overlap,
            "batch": args.batch,
            "windows": n_windows,
            "repeats": args.repeats,
        }
        out_file = args.out / ("inference.json" if device.type == "cpu" else "inference-cuda.json")
        if args.quick:
            out_file = out_file.with_name(out_file.stem + "-quick.json")

        def over_budget(grace: float = 0.0) -> bool:
            return bool(args.budget_s > 0 and time.perf_counter() - started > args.budget_s + grace)

        # Warm-up volume: two windows deep, so a full batch runs (compilation, graph capture, first
        # allocations). On CUDA the whole volume follows, as GPU runs are cheap.
        step = max(int(args.patch[0] * (1 - args.overlap)), 1)
        warm = np.ascontiguousarray(vol[:, : args.patch[0] + step, : args.patch[1], : args.patch[2]])
        reference: list[np.ndarray] = []

        def prepare(v: Variant) -> bool:
            if v.skipped:
                return False
            if over_budget():
                v.skipped = "time budget spent before it could start"
                return False
            t0 = time.perf_counter()
            try:
                run: Runner = v.setup()
                run(warm)
                if device.type == "cuda":
                    run(vol)
                sync(device)
            except (
                BackendUnavailable,
                InferenceError,
                NotImplementedError,
                RuntimeError,
                ImportError,
            ) as exc:
                v.skipped = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                return False
            v.run = run
            v.setup_s = time.perf_counter() - t0
            print(f"  ready {v.name:32s} set-up and warm-up {v.setup_s:6.1f} s", flush=True)
            return True

        def measure(v: Variant) -> None:
            assert v.run is not None
            sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            result = v.run(vol)
            sync(device)
            v.times.append(time.perf_counter() - t0)
            v.cpu_times.append(time.process_time() - c0)
            if not reference and v is variants[0]:
                reference.append(result)
            if v.max_abs_diff is None and reference:
                v.max_abs_diff = float(np.abs(result - reference[0]).max())

        try:
            if args.schedule == "interleaved":  # all set up, then rounds of one run each
                ready = [v for v in variants if prepare(v)]
                for r in range(args.repeats):
                    if r > 0 and over_budget(grace=60.0):
                        print("  time budget spent: no more rounds", flush=True)
                        break
                    for v in ready:
                        measure(v)
                    write_report(out_file, report, variants)
                    print(
                        f"  round {r + 1}/{args.repeats} done at {time.perf_counter() - started:.0f} s",
                        flush=True,
                    )
            else:  # each variant set up and timed in turn: a long compilation cannot cost earlier figures
                for v in variants:
                    if prepare(v):
                        for _ in range(args.repeats):
                            measure(v)
                        v.run = None  # free its buffers and graphs before the next variant
                        write_report(out_file, report, variants)
        except KeyboardInterrupt:
            print("interrupted: reporting what was measured", file=sys.stderr)
        passed = print_table(variants, device)
        write_report(out_file, report, variants, passed)
        print(f"wrote {out_file} ({time.perf_counter() - started:.0f} s in all)")
    return 0 if passed is not False else 1


def best(v: Variant) -> float | None:
    return min(v.times) if v.times else None


def print_table(variants: list[Variant], device: torch.device) -> bool | None:
    base = best(variants[0])
    print()
    print(
        f"{'variant':34s} {'precision':9s} {'best s':>8s} {'median s':>9s} {'speedup':>8s} "
        f"{'cpu s':>7s} {'max|dp|':>9s}"
    )
    for v in variants:
        b = best(v)
        if b is None:
            print(f"{v.name:34s} {v.precision:9s} skipped: {v.skipped or 'no timing'}")
            continue
        ratio = f"{base / b:7.2f}x" if base else "      -"
        diff = f"{v.max_abs_diff:9.1e}" if v.max_abs_diff is not None else "        -"
        cpu, median = min(v.cpu_times), float(np.median(v.times))
        print(f"{v.name:34s} {v.precision:9s} {b:8.2f} {median:9.2f} {ratio} {cpu:7.1f} {diff}")
    print("(best s: wall clock, best of the runs; cpu s: least CPU time of this process, all threads)")
    if device.type != "cpu":
        return None
    ort = next((v for v in variants if v.name == "ours-onnxruntime"), None)
    if ort is None or best(ort) is None or base is None:
        print("\nonnxruntime target: not measured")
        return None
    speedup = base / (best(ort) or math.inf)
    passed = bool(speedup >= TARGET_ORT)
    verdict = "PASS" if passed else "FAIL"
    print(f"\nonnxruntime vs {variants[0].name}: {speedup:.2f}x (target >= {TARGET_ORT}x): {verdict}")
    return passed


def write_report(
    path: Path, report: dict[str, Any], variants: list[Variant], passed: bool | None = None
) -> None:
    base = best(variants[0])
    rows = []
    for v in variants:
        b = best(v)
        rows.append(
            {
                "variant": v.name,
                "description": v.description,
                "precision": v.precision,
                "seconds": v.times,
                "cpu_seconds": v.cpu_times,
                "best_s": b,
                "speedup_vs_baseline": (base / b) if (base and b) else None,
                "max_abs_diff_vs_baseline": v.max_abs_diff,
                "setup_s": v.setup_s,
                "skipped": v.skipped,
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dict(report, variants=rows, target_onnxruntime=TARGET_ORT, passed=passed)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
