"""The model zoo's checks with MONAI's defaults, and every exported form of the network, on every configuration's
bundle (2d, 3d_fullres, 3d_lowres, 3d_cascade_fullres) and on an ensemble bundle.

``verify_net_in_out`` and ``ckpt_export`` are called as the zoo's CI calls them: default ``n`` (the input is built
from metadata's ``spatial_shape``), and scripting (no ``use_trace``). Scripted, traced and ONNX Runtime outputs are
compared with the eager network on the same input. Weights are freshly initialised (no training needed for this).
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from autoplan.emit import emit
from autoplan.pipeline import run
from autoplan.synthetic import make_synthetic_dataset
from conftest import with_lowres_and_cascade
from test_bundles import bundle_on_path

CONFIGURATIONS = ["2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"]
DATASET = "Dataset964_Export"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Fold-0 bundles of every configuration (lowres and cascade added to the plans as nnU-Net would plan them),
    a second 3d_fullres fold, and an ensemble bundle of the two 3d_fullres folds; all with random weights."""
    from monai.bundle import ConfigParser

    root = tmp_path_factory.mktemp("zoo")
    raw = make_synthetic_dataset(root / "raw" / DATASET, cases=5, shape=(24, 24, 12), spacing=(1, 1, 2), labels=2,
                                 test_cases=1, seed=5)
    plans_path = run(raw, root / "work", processes=1, configurations=["3d_fullres"], folds=[0])
    plans = json.loads(plans_path.read_text())
    plans = with_lowres_and_cascade(plans)
    (root / "plans.json").write_text(json.dumps(plans))
    out = root / "bundles"
    emit(root / "plans.json", raw, out, CONFIGURATIONS, [0])
    emit(root / "plans.json", raw, out / "more", ["3d_fullres"], [1])
    shutil.move(out / "more" / f"{DATASET}_3d_fullres_fold1", out)
    found = {c: out / f"{DATASET}_{c}_fold0" for c in CONFIGURATIONS}
    for i, bundle in enumerate([*found.values(), out / f"{DATASET}_3d_fullres_fold1"]):
        with bundle_on_path(bundle):
            parser = ConfigParser()
            parser.read_config(str(bundle / "configs" / "inference.json"))
            torch.manual_seed(i)
            torch.save(parser.get_parsed_content("network_def").state_dict(), bundle / "models" / "model.pt")
    from tools import ensemble

    assert ensemble.main(["make-bundle", str(found["3d_fullres"]), str(out / f"{DATASET}_3d_fullres_fold1"),
                          "--out", str(out / "ensemble")]) == 0
    return {**found, "ensemble": out / "ensemble"}


