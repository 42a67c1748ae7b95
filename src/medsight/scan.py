"""An uploaded scan, held in a private folder for the web app: PNG/JPEG, one DICOM file, a zipped DICOM series
or a NIfTI volume, read slice by slice with the same reader (`medsight.data.io.read_image`) and the same CT
window presets as `medsight predict`.

An upload is moved (never copied) into its folder under a neutral name (`scan.<suffix>`), so neither the
original file name nor any DICOM header field reaches an output, an error message or a log line. A zipped
series is unpacked member by member into numbered files (member names are never used as paths) and stacked
into one NIfTI volume (MONAI's PydicomReader orders the slices by position), which is then read like any
NIfTI upload.
"""

from __future__ import annotations

import os
import shutil
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsight.data import DataError

KINDS = {"image": "PNG/JPEG", "dicom": "DICOM", "dicom_series": "zipped DICOM series", "nifti": "NIfTI"}
SUPPORTED = "PNG/JPEG, a DICOM file (.dcm), a zipped DICOM series (.zip) or a NIfTI volume (.nii/.nii.gz)"
#: Limits on a zipped series: members and total uncompressed bytes (a zip bomb stops with a message).
MAX_ZIP_MEMBERS = 5000
MAX_ZIP_BYTES = 4 * 1024**3


@dataclass
class Scan:
    """A readable upload: `path` (inside the scan's private folder), `kind` (a KINDS key) and `shape` (the
    volume's shape for NIfTI and series, frames x rows x columns for multi-frame DICOM, else (H, W))."""

    path: str
    kind: str
    shape: tuple[int, ...]

    @property
    def is_volume(self) -> bool:
        """True when there is more than one slice to choose from."""
        if self.kind in ("nifti", "dicom_series"):
            return len(self.shape) >= 3 and max(self.shape[:3]) > 1
        return self.kind == "dicom" and len(self.shape) == 3

    def num_slices(self, axis: int = 2) -> int:
        """How many slices lie along `axis` (1 for a 2D image; frames for multi-frame DICOM)."""
        if self.kind == "dicom":
            return self.shape[0] if len(self.shape) == 3 else 1
        if self.kind == "image" or len(self.shape) < 3:
            return 1
        return int(self.shape[axis])

    def read(self, slice_index: int | None = None, axis: int = 2, window: str | None = None):
        """(H, W, 3) uint8 and its `ImageGeometry` (see `medsight.data.io.read_image`); `window` is a preset
        name, "auto", "minmax" or "CENTER,WIDTH" as for `medsight predict`. Errors name "the upload", not
        the server's folder."""
        from medsight.data.io import read_image
        from medsight.predict import parse_window

        w = parse_window(window)
        kind_axis = axis if self.kind in ("nifti", "dicom_series") else 2
        try:
            return read_image(self.path, slice_index=slice_index, axis=kind_axis, window=w)
        except DataError as err:  # the first cause only (MONAI's reader list and tracebacks say nothing here)
            message = scrub(str(err).split("; MONAI:")[0], self.path)[:300]
            if "(" in message and not message.endswith(")"):
                message += ")"
            raise DataError(message, field=getattr(err, "field", None)) from None
        except Exception as err:  # noqa: BLE001 -- a decoder failure on the user's file: one clear line
            raise DataError(f"the upload: cannot read it as {KINDS[self.kind]} ({scrub(str(err), self.path)[:200]})") \
                from None


def scrub(message: str, path: str) -> str:
    """`message` with the private path (and its folder) replaced by "the upload"."""
    folder = str(Path(path).parent)
    return " ".join(message.replace(path, "the upload").replace(folder, "the upload's folder").split())


def kind_of(name: str) -> str:
    """image | dicom | dicom_series | nifti, from an upload's file name (no suffix: DICOM, as scanners
    write them); anything else is a DataError listing what is supported."""
    from medsight.data.io import DICOM_SUFFIXES, NIFTI_SUFFIXES, PNG_SUFFIXES

    low = name.lower()
    if low.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if low.endswith(".zip"):
        return "dicom_series"
    if low.endswith(DICOM_SUFFIXES) or not Path(low).suffix:
        return "dicom"
    if low.endswith(PNG_SUFFIXES):
        return "image"
    raise DataError(f"unsupported file type '{Path(low).suffix}': upload {SUPPORTED}", field="image")


