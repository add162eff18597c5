"""Where a bundle's network runs: PyTorch (``network_backend: "torch"``, the default) or ONNX Runtime
(``"onnxruntime"``, from ``models/model.onnx``), and the ONNX export itself.

The backend only replaces the network: preprocessing, the sliding-window inferer (with mirroring TTA and the 2-D
slice handling) and postprocessing stay the same, so both backends give the same label maps up to float rounding.
The ONNX model takes any batch size and spatial size (sizes divisible by the product of the strides), so it serves
sliding-window patches, mirrored patches and 2-D slices alike.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch
from torch import nn

BACKENDS = ("torch", "onnxruntime")
ONNX_OPSET = 17


class OnnxRuntimeNetwork(nn.Module):
    """An ONNX model run by an ``onnxruntime.InferenceSession``, called like the network it was exported from:
    a float tensor in, a logits tensor on the input's device out. It has no parameters (nothing to load)."""

    def __init__(self, path, device=None):
        super().__init__()
        import onnxruntime

        path = str(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no ONNX model; write it with `autoplan export BUNDLE --onnx` (or "
                                    "`python -m monai.bundle onnx_export`), or run with --network_backend torch")
        available = onnxruntime.get_available_providers()
        wanted = ["CUDAExecutionProvider"] if torch.device(device or "cpu").type == "cuda" else []
        providers = [p for p in wanted if p in available] + ["CPUExecutionProvider"]
        self.session = onnxruntime.InferenceSession(path, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().float().cpu().numpy())
        out = self.session.run(None, {self.input_name: array})[0]
        return torch.from_numpy(out).to(x.device)


def select_network(backend: str, network_def: nn.Module, onnx_file, device) -> nn.Module:
    """The ``network`` id of inference.json: ``network_def`` on ``device`` (its weights are loaded by the
    ``checkpointloader``), or the exported ONNX model."""
    if backend == "torch":
        return network_def.to(device)
    if backend == "onnxruntime":
        return OnnxRuntimeNetwork(onnx_file, device)
    raise ValueError(f"network_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


def export_onnx(network: nn.Module, path, input_shape, tolerance: float = 1e-4) -> float:
    """Write ``network`` (in eval mode, weights loaded) to ``path`` as ONNX with dynamic batch and spatial axes,
    then run it with onnxruntime on a random input of ``input_shape`` and compare with the eager network.

    Returns the largest absolute difference of the logits; above ``tolerance`` nothing is written and ValueError
    is raised. The file appears atomically.
    """
    import onnxruntime

    network = network.eval().cpu()
    example = torch.randn(*input_shape, generator=torch.Generator().manual_seed(0))
    axes = {0: "batch", **{d: f"spatial{d - 2}" for d in range(2, len(input_shape))}}
    path = str(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".onnx")
    os.close(fd)
    try:
        with torch.no_grad():
            # the TorchScript-based exporter: about 10x faster than the dynamo one here, and equally exact
            torch.onnx.export(network, (example,), tmp, input_names=["image"], output_names=["pred"],
                              dynamic_axes={"image": axes, "pred": axes}, opset_version=ONNX_OPSET, dynamo=False)
            expected = network(example).numpy()
        session = onnxruntime.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: example.numpy()})[0]
        difference = float(np.abs(got - expected).max())
        if got.shape != expected.shape or difference > tolerance:
            raise ValueError(f"{path}: onnxruntime's output differs from the network's (shape {got.shape} vs "
                             f"{expected.shape}, max abs difference {difference:.2e} > {tolerance:g})")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return difference