def eager_network(bundle: Path):
    """``network_def`` with ``models/model.pt`` in eval mode, built with the bundle's own ``scripts``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    return network.eval()


def patch_input(bundle: Path, batch: int = 1) -> torch.Tensor:
    """One input of the size metadata declares with n = 1 (what verify_net_in_out feeds)."""
    image = json.loads((bundle / "configs" / "metadata.json").read_text())["network_data_format"]["inputs"]["image"]
    spatial = [int(str(s).removesuffix("*n")) for s in image["spatial_shape"]]
    return torch.randn(batch, image["num_channels"], *spatial, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", [*CONFIGURATIONS, "ensemble"])
def test_zoo_checks_with_defaults_and_every_export_equals_eager(bundles, name, tmp_path):
    from monai.bundle import ckpt_export, verify_net_in_out

    bundle = bundles[name]
    meta, config = str(bundle / "configs" / "metadata.json"), str(bundle / "configs" / "inference.json")
    inference = json.loads(Path(config).read_text())
    patch = (inference["members"][0] if name == "ensemble" else inference)["patch_size"]
    spatial = json.loads(Path(meta).read_text())["network_data_format"]["inputs"]["image"]["spatial_shape"]
    assert spatial == [f"{p}*n" for p in patch]  # n = 1 is one patch: a valid input
    with bundle_on_path(bundle):
        verify_net_in_out(net_id="network_def", meta_file=meta, config_file=config, bundle_root=str(bundle))
        ckpt_export(net_id="network_def", filepath=str(tmp_path / "model.ts"), ckpt_file=str(bundle / "models/model.pt"),
                    meta_file=meta, config_file=config, bundle_root=str(bundle))
        network = eager_network(bundle)
        from scripts.backends import export_onnx

        x = patch_input(bundle, batch=2)
        with torch.no_grad():
            eager = network(x)
            scripted = torch.jit.load(str(tmp_path / "model.ts"))(x)
            traced = torch.jit.trace(network, patch_input(bundle))(x)
        export_onnx(network, tmp_path / "model.onnx", list(patch_input(bundle).shape))
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx = session.run(None, {"image": x.numpy()})[0]
    num_classes = inference["num_classes"]
    assert eager.shape == (2, num_classes, *patch)
    for other, tolerance in ((scripted, 1e-5), (traced, 1e-5), (torch.from_numpy(onnx), 1e-4)):
        assert other.shape == eager.shape
        assert (other - eager).abs().max() <= tolerance
    with bundle_on_path(bundle):  # the scripted file carries the configs Deploy's operator reads from extra/
        from monai.data import load_net_with_metadata

        _, meta_read, extras = load_net_with_metadata(str(tmp_path / "model.ts"), more_extra_files=("inference.json",))
    assert meta_read["version"] and json.loads(extras["inference.json"])["network_def"] == inference["network_def"]


def test_deep_supervision_outputs_unchanged_by_the_scriptable_dynunet(bundles):
    """The scriptable forward of the DynUNet gives MONAI's DynUNet outputs: eval logits, and in training each
    deep-supervision head at its own resolution (MONAI stacks them upsampled to full size)."""
    import torch.nn.functional as F
    from monai.networks.nets import DynUNet

    bundle = bundles["2d"]  # isotropic 3x3 kernels: the plan MONAI's DynUNet computes exactly
    with bundle_on_path(bundle):
        network = eager_network(bundle)
        from scripts.networks import NativeResolutionDynUNet

        assert isinstance(network, NativeResolutionDynUNet)
        reference = DynUNet(network.spatial_dims, network.in_channels, network.out_channels, network.kernel_size, network.strides,
                            network.upsample_kernel_size, filters=network.filters, deep_supervision=True,
                            deep_supr_num=network.deep_supr_num, trans_bias=True, norm_name=network.norm_name,
                            act_name=network.act_name)
        reference.load_state_dict(network.state_dict())
        x = patch_input(bundle, batch=2)
        with torch.no_grad():
            np.testing.assert_allclose(network(x).numpy(), reference.eval()(x).numpy(), atol=1e-6)
            network.train()
            reference.train()
            heads, stacked = network(x), reference(x)
    assert len(heads) == stacked.shape[1] > 1 and heads[0].shape[2:] == x.shape[2:]
    assert [h.shape[-1] for h in heads] == sorted((h.shape[-1] for h in heads), reverse=True)
    for i, head in enumerate(heads):
        np.testing.assert_allclose(F.interpolate(head, x.shape[2:]).numpy(), stacked[:, i].numpy(), atol=1e-5)


def test_bundle_without_channel_dimension_and_from_another_folder(bundles, tmp_path, monkeypatch):
    """MONAI Deploy's way: LoadImage* dropped, a channel-less (x, y, z) image with its meta data, the working
    directory elsewhere and bundle_root left at "."; the label map equals the bundle's own preprocessing path."""
    from monai.bundle import ConfigParser
    from monai.transforms import LoadImage

    bundle = bundles["3d_fullres"]
    image_file = next((bundle.parents[1] / "raw" / DATASET / "imagesTs").glob("*_0000.nii.gz"))
    monkeypatch.chdir(tmp_path)
    results = []
    with bundle_on_path(bundle):
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / "inference.json"))
        parser["use_tta"] = False
        pre, post = parser.get_parsed_content("preprocessing"), parser.get_parsed_content("postprocessing")
        inferer = parser.get_parsed_content("inferer")
        network = eager_network(bundle)
        without_loader = [t for t in pre.transforms if "LoadImage" in type(t).__name__]
        assert len(without_loader) == 1
        for channel_first in (True, False):
            image = LoadImage(image_only=True, ensure_channel_first=channel_first)(str(image_file))
            data = {"image": image}
            for t in pre.transforms[1:]:
                data = t(data)
            with torch.no_grad():
                data["pred"] = inferer(data["image"][None], network)[0]
            for t in post.transforms:
                if "SaveImage" not in type(t).__name__:
                    data = t(data)
            results.append(np.asarray(data["pred"]))
    assert results[0].shape == (1, *LoadImage(image_only=True)(str(image_file)).shape)
    np.testing.assert_array_equal(results[0], results[1])
    assert not (tmp_path / "configs").exists() and sys.path.count(str(bundle)) == 0
