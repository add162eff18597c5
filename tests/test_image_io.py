"""Readers follow nnU-Net's axis convention (spec section 0) for every supported format."""

import numpy as np
import pytest
import SimpleITK as sitk

from autoplan.image_io import ImageReadError, read_array, read_images, reader_name


def write(path, array, spacing=(0.5, 0.7, 2.0)):
    image = sitk.GetImageFromArray(array)
    if array.ndim == 3:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_3d_files_are_z_y_x_with_reversed_spacing(tmp_path, ending):
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    data, geometry = read_array(write(tmp_path / f"img{ending}", array))
    assert data.shape == (4, 5, 6)
    np.testing.assert_array_equal(data, array)
    assert geometry.spacing == pytest.approx((2.0, 0.7, 0.5))
    assert len(geometry.direction) == 9


def test_png_is_pseudo_3d_with_spacing_999(tmp_path):
    array = (np.arange(12 * 7) % 250).astype(np.uint8).reshape(12, 7)
    data, geometry = read_array(write(tmp_path / "img.png", array))
    assert data.shape == (1, 12, 7)
    assert geometry.spacing == (999.0, 1.0, 1.0)
    assert reader_name(".png") == "NaturalImage2DIO" and reader_name(".nii.gz") == "SimpleITKIO"


def test_2d_nifti_gets_999_times_in_plane_spacing(tmp_path):
    image = sitk.GetImageFromArray(np.zeros((10, 8), np.float32))
    image.SetSpacing((0.5, 0.25))
    sitk.WriteImage(image, str(tmp_path / "slice.nii.gz"))
    data, geometry = read_array(tmp_path / "slice.nii.gz")
    assert data.shape == (1, 10, 8)
    assert geometry.spacing == pytest.approx((999 * 0.5, 0.25, 0.5))


def test_channels_are_stacked_as_float32(tmp_path):
    a = write(tmp_path / "c_0000.nii.gz", np.ones((3, 4, 5), np.uint8))
    b = write(tmp_path / "c_0001.nii.gz", np.full((3, 4, 5), 2.5, np.float32))
    data, geometries = read_images([a, b])
    assert data.shape == (2, 3, 4, 5) and data.dtype == np.float32
    assert data[1, 0, 0, 0] == 2.5 and len(geometries) == 2


def test_four_d_file_is_refused_with_advice(tmp_path):
    image = sitk.JoinSeries([sitk.GetImageFromArray(np.zeros((3, 4, 5), np.float32))] * 2)
    sitk.WriteImage(image, str(tmp_path / "four_d.nii.gz"))
    with pytest.raises(ImageReadError, match="four_d.nii.gz.*convert-msd"):
        read_array(tmp_path / "four_d.nii.gz")


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ImageReadError, match="nope.nii.gz: file not found"):
        read_array(tmp_path / "nope.nii.gz")