def open_upload(upload: str | Path, folder: str | Path) -> Scan:
    """Move `upload` into `folder` (created, private) and check that it can be read; returns the Scan."""
    upload = Path(upload)
    if not upload.is_file():
        raise DataError("no file was uploaded", field="image")
    kind = kind_of(upload.name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    suffix = ".nii.gz" if upload.name.lower().endswith(".nii.gz") else upload.suffix.lower()
    target = folder / f"scan{suffix}"
    shutil.move(str(upload), target)
    if kind == "dicom_series":
        return _series_scan(target, folder)
    if kind == "nifti":
        try:
            import nibabel as nib

            shape = tuple(int(s) for s in nib.load(str(target)).shape)
        except Exception as err:  # noqa: BLE001
            raise DataError(f"the upload: cannot read it as NIfTI ({scrub(str(err), str(target))[:200]})") from None
        scan = Scan(str(target), kind, shape)
    elif kind == "dicom":
        frames = _dicom_frames(target)
        scan = Scan(str(target), kind, (frames, 0, 0) if frames > 1 else (0, 0))
    else:
        scan = Scan(str(target), kind, (0, 0))
    rgb, _ = scan.read()  # fails here, with a message, when the file is unreadable
    if kind != "nifti":
        scan.shape = (scan.shape[0], *rgb.shape[:2]) if len(scan.shape) == 3 else tuple(rgb.shape[:2])
    return scan


def _dicom_frames(path: Path) -> int:
    try:
        import pydicom

        return int(pydicom.dcmread(str(path), stop_before_pixels=True).get("NumberOfFrames", 1) or 1)
    except Exception:  # noqa: BLE001 -- read_image reports an unreadable file with its own message
        return 1


def _series_scan(archive: Path, folder: Path) -> Scan:
    """Unpack the DICOM members of `archive` as 00000.dcm, 00001.dcm, ... and stack them into scan.nii.gz."""
    import nibabel as nib
    import pydicom

    series = folder / "series"
    series.mkdir(mode=0o700)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.is_dir() and not _hidden(m.filename)]
            if len(members) > MAX_ZIP_MEMBERS:
                raise DataError(f"the upload: the zip holds {len(members)} files; at most {MAX_ZIP_MEMBERS}")
            if sum(m.file_size for m in members) > MAX_ZIP_BYTES:
                raise DataError(f"the upload: the zip unpacks to more than {MAX_ZIP_BYTES // 1024**3} GiB")
            uids: dict[str, int] = {}
            for i, member in enumerate(members):
                out = series / f"{i:05d}.dcm"
                with zf.open(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                try:
                    header = pydicom.dcmread(str(out), stop_before_pixels=True)
                except Exception:  # noqa: BLE001 -- not DICOM (a README, a DICOMDIR index, ...): skipped
                    out.unlink()
                    continue
                if "ImagePositionPatient" not in header and "Rows" not in header:
                    out.unlink()
                    continue
                uid = str(header.get("SeriesInstanceUID", ""))
                uids[uid] = uids.get(uid, 0) + 1
    except zipfile.BadZipFile:
        raise DataError("the upload: not a readable zip file") from None
    finally:
        archive.unlink(missing_ok=True)
    if not uids:
        raise DataError("the upload: the zip holds no DICOM image files")
    if len(uids) > 1:
        raise DataError(f"the upload: the zip holds {len(uids)} DICOM series ({sorted(uids.values())} files); "
                        "zip one series at a time")
    from monai.data import PydicomReader
    from monai.transforms import LoadImage

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vol, meta = LoadImage(reader=PydicomReader(swap_ij=False), image_only=False, dtype=np.float32)(str(series))
        vol = np.asarray(vol)
        affine = np.asarray(meta.get("original_affine", meta.get("affine")), np.float64)
    except Exception as err:  # noqa: BLE001
        raise DataError(f"the upload: cannot read the DICOM series ({scrub(str(err), str(series))[:200]})") from None
    finally:
        shutil.rmtree(series, ignore_errors=True)
    if vol.ndim == 2:
        vol = vol[..., None]
    target = folder / "scan.nii.gz"
    nib.save(nib.Nifti1Image(vol.astype(np.float32), affine), str(target))
    return Scan(str(target), "dicom_series", tuple(int(s) for s in vol.shape))


def _hidden(name: str) -> bool:
    """macOS resource forks, hidden files and DICOMDIR indexes are not slices (".." in a name is no path here)."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return not parts or any(p.startswith(".") or p == "__MACOSX" for p in parts) or parts[-1].upper() == "DICOMDIR"


def remove_folder(folder: str | Path | None) -> None:
    """Delete a scan's or a request's folder and everything in it (missing: nothing to do)."""
    if folder and os.path.isdir(folder):
        shutil.rmtree(folder, ignore_errors=True)


__all__ = ["KINDS", "SUPPORTED", "Scan", "kind_of", "open_upload", "remove_folder", "scrub"]
