"""The inference engine: sliding-window blending, single-patch mode, TTA, backends and their parity.

Tolerances (absolute, on the values compared):
- our blending against MONAI's ``sliding_window_inference`` (same patch, overlap, batch, Gaussian mode):
  1e-6 (same float32 arithmetic in the same order; in practice identical);
- onnxruntime against torch eager, softmax probabilities: 1e-4;
- 'valid' networks against the network run once on the whole padded volume: 1e-5;
- TTA of a flip-equivariant network against no TTA: 1e-5;
- bf16 autocast (CPU) against fp32, softmax probabilities: 0.05.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers.utils import sliding_window_inference as monai_swi

from pipelines.inference import (
    BackendUnavailable,
    ExportParityError,
    InferenceError,
    InferenceOptions,
    OnnxRuntimeBackend,
    OutputGeometry,
    SlidingWindowConfig,
    SlidingWindowInferer,
    TensorRTBackend,
    TorchBackend,
    backend_status,
    create_backend,
    export_onnx,
    importance_map,
    single_patch_inference,
    tta_flips,
    window_starts,
)
from pipelines.inference.tensorrt_backend import engine_cache_key

PATCH = (8, 16, 16)
MONAI_TOL = 1e-6
ORT_TOL = 1e-4
VALID_TOL = 1e-5
TTA_TOL = 1e-5
BF16_TOL = 0.05


def same_net(seed: int = 0, out_channels: int = 3) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1),
        torch.nn.InstanceNorm3d(4, affine=True),
        torch.nn.LeakyReLU(0.01),
        torch.nn.Conv3d(4, out_channels, 3, padding=1),
    ).eval()


def valid_net(seed: int = 1) -> torch.nn.Module:
    """Three unpadded 3x3x3 convolutions: the output is 6 voxels shorter per axis, offset 3."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3),
        torch.nn.ReLU(),
        torch.nn.Conv3d(4, 4, 3),
        torch.nn.ReLU(),
        torch.nn.Conv3d(4, 2, 3),
    ).eval()


