"""Reading medical images as 2D RGB arrays: PNG/JPEG, NIfTI (a slice of a volume) and DICOM, through MONAI.

`load_image` is what `medsight predict` and the DataModule use. MONAI's readers do the decoding
(PILReader, NibabelReader, PydicomReader); if one breaks on a file, nibabel/pydicom/PIL are used directly.
CT intensities are windowed (presets in WINDOWS, Hounsfield units after rescale slope/intercept); other
modalities are min-max scaled. Errors are `DataError`s that name the file and field.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from medsight.data import DataError

log = logging.getLogger(__name__)

#: CT window presets (center, width) in HU.
WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "brain": (40.0, 80.0),
    "bone": (400.0, 1800.0),
    "mediastinum": (50.0, 350.0),
    "liver": (60.0, 160.0),
}
Window = Union[None, str, tuple[float, float]]  # noqa: UP007 (runtime alias)

#: Largest image / volume (pixels or voxels, from the file's header) read before anything is decoded: a
#: header claiming more, e.g. a decompression bomb, is a DataError (config `data.max_pixels`).
MAX_PIXELS = 1 << 28  # 268M: a 512 x 512 x 1024 CT volume, a 16k x 16k slide


def set_max_pixels(n: int) -> None:
    """Set the limit (`data.max_pixels`, applied by the DataModule and `medsight predict`)."""
    global MAX_PIXELS
    if int(n) < 1:
        raise DataError(f"data.max_pixels must be >= 1, got {n}", field="data.max_pixels")
    MAX_PIXELS = int(n)


def _check_size(path: str, shape: Any, what: str) -> None:
    dims = [int(d) for d in shape if d is not None]
    n = 1
    for d in dims:
        if d < 0:
            raise DataError(f"{path}: {what} header has a negative size {tuple(dims)}", path=path, field="shape")
        n *= max(d, 1)
    if n > MAX_PIXELS:
        raise DataError(f"{path}: {what} header claims {tuple(dims)} = {n:,} pixels/voxels, more than "
                        f"data.max_pixels={MAX_PIXELS:,} (a huge or malformed file; raise the limit if it is real)",
                        path=path, field="shape")


def _check_header(path: str, kind: str) -> None:
    """Refuse, from the header alone, an image whose pixel count exceeds MAX_PIXELS (nothing decoded yet).
    A header the library cannot parse is left to the reader (which raises a DataError)."""
    if kind == "png":
        try:
            from PIL import Image

            with Image.open(path) as im:  # lazy: reads the header only
                size = im.size
        except Image.DecompressionBombError as e:  # PIL's own limit (~179M pixels) said it first
            raise DataError(f"{path}: refused as a decompression bomb ({e}); data.max_pixels={MAX_PIXELS:,}",
                            path=path, field="shape") from None
        except Exception:  # noqa: BLE001 - unreadable header: the reader below reports it
            return
        _check_size(path, size, "image")
    elif kind == "nifti":
        try:
            import nibabel as nib

            shape = nib.load(path).header.get_data_shape()
        except Exception:  # noqa: BLE001 - unreadable header: the reader below reports it
            return
        _check_size(path, shape, "NIfTI")
    else:
        try:
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True)
            dims = (ds.get("Rows", 0) or 0, ds.get("Columns", 0) or 0, ds.get("NumberOfFrames", 1) or 1)
            dims = tuple(int(d) for d in dims)
        except Exception:  # noqa: BLE001 - unreadable header: the reader below reports it
            return
        _check_size(path, dims, "DICOM")


PNG_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")


@dataclass
class ImageGeometry:
    """Where a 2D image came from, enough to write a mask back (NIfTI affine, slice, original shape)."""

    path: str
    kind: str  # png | nifti | dicom
    shape: tuple[int, ...]  # original array shape (volume shape for NIfTI)
    affine: np.ndarray | None = None  # (4, 4) voxel -> world, NIfTI/DICOM
    axis: int | None = None  # NIfTI slicing axis
    slice_index: int | None = None  # NIfTI slice index
    modality: str | None = None  # DICOM Modality tag (CT, MR, ...)
    window: tuple[float, float] | None = None  # window applied (center, width); None: min-max
    extra: dict[str, Any] = field(default_factory=dict)


def image_kind(path: str | Path) -> str:
    """png | nifti | dicom, from the file name (a directory or suffix-less file is tried as DICOM)."""
    name = str(path).lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    if name.endswith(PNG_SUFFIXES):
        return "png"
    return "dicom" if not Path(name).suffix else "png"


@functools.cache
def _loader(kind: str) -> Any:
    """One MONAI LoadImage per reader kind (constructing it per file is slow and logs plugin notices)."""
    from monai.data import NibabelReader, PILReader, PydicomReader
    from monai.transforms import LoadImage

    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)  # optional GPU codec notice
    reader = {"png": lambda: PILReader(reverse_indexing=False), "nifti": NibabelReader,
              "dicom": lambda: PydicomReader(swap_ij=False)}[kind]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # PNG keeps its stored dtype (uint8); volumes come as float32 (after DICOM rescale)
        return LoadImage(reader=reader, image_only=False, dtype=None if kind == "png" else np.float32)


def _monai_load(path: str, kind: str) -> tuple[np.ndarray, dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img, meta = _loader(kind)(path)
    return np.asarray(img), dict(meta)


def _read_png(path: str) -> np.ndarray:
    """(H, W) or (H, W, C) uint8 as stored."""
    try:
        arr, _ = _monai_load(path, "png")
    except Exception as e_monai:  # noqa: BLE001 - fall back to PIL when MONAI's reader breaks
        try:
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im)
        except Exception as e:  # noqa: BLE001 - any reader failure becomes a DataError or a fallback
            raise DataError(f"{path}: cannot read image ({e}; MONAI: {e_monai})", path=path) from None
    return arr


def _to_uint8(x: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """Window (center, width) or min-max to uint8."""
    x = x.astype(np.float32)
    if window is not None:
        c, w = window
        lo, hi = c - w / 2, c + w / 2
    else:
        lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
    if hi <= lo:
        return np.zeros(x.shape, np.uint8)
    return (np.clip((x - lo) / (hi - lo), 0, 1) * 255 + 0.5).astype(np.uint8)


def _resolve_window(window: Window, modality: str | None) -> tuple[float, float] | None:
    if isinstance(window, str):
        if window == "minmax":
            return None
        if window == "auto":
            return WINDOWS["abdomen"] if modality == "CT" else None
        if window not in WINDOWS:
            raise DataError(f"unknown window preset '{window}'; choose from {sorted(WINDOWS)} or (center, width)",
                            field="window")
        return WINDOWS[window]
    if window is None:
        return None
    c, w = window
    return float(c), float(w)


def _to_rgb(x: np.ndarray) -> np.ndarray:
    """(H, W) | (H, W, 1) | (H, W, 3) | (H, W, 4) -> (H, W, 3)."""
    if x.ndim == 2:
        return np.repeat(x[..., None], 3, -1)
    if x.ndim == 3 and x.shape[-1] == 1:
        return np.repeat(x, 3, -1)
    if x.ndim == 3 and x.shape[-1] >= 3:
        return x[..., :3]
    raise DataError(f"unsupported image shape {x.shape}", field="image")


def read_image(path: str | Path, slice_index: int | None = None, axis: int = 2,
               window: Window = None) -> tuple[np.ndarray, ImageGeometry]:
    """Read any supported image as (H, W, 3) uint8 plus its geometry.

    PNG/JPEG: as stored (grey -> RGB; 16-bit -> min-max). NIfTI: slice `slice_index` (default middle) along
    `axis` of the volume (further axes, e.g. time, take index 0); `window` (preset name or (center, width))
    else min-max. DICOM: rescale slope/intercept applied (MONAI), `window` for CT (default: min-max; "auto"
    uses the abdomen preset for CT), min-max for MR and others.
    """
    path = str(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found", path=path)
    kind = image_kind(path)
    if os.path.isfile(path):
        _check_header(path, kind)
    if kind == "png":
        arr = _read_png(path)
        if arr.dtype != np.uint8:
            arr = _to_uint8(arr, None)
        return _to_rgb(arr), ImageGeometry(path, "png", tuple(arr.shape))
    if kind == "nifti":
        try:
            vol, meta = _monai_load(path, "nifti")
            affine = np.asarray(meta.get("original_affine", meta.get("affine")))
        except Exception as e_monai:  # noqa: BLE001 - any reader failure becomes a DataError or a fallback
            try:
                import nibabel as nib

                img = nib.load(path)
                vol, affine = np.asarray(img.dataobj), np.asarray(img.affine)
            except Exception as e:  # noqa: BLE001 - any reader failure becomes a DataError or a fallback
                raise DataError(f"{path}: cannot read NIfTI ({e}; MONAI: {e_monai})", path=path) from None
        if vol.ndim < 2:
            raise DataError(f"{path}: NIfTI has {vol.ndim} dimensions; need >= 2", path=path)
        if vol.ndim == 2:
            sl, idx = vol, None
        else:
            if not -vol.ndim <= axis < vol.ndim:
                raise DataError(f"{path}: axis {axis} out of range for shape {vol.shape}", path=path, field="axis")
            n = vol.shape[axis]
            idx = n // 2 if slice_index is None else int(slice_index)
            if not 0 <= idx < n:
                raise DataError(f"{path}: slice {idx} out of range 0..{n - 1} on axis {axis}", path=path,
                                field="slice_index")
            sl = np.take(vol, idx, axis=axis)
            while sl.ndim > 2:  # e.g. time: first frame
                sl = sl[..., 0]
        w = _resolve_window(window, None)
        return _to_rgb(_to_uint8(sl, w)), ImageGeometry(path, "nifti", tuple(vol.shape), affine, axis, idx,
                                                        window=w)
    # DICOM
    modality = None
    try:
        import pydicom

        modality = str(pydicom.dcmread(path, stop_before_pixels=True).get("Modality", "")) or None
    except Exception as e:  # noqa: BLE001 - the Modality tag is optional
        log.debug("%s: no DICOM Modality tag (%s)", path, e)
    try:
        arr, meta = _monai_load(path, "dicom")
        affine = np.asarray(meta.get("original_affine", meta.get("affine")))
    except Exception as e_monai:  # noqa: BLE001 - any reader failure becomes a DataError or a fallback
        try:
            import pydicom

            ds = pydicom.dcmread(path)
            arr = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
            affine = None
        except Exception as e:  # noqa: BLE001 - any reader failure becomes a DataError or a fallback
            raise DataError(f"{path}: cannot read DICOM ({e}; MONAI: {e_monai})", path=path) from None
    arr = np.squeeze(arr)
    if arr.ndim == 3 and arr.shape[-1] not in (3, 4):  # multi-frame: middle frame unless given
        idx = arr.shape[0] // 2 if slice_index is None else int(slice_index)
        arr = arr[idx]
    w = _resolve_window(window, modality) if modality == "CT" or window not in (None, "auto") else None
    out = arr if (arr.dtype == np.uint8 and w is None and arr.ndim == 3) else _to_uint8(arr, w)
    return _to_rgb(out), ImageGeometry(path, "dicom", tuple(arr.shape), affine, modality=modality, window=w)


def load_image(path: str | Path, slice_index: int | None = None, axis: int = 2,
               window: Window = None) -> np.ndarray:
    """(H, W, 3) uint8 image from PNG/JPEG/NIfTI/DICOM (see `read_image` for the geometry too)."""
    return read_image(path, slice_index, axis, window)[0]


def read_mask(path: str | Path, expected_shape: tuple[int, int] | None = None,
              source: str | None = None, field: str = "mask_file") -> np.ndarray:
    """Binary mask (H, W) bool from an 8-bit PNG (> 0.5 after scaling to [0, 1]) or a NIfTI/DICOM label.

    `expected_shape`: the image's (H, W); a different size raises DataError naming the file and field.
    """
    path = str(path)
    where = f" (referenced by {source}, field '{field}')" if source else f" (field '{field}')"
    if not os.path.exists(path):
        raise DataError(f"{path}: mask file not found{where}", path=source or path, field=field)
    kind = image_kind(path)
    try:
        if kind == "png":
            if os.path.isfile(path):
                _check_header(path, kind)
            m = _read_png(path)
            if m.ndim == 3:
                m = m[..., 0]
            scale = 255.0 if m.dtype == np.uint8 else float(max(m.max(), 1))
            m = m.astype(np.float32) / scale > 0.5
        else:
            arr = read_image(path)[0]  # label volumes: min-max; any foreground > 0.5
            m = arr[..., 0] > 127
    except DataError as e:
        raise DataError(f"{path}: cannot read mask{where}: {e}", path=source or path, field=field) from None
    if expected_shape is not None and tuple(m.shape[:2]) != tuple(expected_shape):
        raise DataError(f"{path}: mask size {tuple(m.shape[:2])} differs from its image size "
                        f"{tuple(expected_shape)}{where}", path=source or path, field=field)
    return m


def write_mask(mask: np.ndarray, geometry: ImageGeometry, path: str | Path) -> Path:
    """Write a (H, W) mask in the geometry of its source image: PNG (0/255) or a NIfTI volume with the
    source affine, the mask at the source slice and zeros elsewhere."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = (np.asarray(mask) > 0).astype(np.uint8)
    if str(path).lower().endswith(NIFTI_SUFFIXES):
        import nibabel as nib

        affine = geometry.affine if geometry.affine is not None else np.eye(4)
        if geometry.kind == "nifti" and geometry.slice_index is not None:
            shape = geometry.shape[:3]
            vol = np.zeros(shape, np.uint8)
            idx = [slice(None)] * 3
            idx[geometry.axis if geometry.axis is not None else 2] = geometry.slice_index
            vol[tuple(idx)] = m
        else:
            vol = m[..., None]
        nib.save(nib.Nifti1Image(vol, affine), str(path))
    else:
        from PIL import Image

        Image.fromarray(m * 255).save(path)
    return path


__all__ = ["WINDOWS", "ImageGeometry", "image_kind", "load_image", "read_image", "read_mask", "write_mask"]
