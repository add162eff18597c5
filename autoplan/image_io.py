"""Image readers returning arrays and spacing in nnU-Net's axis convention (spec section 0).

3-D files (NIfTI, NRRD, MHA, GIPL) are read with SimpleITK: arrays are (z, y, x) and spacing is (sz, sy, sx), the
reverse of ITK order, as nnU-Net's default ``SimpleITKIO`` does. 2-D natural images (PNG, BMP, TIFF) become pseudo-3-D
arrays (1, H, W) with spacing (999, 1, 1), as ``NaturalImage2DIO`` does. Every reader returns ``(array, geometry)``
where geometry holds spacing, origin and direction so that outputs can be written back with the input's geometry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

NATURAL_2D_ENDINGS = (".png", ".bmp", ".tif", ".tiff")
ITK_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".gipl")


class ImageReadError(Exception):
    """A file could not be read as an image; the message names the file."""


@dataclass
class Geometry:
    spacing: tuple  # nnU-Net order (slowest array axis first)
    origin: tuple | None = None  # ITK order, None for natural 2-D images
    direction: tuple | None = None


def reader_name(file_ending: str) -> str:
    """The nnU-Net reader/writer class that handles a file ending (written into plans)."""
    return "NaturalImage2DIO" if file_ending.lower() in NATURAL_2D_ENDINGS else "SimpleITKIO"


def _ending(path: Path) -> str:
    name = path.name.lower()
    for e in ITK_ENDINGS + NATURAL_2D_ENDINGS:
        if name.endswith(e):
            return e
    return path.suffix.lower()


def read_array(path) -> tuple[np.ndarray, Geometry]:
    """Read one single-channel image as a 3-D array in nnU-Net axis order."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    ending = _ending(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
        raise ImageReadError(f"{path}: unreadable or truncated image file ({detail})") from None
    array = sitk.GetArrayFromImage(image)
    if ending in NATURAL_2D_ENDINGS:
        if array.ndim == 3 and image.GetNumberOfComponentsPerPixel() == array.shape[-1] > 1 and np.all(
                array == array[..., :1]):  # ITK reads 8-bit grey BMPs (a grey palette) as RGB with R = G = B
            array = np.ascontiguousarray(array[..., 0])
        elif image.GetNumberOfComponentsPerPixel() > 1 or array.ndim != 2:
            raise ImageReadError(f"{path}: a natural image with {image.GetNumberOfComponentsPerPixel()} colour "
                                 "components; save each colour channel as its own _XXXX file")
        return array[None], Geometry(spacing=(999.0, 1.0, 1.0))
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise ImageReadError(f"{path}: vector-valued pixels are not supported; store one channel per file")
    spacing = [abs(float(s)) for s in image.GetSpacing()[::-1]]
    if array.ndim == 2:
        array = array[None]
        spacing = [999.0 * max(spacing)] + spacing
    elif array.ndim != 3:
        raise ImageReadError(f"{path}: {array.ndim}-D image; expected 2-D or 3-D. A 4-D multi-channel file must be "
                             "split into one file per channel (python -m autoplan convert-msd does this)")
    return array, Geometry(tuple(spacing), tuple(image.GetOrigin()), tuple(image.GetDirection()))


def count_nonfinite(path, array: np.ndarray) -> int:
    """NaN/Inf voxels of an image file, after checking that a NIfTI file is complete.

    ITK's NIfTI reader silently zero-fills truncated files and turns NaN/Inf into 0, so NIfTI files are also
    decompressed in full (which checks the gzip CRC) and their voxels checked with nibabel.
    """
    bad = int(np.count_nonzero(~np.isfinite(array))) if array.dtype.kind == "f" else 0
    if bad or _ending(Path(path)) not in (".nii", ".nii.gz"):
        return bad
    import gzip
    import zlib

    import nibabel as nib

    try:
        raw = Path(path).read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        image = nib.Nifti1Image.from_bytes(raw)
        data = np.asanyarray(image.dataobj)
    except (EOFError, OSError, zlib.error, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise ImageReadError(f"{path}: unreadable or truncated image file ({exc})") from None
    return int(np.count_nonzero(~np.isfinite(data))) if data.dtype.kind == "f" else 0


def read_images(paths) -> tuple[np.ndarray, list[Geometry]]:
    """Read the channel files of one case into a float32 (c, z, y, x) array; shapes are checked by the caller."""
    arrays, geometries = [], []
    for p in paths:
        a, g = read_array(p)
        arrays.append(a)
        geometries.append(g)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ImageReadError(f"{paths[0]}: channels of this case differ in shape: "
                             + ", ".join(f"{Path(p).name} {a.shape}" for p, a in zip(paths, arrays)))
    return np.stack([a.astype(np.float32, copy=False) for a in arrays]), geometries
