"""Export a trained network: TorchScript and ONNX (fp32) with a parity check against torch eager, fp16
and int8 (onnxruntime static QDQ quantization) ONNX variants, and a TensorRT engine when TensorRT is
installed. Parity inputs are real slices/blocks of the dataset (plus a random one)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from numpy.typing import NDArray

from trainer.plan import Plan
from trainer.prepare import Prepared

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 17


@dataclass
class ParityResult:
    name: str
    max_abs_diff: float
    argmax_agreement: float  # fraction of voxels with the same argmax as torch eager


def example_inputs(plan: Plan, cases: list[Prepared], n: int = 4, seed: int = 0) -> list[NDArray[np.float32]]:
    """Real patches from prepared cases (centred on the foreground when there is one) plus noise."""
    rng = np.random.default_rng(seed)
    out: list[NDArray[np.float32]] = []
    for case in cases[:n]:
        img = case.image
        if plan.dim == 2:
            assert plan.slice_axis is not None
            k = img.shape[plan.slice_axis + 1] // 2
            sl = np.take(img, k, axis=plan.slice_axis + 1)
        else:
            sl = img
        # pad to a multiple of the total stride so every backend sees a valid size
        total = [int(np.prod([s[a] for s in plan.strides])) for a in range(plan.dim)]
        pads = [(0, 0)] + [(0, (-sl.shape[1 + a]) % total[a]) for a in range(plan.dim)]
        out.append(np.pad(sl, pads)[None].astype(np.float32))
    out.append(rng.standard_normal((2, len(plan.channels), *plan.patch_size)).astype(np.float32))
    return out


def export_torchscript(model: torch.nn.Module, example: NDArray[np.float32], path: Path) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model.eval(), torch.from_numpy(example), check_trace=False)
    traced.save(str(path))


def export_onnx(model: torch.nn.Module, plan: Plan, path: Path) -> None:
    example = torch.zeros((1, len(plan.channels), *plan.patch_size))
    axes = {0: "batch", **{2 + a: f"s{a}" for a in range(plan.dim)}}
    tmp = path.with_name(f".{path.name}.tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (example,),
            str(tmp),
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
        )
    onnx.checker.check_model(str(tmp))
    tmp.replace(path)


def onnx_session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_predictor(session: ort.InferenceSession) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        y = session.run([OUTPUT_NAME], {INPUT_NAME: x.detach().cpu().numpy().astype(np.float32)})[0]
        return torch.from_numpy(np.asarray(y, dtype=np.float32))

    return run


def parity(
    name: str, reference: list[NDArray[np.float32]], outputs: list[NDArray[np.float32]]
) -> ParityResult:
    diffs, agree, total = [], 0, 0
    for r, o in zip(reference, outputs, strict=True):
        diffs.append(float(np.abs(r - o).max()))
        agree += int((r.argmax(1) == o.argmax(1)).sum())
        total += r.argmax(1).size
    return ParityResult(name, max(diffs), agree / total)


def torch_outputs(model: torch.nn.Module, inputs: list[NDArray[np.float32]]) -> list[NDArray[np.float32]]:
    with torch.no_grad():
        return [model(torch.from_numpy(x)).numpy() for x in inputs]


def to_fp16(src: Path, dst: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=["InstanceNormalization"])
    onnx.save(half, str(dst))


class _Calibration:
    def __init__(self, inputs: list[NDArray[np.float32]]) -> None:
        self._it: Iterator[NDArray[np.float32]] = iter(inputs)

    def get_next(self) -> dict[str, NDArray[np.float32]] | None:
        x = next(self._it, None)
        return None if x is None else {INPUT_NAME: x}


def to_int8(src: Path, dst: Path, calibration: list[NDArray[np.float32]]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.inner = _Calibration(calibration)

        def get_next(self) -> dict[str, NDArray[np.float32]] | None:
            return self.inner.get_next()

    pre = dst.with_name(f".{dst.stem}.pre.onnx")
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        source = pre
    except Exception:
        source = src
    quantize_static(
        str(source),
        str(dst),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["Conv", "ConvTranspose"],
    )
    pre.unlink(missing_ok=True)


def tensorrt_engine(onnx_path: Path, dst: Path, plan: Plan) -> str:
    """Build a TensorRT engine (fp16) when TensorRT is importable; returns what happened."""
    try:
        import tensorrt as trt
    except ImportError:
        return (
            "TensorRT is not installed (import tensorrt failed): no engine built; "
            "install TensorRT on a GPU host"
        )
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        return "TensorRT could not parse the ONNX: " + "; ".join(
            str(parser.get_error(i)) for i in range(parser.num_errors)
        )
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    c = len(plan.channels)
    p = list(plan.patch_size)
    profile.set_shape(INPUT_NAME, (1, c, *p), (8, c, *p), (32, c, *[2 * x for x in p]))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        return "TensorRT engine build failed"
    dst.write_bytes(bytes(engine))
    return f"TensorRT engine written to {dst}"


def export_all(
    model: torch.nn.Module,
    plan: Plan,
    cases: list[Prepared],
    out: Path,
    calibration: list[NDArray[np.float32]],
    variants: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    inputs = example_inputs(plan, cases)
    ref = torch_outputs(model, inputs)
    report: dict[str, Any] = {"files": {}, "parity": {}}
    ts_path = out / "model.torchscript.pt"
    export_torchscript(model, inputs[0], ts_path)
    ts = torch.jit.load(str(ts_path))
    report["parity"]["torchscript"] = parity("torchscript", ref, torch_outputs(ts, inputs)).__dict__
    onnx_path = out / "model.onnx"
    export_onnx(model, plan, onnx_path)
    sess = onnx_session(onnx_path)
    report["parity"]["onnx"] = parity(
        "onnx", ref, [sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0] for x in inputs]
    ).__dict__
    report["files"].update(torchscript=str(ts_path), onnx=str(onnx_path))
    if variants:
        fp16 = out / "model.fp16.onnx"
        to_fp16(onnx_path, fp16)
        s16 = onnx_session(fp16)
        report["parity"]["onnx_fp16"] = parity(
            "onnx_fp16", ref, [s16.run([OUTPUT_NAME], {INPUT_NAME: x})[0] for x in inputs]
        ).__dict__
        int8 = out / "model.int8.onnx"
        to_int8(onnx_path, int8, calibration)
        s8 = onnx_session(int8)
        report["parity"]["onnx_int8"] = parity(
            "onnx_int8", ref, [s8.run([OUTPUT_NAME], {INPUT_NAME: x})[0] for x in inputs]
        ).__dict__
        report["files"].update(onnx_fp16=str(fp16), onnx_int8=str(int8))
    report["tensorrt"] = tensorrt_engine(onnx_path, out / "model.plan", plan)
    for k, v in report["parity"].items():
        log(
            f"parity {k}: max |logit diff| {v['max_abs_diff']:.2e}, "
            f"argmax agreement {v['argmax_agreement']:.5f}"
        )
    log(report["tensorrt"])
    return report
