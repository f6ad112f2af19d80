"""The PyTorch rebuild of the pyliverlesionseg liver and lesion nets: layer semantics, HDF5 weight
loading, ONNX parity, and accuracy of the converted liver net on real CT and MR."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pipelines.liver.keras_h5 import WeightsFileError, read_convs, state_dict_from_keras
from pipelines.liver.networks import (
    LESION_CONVS,
    LIVER_CONVS,
    LesionNet,
    LiverNet,
    build,
    center_crop,
    count_parameters,
    norm_act,
    output_size,
    upsample3_linear,
)
from tests.liver_support import CHAOS_TEST_PATIENTS, chaos_result, ct_result


def test_architectures_match_the_published_sizes() -> None:
    assert count_parameters(LiverNet()) == 3_874_961
    assert count_parameters(LesionNet()) == 3_464_221
    assert output_size("liver", (189, 162, 162)) == (163, 136, 136)
    assert output_size("lesion", (180, 172, 86)) == (92, 84, 42)
    # any input the arithmetic allows, e.g. the parity shapes
    assert output_size("liver", (81, 54, 54)) == (55, 28, 28)
    assert output_size("lesion", (100, 92, 54)) == (12, 4, 10)


def test_norm_act_is_keras_instance_norm_with_epsilon_on_the_std() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(2, 3, 4, 5, 6)).astype(np.float32)
    x[1, 2] = 7.0  # a constant channel: std 0, the epsilon keeps it finite (0 after centring)
    mean = x.mean(axis=(2, 3, 4), keepdims=True)
    std = np.sqrt(((x - mean) ** 2).mean(axis=(2, 3, 4), keepdims=True))  # biased
    y = (x - mean) / (std + 1e-7)
    expected = np.where(y > 0, y, 0.01 * y)
    got = norm_act(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.all(got[1, 2] == 0)


def test_up3_is_nearest_then_valid_mean() -> None:
    x = torch.arange(4, dtype=torch.float32).reshape(1, 1, 4, 1, 1).repeat(1, 1, 1, 3, 3)
    y = upsample3_linear(x)
    assert tuple(y.shape[2:]) == (10, 7, 7)  # n -> 3n - 2
    # along X: nearest gives 0 0 0 1 1 1 2 2 2 3 3 3; a 3-wide mean of that
    expected = np.array([0, 1 / 3, 2 / 3, 1, 4 / 3, 5 / 3, 2, 7 / 3, 8 / 3, 3], dtype=np.float32)
    np.testing.assert_allclose(y[0, 0, :, 3, 3].numpy(), expected, rtol=1e-6, atol=1e-6)


def test_center_crop_is_symmetric() -> None:
    x = torch.arange(9 * 8 * 4, dtype=torch.float32).reshape(1, 1, 9, 8, 4)
    like = torch.zeros(1, 1, 7, 4, 4)
    y = center_crop(x, like)
    assert torch.equal(y, x[:, :, 1:8, 2:6, :])


def _keras_file(
    path: Path, specs: tuple[tuple[int, int, tuple[int, int, int]], ...], seed: int = 0
) -> list[np.ndarray]:
    """A weights-only Keras 2 HDF5 file (the layout of the pyliverlesionseg files) with random kernels."""
    rng = np.random.default_rng(seed)
    kernels = []
    with h5py.File(path, "w") as f:
        names = ["input_1", "max_pooling3d_1"]
        for index, (cin, cout, k) in enumerate(specs, start=1):
            name = f"conv3d_{index}"
            names += [name, f"lambda_{index}"]
            kernel = rng.normal(size=(*k, cin, cout)).astype(np.float32)
            bias = rng.normal(size=(cout,)).astype(np.float32)
            group = f.create_group(name).create_group(name)
            group["kernel:0"], group["bias:0"] = kernel, bias
            f[name].attrs["weight_names"] = [f"{name}/kernel:0".encode(), f"{name}/bias:0".encode()]
            kernels.append(kernel)
        for name in names:
            if name not in f:
                f.create_group(name).attrs["weight_names"] = np.array([], dtype="S1")
        f.attrs["layer_names"] = [n.encode() for n in names]
        f.create_group("header")["voxel_size"] = np.array([3.0, 3.0, 3.0])
    return kernels


def test_keras_weights_load_by_layer_order_with_transposed_kernels(tmp_path: Path) -> None:
    path = tmp_path / "liver.hdf5"
    kernels = _keras_file(path, LIVER_CONVS)
    state, header = state_dict_from_keras("liver", path)
    assert header == {"voxel_size": [3.0, 3.0, 3.0]}
    for index, kernel in enumerate(kernels):
        assert torch.equal(state[f"convs.{index}.weight"], torch.from_numpy(kernel.transpose(4, 3, 0, 1, 2)))
    # a Keras conv and the rebuilt one compute the same correlation: check conv3d_1 at one voxel
    x = np.random.default_rng(1).normal(size=(1, 1, 5, 5, 3)).astype(np.float32)
    model = build("liver")
    model.load_state_dict(state)
    with torch.no_grad():
        y = model.convs[0](torch.from_numpy(x)).numpy()
    k = kernels[0]  # (3, 3, 1, 1, 20), padding 'same' in-plane
    manual = np.einsum("abc,abcio->o", x[0, 0, 1:4, 1:4, 1:2], k) + state["convs.0.bias"].numpy()
    np.testing.assert_allclose(y[0, :, 2, 2, 1], manual, rtol=1e-4, atol=1e-4)


def test_keras_weights_in_the_wrong_order_are_refused(tmp_path: Path) -> None:
    swapped = list(LESION_CONVS)
    swapped[1], swapped[2] = swapped[2], swapped[1]
    path = tmp_path / "lesion.hdf5"
    _keras_file(path, tuple(swapped))
    with pytest.raises(
        WeightsFileError, match=r"conv3d_2 has kernel \(1, 1, 1, 1, 40\).*expects \(3, 3, 3, 20, 40\)"
    ):
        state_dict_from_keras("lesion", path)
    with pytest.raises(WeightsFileError, match="holds 21 convolutions; the liver network has 15"):
        state_dict_from_keras("liver", path)
    (tmp_path / "junk.hdf5").write_bytes(b"not hdf5")
    with pytest.raises(WeightsFileError, match="not a readable HDF5 file"):
        read_convs(tmp_path / "junk.hdf5")


def test_liver_dice_on_ct() -> None:
    """TotalSegmentator's example CT (3 mm): Dice >= 0.85 against its (silver) liver."""
    result = ct_result()
    print(f"CT liver Dice {result.dice:.4f}; timings {result.timings}")
    assert result.dice >= 0.85


def test_liver_dice_on_chaos_mr() -> None:
    """CHAOS T2-SPIR MR (manual labels): mean Dice >= 0.85 over the test patients (MR path)."""
    scores = {p: chaos_result(p).dice for p in CHAOS_TEST_PATIENTS}
    print("CHAOS liver Dice " + ", ".join(f"{p}: {d:.4f}" for p, d in scores.items()))
    assert len(scores) >= 3
    assert float(np.mean(list(scores.values()))) >= 0.85
    assert min(scores.values()) >= 0.75


def test_networks_stay_loaded_when_kept() -> None:
    """On a GPU the ct-liver pipeline keeps both runtimes between steps and jobs (``keep_loaded``); on the
    CPU each is created for its step and released after it."""
    import dataclasses

    from tests.liver_support import networks

    released = networks("onnxruntime")
    assert released.keep_loaded is False  # open_networks on the CPU
    with released.open("liver") as first:
        pass
    assert first._backend is None  # closed at the end of its step
    kept = dataclasses.replace(released, keep_loaded=True, _kept={})
    with kept.open("lesion") as net:
        pass
    assert kept.open("lesion") is net and net._backend is not None
    kept.close()
    assert net._backend is None and kept.open("lesion") is not net
    kept.close()