class ShiftedValidNet(torch.nn.Module):
    """An unpadded conv whose output also drops its first voxel: crop 2 before, 1 after, per axis."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.conv = torch.nn.Conv3d(1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.conv(x)
        return y[:, :, 1:, 1:, 1:]


def symmetric_net() -> torch.nn.Sequential:
    """Convolutions whose kernels are mirror-symmetric on every axis: the network commutes with flips."""
    net = same_net(seed=3)
    with torch.no_grad():
        for layer in net:
            if isinstance(layer, torch.nn.Conv3d):
                w = layer.weight
                mirrored = [torch.flip(w, [a + 2 for a in axes]) for axes in tta_flips((0, 1, 2))]
                w.copy_(torch.stack(mirrored).mean(0))
    return net


def volume(*spatial: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, *spatial)).astype(np.float32)


def monai(vol: np.ndarray, net: torch.nn.Module, cfg: SlidingWindowConfig, **kwargs: Any) -> np.ndarray:
    with torch.no_grad():
        out = monai_swi(
            torch.from_numpy(vol)[None],
            cfg.patch_size,
            cfg.batch_size,
            kwargs.pop("predictor", net),
            overlap=cfg.overlap,
            mode="gaussian",
            sigma_scale=cfg.sigma_scale,
            **kwargs,
        )
    assert isinstance(out, torch.Tensor)
    return out[0].numpy()


@pytest.fixture(scope="module")
def same_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "same.onnx"
    result = export_onnx(same_net(), (1, 1, *PATCH), path, exporter="dynamo")
    assert result.path == path and path.is_file() and result.max_abs_diff < ORT_TOL
    return path


@pytest.fixture(scope="module")
def valid_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "valid.onnx"
    export_onnx(valid_net(), (1, 1, 12, 14, 12), path, exporter="torchscript")
    return path


# Tiling and weights: the same as MONAI's


@pytest.mark.parametrize("tile", [(8, 16, 16), (5, 7, 9), (64, 128, 128)])
def test_importance_map_equals_monai(tile: tuple[int, int, int]) -> None:
    for mode in ("gaussian", "constant"):
        ours = importance_map(tile, mode, 0.125)
        ref = compute_importance_map(tile, mode=mode, sigma_scale=0.125, device="cpu")
        assert torch.equal(ours, ref)
    assert importance_map(tile) is importance_map(tile)  # computed once, cached


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.7, 0.75, 0.9])
def test_window_starts_equal_monai(overlap: float) -> None:
    for size, tile in [
        ((13, 21, 18), PATCH),
        ((128, 192, 192), (64, 128, 128)),
        ((8, 16, 16), PATCH),
        ((9, 40, 17), (9, 7, 5)),
    ]:
        step = tuple(t if s == t else max(int(t * (1 - overlap)), 1) for s, t in zip(size, tile, strict=True))
        ref = [tuple(s.start for s in window) for window in dense_patch_slices(size, tile, step)]
        assert window_starts(size, tile, (overlap,) * 3) == ref


# Blending: the same numbers as MONAI's sliding_window_inference


@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.75])
@pytest.mark.parametrize("batch", [1, 3])
def test_torch_engine_equals_monai(overlap: float, batch: int) -> None:
    net = same_net()
    cfg = SlidingWindowConfig(patch_size=PATCH, overlap=overlap, batch_size=batch)
    vol = volume(13, 21, 18)
    ours = SlidingWindowInferer(TorchBackend(net), cfg)(vol)
    assert ours.shape == (3, 13, 21, 18) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, monai(vol, net, cfg), rtol=0, atol=MONAI_TOL)


@pytest.mark.parametrize("spatial", [(5, 7, 18), (3, 11, 9), (1, 1, 1), (8, 16, 16), (9, 17, 15)])
def test_odd_and_small_volumes_equal_monai(spatial: tuple[int, int, int]) -> None:
    net = same_net()
    cfg = SlidingWindowConfig(patch_size=PATCH, overlap=0.5, batch_size=2)
    vol = volume(*spatial, seed=4)
    ours = SlidingWindowInferer(TorchBackend(net), cfg)(vol)
    assert ours.shape == (3, *spatial)
    np.testing.assert_allclose(ours, monai(vol, net, cfg), rtol=0, atol=MONAI_TOL)


def test_replicate_padding_and_per_axis_overlap_equal_monai() -> None:
    net = same_net()
    cfg = SlidingWindowConfig(patch_size=PATCH, overlap=(0.0, 0.5, 0.75), batch_size=4, pad_mode="replicate")
    vol = volume(6, 30, 12, seed=5)
    ref = monai(vol, net, cfg, padding_mode="replicate")
    np.testing.assert_allclose(SlidingWindowInferer(TorchBackend(net), cfg)(vol), ref, rtol=0, atol=MONAI_TOL)


def test_activation_after_blend_and_per_window() -> None:
    net = same_net()
    vol = volume(13, 21, 18, seed=6)
    after = SlidingWindowConfig(patch_size=PATCH, activation="softmax")
    ours = SlidingWindowInferer(TorchBackend(net), after)(vol)
    np.testing.assert_allclose(
        ours, torch.softmax(torch.from_numpy(monai(vol, net, after)), 0).numpy(), atol=MONAI_TOL
    )
    np.testing.assert_allclose(ours.sum(axis=0), 1.0, atol=1e-5)

    per_window = SlidingWindowConfig(patch_size=PATCH, activation="softmax", activation_stage="per_window")
    ref = monai(vol, net, per_window, predictor=lambda x: torch.softmax(net(x), 1))
    np.testing.assert_allclose(SlidingWindowInferer(TorchBackend(net), per_window)(vol), ref, atol=MONAI_TOL)

    sigmoid = SlidingWindowConfig(patch_size=PATCH, activation="sigmoid", activation_stage="per_window")
    ref = monai(vol, net, sigmoid, predictor=lambda x: torch.sigmoid(net(x)))
    np.testing.assert_allclose(SlidingWindowInferer(TorchBackend(net), sigmoid)(vol), ref, atol=MONAI_TOL)


def test_two_dimensional_volumes() -> None:
    torch.manual_seed(7)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.Tanh()).eval()
    cfg = SlidingWindowConfig(patch_size=(16, 12), overlap=0.5, batch_size=3)
    vol = np.random.default_rng(7).standard_normal((2, 37, 29)).astype(np.float32)
    np.testing.assert_allclose(
        SlidingWindowInferer(TorchBackend(net), cfg)(vol), monai(vol, net, cfg), atol=MONAI_TOL
    )


# Backends: onnxruntime gives the same probabilities as torch eager


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_equals_torch_eager(same_onnx: Path, batch: int) -> None:
    cfg = SlidingWindowConfig(patch_size=PATCH, overlap=0.5, batch_size=batch, activation="softmax")
    vol = volume(13, 21, 18, seed=8)
    ort_backend = create_backend("onnxruntime", onnx_path=same_onnx, intra_op_threads=1)
    assert isinstance(ort_backend, OnnxRuntimeBackend)
    assert ort_backend.providers == ["CPUExecutionProvider"] and ort_backend.device == "cpu"
    assert ort_backend.input_shape == PATCH and ort_backend.geometry.is_same
    ours = SlidingWindowInferer(ort_backend, cfg)(vol)
    ref = SlidingWindowInferer(create_backend("torch", module=same_net()), cfg)(vol)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=ORT_TOL)


def test_onnxruntime_reuses_its_output_buffer(same_onnx: Path) -> None:
    backend = OnnxRuntimeBackend(same_onnx, intra_op_threads=1)
    batch = volume(2, *PATCH)[None].reshape(2, 1, *PATCH)
    first = backend.predict(batch).copy()
    again = backend.predict(batch)
    third = backend.predict(batch)
    assert again is third  # bound output buffer, no allocation per call
    np.testing.assert_array_equal(first, again)
    with torch.no_grad():
        np.testing.assert_allclose(first, same_net()(torch.from_numpy(batch)).numpy(), atol=ORT_TOL)


def test_onnxruntime_splits_a_batch_between_concurrent_sessions(same_onnx: Path) -> None:
    single = OnnxRuntimeBackend(same_onnx, intra_op_threads=2, sessions=1)
    split = OnnxRuntimeBackend(same_onnx, intra_op_threads=2)  # sessions="auto"
    assert [split.split_for(n) for n in (1, 2, 3, 4)] == [1, 2, 1, 2]
    assert [single.split_for(n) for n in (1, 2, 3, 4)] == [1, 1, 1, 1]
    assert OnnxRuntimeBackend(same_onnx, intra_op_threads=4, sessions=3).split_for(2) == 2
    batch = np.random.default_rng(18).standard_normal((4, 1, *PATCH)).astype(np.float32)
    expected = single.predict(batch).copy()
    for _ in range(2):  # first call learns the output shape, the second runs bound to the buffer
        got = split.predict(batch)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert split.predict(batch) is got
    cfg = SlidingWindowConfig(patch_size=PATCH, overlap=0.5, batch_size=2, activation="softmax")
    vol = volume(13, 21, 18, seed=19)
    np.testing.assert_allclose(
        SlidingWindowInferer(split, cfg)(vol), SlidingWindowInferer(single, cfg)(vol), rtol=0, atol=1e-6
    )
    with pytest.raises(InferenceError, match="sessions"):
        OnnxRuntimeBackend(same_onnx, sessions=0)


def test_export_refuses_an_onnx_file_that_differs(tmp_path: Path) -> None:
    class ExportsDifferently(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + 1.0 if torch.onnx.is_in_onnx_export() else x

    target = tmp_path / "bad.onnx"
    with pytest.raises(ExportParityError, match="differs from the module") as info:
        export_onnx(ExportsDifferently(), (1, 1, 4, 4, 4), target, exporter="torchscript")
    assert info.value.max_abs_diff == pytest.approx(1.0)
    assert list(tmp_path.iterdir()) == []


# 'valid'-padding networks: output crop and offset


def test_valid_network_equals_one_pass_over_the_padded_volume(valid_onnx: Path) -> None:
    net = valid_net()
    vol = volume(19, 23, 17, seed=9)
    with torch.no_grad():
        ref = net(F.pad(torch.from_numpy(vol)[None], (3,) * 6))[0].numpy()
    cfg = SlidingWindowConfig(patch_size=(12, 14, 12), overlap=0.5, batch_size=3)
    backend = TorchBackend(net, geometry=OutputGeometry.valid((6, 6, 6)))
    assert backend.output_shape_for((12, 14, 12)) == (6, 8, 6) and backend.geometry.offset(3) == (3, 3, 3)
    ours = SlidingWindowInferer(backend, cfg)(vol)
    assert ours.shape == (2, 19, 23, 17)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=VALID_TOL)

    ort_backend = OnnxRuntimeBackend(valid_onnx, intra_op_threads=1)
    assert ort_backend.geometry == OutputGeometry.valid((6, 6, 6))  # read from the file's static shapes
    np.testing.assert_allclose(SlidingWindowInferer(ort_backend, cfg)(vol), ref, rtol=0, atol=VALID_TOL)


def test_valid_network_on_a_volume_smaller_than_its_output_tile() -> None:
    net = valid_net()
    vol = volume(4, 5, 17, seed=10)
    with torch.no_grad():
        ref = net(F.pad(torch.from_numpy(vol)[None], (3,) * 6))[0].numpy()
    cfg = SlidingWindowConfig(patch_size=(12, 14, 12), overlap=0.75, batch_size=1)
    ours = SlidingWindowInferer(TorchBackend(net, geometry=OutputGeometry.valid((6, 6, 6))), cfg)(vol)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=VALID_TOL)


def test_asymmetric_output_crop() -> None:
    net = ShiftedValidNet().eval()
    geometry = OutputGeometry((2, 2, 2), (1, 1, 1))
    vol = volume(11, 13, 9, seed=11)
    with torch.no_grad():
        ref = net(F.pad(torch.from_numpy(vol)[None], (2, 1) * 3))[0].numpy()
    cfg = SlidingWindowConfig(patch_size=(7, 8, 6), overlap=0.5, batch_size=2)
    ours = SlidingWindowInferer(TorchBackend(net, geometry=geometry), cfg)(vol)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=VALID_TOL)
    with pytest.raises(InferenceError, match="centred"):
        SlidingWindowInferer(
            TorchBackend(net, geometry=geometry), SlidingWindowConfig(patch_size=(7, 8, 6), tta_axes=(0,))
        )


def test_undeclared_output_crop_is_a_clear_error() -> None:
    cfg = SlidingWindowConfig(patch_size=(12, 14, 12))
    with pytest.raises(InferenceError, match=r"returned \(1, 2, 6, 8, 6\).*OutputGeometry"):
        SlidingWindowInferer(TorchBackend(valid_net()), cfg)(volume(12, 14, 12))


# Single-patch mode


def test_single_patch_crops_pads_and_puts_the_output_back() -> None:
    net = same_net()
    vol = volume(13, 5, 16, seed=12)  # longer than the patch on axis 0, shorter on axis 1, equal on axis 2
    out = single_patch_inference(vol, TorchBackend(net), patch_size=PATCH, fill_value=(-1.0, -2.0, -3.0))
    assert out.shape == (3, 13, 5, 16)
    # axis 0: crop starts at (13 - 8) // 2 = 2; axis 1: (8 - 5) // 2 = 1 zero plane before, 2 after
    patch = np.zeros((1, 1, *PATCH), np.float32)
    patch[0, :, :, 1:6, :] = vol[:, 2:10]
    with torch.no_grad():
        expected = net(torch.from_numpy(patch))[0].numpy()
    np.testing.assert_allclose(out[:, 2:10], expected[:, :, 1:6], atol=1e-6)
    for c, fill in enumerate((-1.0, -2.0, -3.0)):
        assert np.all(out[c, :2] == fill) and np.all(out[c, 10:] == fill)


def test_single_patch_uses_the_model_fixed_input_and_its_geometry(valid_onnx: Path) -> None:
    backend = OnnxRuntimeBackend(valid_onnx, intra_op_threads=1)
    vol = volume(12, 14, 12, seed=13)
    options = InferenceOptions(activation="sigmoid")
    out = single_patch_inference(vol, backend, options=options, fill_value=0.5)
    with torch.no_grad():
        expected = torch.sigmoid(valid_net()(torch.from_numpy(vol)[None]))[0].numpy()
    np.testing.assert_allclose(out[:, 3:9, 3:11, 3:9], expected, atol=ORT_TOL)
    margin = np.ones(out.shape[1:], bool)
    margin[3:9, 3:11, 3:9] = False
    assert np.all(out[:, margin] == 0.5)
    with pytest.raises(InferenceError, match=r"takes input \(12, 14, 12\); patch_size"):
        SlidingWindowInferer(backend, SlidingWindowConfig(patch_size=(8, 8, 8)))
    with pytest.raises(InferenceError, match="pass patch_size"):
        single_patch_inference(vol, TorchBackend(same_net()))


# Test-time augmentation


def test_tta_flips() -> None:
    assert tta_flips(()) == [()]
    assert tta_flips((2, 0)) == [(), (0,), (2,), (0, 2)]
    assert len(tta_flips((0, 1, 2))) == 8


def test_tta_of_a_flip_equivariant_network_changes_nothing() -> None:
    net = symmetric_net()
    vol = volume(13, 21, 18, seed=14)
    plain = SlidingWindowInferer(TorchBackend(net), SlidingWindowConfig(patch_size=PATCH, batch_size=3))(vol)
    tta_cfg = SlidingWindowConfig(patch_size=PATCH, batch_size=3, tta_axes=(0, 1, 2))
    np.testing.assert_allclose(SlidingWindowInferer(TorchBackend(net), tta_cfg)(vol), plain, atol=TTA_TOL)


def test_tta_averages_the_flipped_predictions() -> None:
    net = same_net()
    vol = volume(*PATCH, seed=15)  # one window: weights cancel, the result is the TTA mean itself
    cfg = SlidingWindowConfig(
        patch_size=PATCH, tta_axes=(0, 2), activation="softmax", activation_stage="per_window"
    )
    x = torch.from_numpy(vol)[None]
    with torch.no_grad():
        flips = [torch.flip(torch.softmax(net(torch.flip(x, d)), 1), d) for d in ([], [2], [4], [2, 4])]
    expected = torch.stack(flips).mean(0)[0].numpy()
    np.testing.assert_allclose(SlidingWindowInferer(TorchBackend(net), cfg)(vol), expected, atol=1e-6)
    single = single_patch_inference(vol, TorchBackend(net), patch_size=PATCH, options=cfg)
    np.testing.assert_allclose(single, expected, atol=1e-6)


# Mixed precision, devices, options


def test_bf16_autocast_on_cpu_is_close_to_fp32() -> None:
    net = same_net()
    cfg = SlidingWindowConfig(patch_size=PATCH, activation="softmax")
    vol = volume(13, 21, 18, seed=16)
    fp32 = SlidingWindowInferer(TorchBackend(net), cfg)(vol)
    backend = TorchBackend(net, amp="bf16")
    assert backend.name == "torch-cpu-bf16"
    bf16 = SlidingWindowInferer(backend, cfg)(vol)
    assert bf16.dtype == np.float32
    diff = float(np.abs(bf16 - fp32).max())
    assert 0 < diff < BF16_TOL  # bf16 really ran (not identical) and stays close


def test_torch_backend_refuses_what_needs_a_gpu() -> None:
    with pytest.raises(InferenceError, match="bf16"):
        TorchBackend(same_net(), amp="fp16")
    with pytest.raises(InferenceError, match="CUDA"):
        TorchBackend(same_net(), cuda_graphs=True)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="CUDA is not available"):
            TorchBackend(same_net(), "cuda")


def test_channels_last_gives_the_same_result() -> None:
    net = same_net()
    cfg = SlidingWindowConfig(patch_size=PATCH, batch_size=2)
    vol = volume(13, 21, 18, seed=17)
    ref = SlidingWindowInferer(TorchBackend(net), cfg)(vol)
    np.testing.assert_allclose(
        SlidingWindowInferer(TorchBackend(net, channels_last=True), cfg)(vol), ref, atol=1e-5
    )


def test_bad_configurations_are_refused() -> None:
    with pytest.raises(InferenceError, match="overlap"):
        SlidingWindowConfig(patch_size=PATCH, overlap=1.0)
    with pytest.raises(InferenceError, match="overlap"):
        SlidingWindowConfig(patch_size=PATCH, overlap=(0.5, 0.5))
    with pytest.raises(InferenceError, match="batch_size"):
        SlidingWindowConfig(patch_size=PATCH, batch_size=0)
    with pytest.raises(InferenceError, match="activation"):
        SlidingWindowConfig(patch_size=PATCH, activation="relu")  # type: ignore[arg-type]
    with pytest.raises(InferenceError, match="tta_axes"):
        SlidingWindowConfig(patch_size=PATCH, tta_axes=(3,))
    with pytest.raises(InferenceError, match="volume must be"):
        SlidingWindowInferer(TorchBackend(same_net()), SlidingWindowConfig(patch_size=PATCH))(volume(8, 16))
    with pytest.raises(InferenceError, match="reflect-pad"):
        SlidingWindowInferer(
            TorchBackend(same_net()), SlidingWindowConfig(patch_size=PATCH, pad_mode="reflect")
        )(volume(2, 16, 16))


# Backend selection and TensorRT


def test_create_backend_explains_mistakes(same_onnx: Path) -> None:
    with pytest.raises(InferenceError, match="torch, onnxruntime, tensorrt"):
        create_backend("openvino", onnx_path=same_onnx)
    with pytest.raises(InferenceError, match="needs module="):
        create_backend("torch")
    with pytest.raises(InferenceError, match="needs onnx_path="):
        create_backend("onnxruntime")
    with pytest.raises(InferenceError, match="compile"):
        create_backend("ort", onnx_path=same_onnx, compile=True)
    with pytest.raises(InferenceError, match="does not exist"):
        create_backend("onnxruntime", onnx_path=same_onnx.with_name("missing.onnx"))
    with pytest.raises(BackendUnavailable, match="onnxruntime-gpu"):
        create_backend("onnxruntime", onnx_path=same_onnx, providers=["CUDAExecutionProvider"])


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_tensorrt_absent_is_a_clear_error(same_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(
        BackendUnavailable, match=r"tensorrt is not installed: pip install tensorrt.*onnxruntime"
    ):
        create_backend("tensorrt", onnx_path=same_onnx, cache_dir=tmp_path, device="cuda")
    with pytest.raises(BackendUnavailable, match="tensorrt is not installed"):
        TensorRTBackend(same_onnx, tmp_path)
    status = backend_status()
    assert status["torch"] is None and status["onnxruntime"] is None
    assert status["tensorrt"] is not None and "tensorrt is not installed" in status["tensorrt"]


def test_tensorrt_engine_cache_key_covers_gpu_version_and_model() -> None:
    base = {
        "onnx_bytes": b"model",
        "gpu_name": "NVIDIA H100 80GB HBM3",
        "compute_capability": (9, 0),
        "trt_version": "10.9.0",
        "fp16": True,
        "profile": ((1, 1, 64, 128, 128), (2, 1, 64, 128, 128)),
    }
    key = engine_cache_key(**base)  # type: ignore[arg-type]
    assert key.startswith("nvidia-h100-80gb-hbm3-trt10.9.0-fp16-")
    changes = {
        "onnx_bytes": b"other model",
        "gpu_name": "NVIDIA A100-SXM4-40GB",
        "trt_version": "10.10.0",
        "fp16": False,
        "profile": ((1, 1, 64, 128, 128), (4, 1, 64, 128, 128)),
    }
    for name, value in changes.items():
        assert engine_cache_key(**(base | {name: value})) != key, name  # type: ignore[arg-type]
