"""`medsight predict`: answer a question about one image and save what the answer points at.

Writes into `out`:
  answer.json   the text (with its code tokens) and, per region, the region schema of `MedSight.answer`
                (code, class_name, score, box [x0, y0, x1, y1) in input pixels, area in pixels, image_index)
                with `mask_files` in place of the mask;
  mask_<i>.png  one binary mask per region, at the input image's size;
  mask_<i>.nii.gz  for NIfTI input also the mask in the input volume's geometry (the chosen slice);
  overlay.png   the image with every mask tinted, outlined and labelled.
An image that cannot be read is an error naming the file: the model never answers without its image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from medsight.data import DataError

#: RGB colours for the regions of one image, by region index.
COLOURS = [(230, 25, 25), (25, 190, 50), (40, 90, 240), (240, 205, 25), (205, 50, 215), (25, 215, 215),
           (255, 128, 0), (140, 90, 40), (150, 230, 100), (240, 140, 180)]


def parse_window(window: str | None) -> None | str | tuple[float, float]:
    """'abdomen' (a preset name) or 'CENTER,WIDTH' in HU."""
    from medsight.data.io import WINDOWS

    if window is None:
        return None
    if "," not in window:
        if window not in WINDOWS and window not in ("auto", "minmax"):
            raise DataError(f"--window {window!r}: choose a preset from {sorted(WINDOWS) + ['auto', 'minmax']} "
                            "or give CENTER,WIDTH", field="window")
        return window
    try:
        center, width = (float(x) for x in window.split(","))
    except ValueError:
        raise DataError(f"--window {window!r}: expected a preset name or CENTER,WIDTH", field="window") from None
    return center, width


def bbox_xywh(mask: np.ndarray) -> list[int] | None:
    """[x, y, w, h] of the mask's foreground in pixels, None when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def draw_overlay(image: np.ndarray, regions: list[dict], alpha: float = 0.45, min_side: int = 512) -> Any:
    """A PIL image: `image` (H, W, 3) uint8 with each region's mask tinted, outlined and labelled (class
    name, else code). Small images are enlarged (whole factor, nearest) so the labels stay legible."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    h, w = image.shape[:2]
    scale = max(1, -(-min_side // max(h, w)))  # ceil

    def big(array: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(array).resize((w * scale, h * scale), Image.NEAREST))

    canvas = big(image).astype(np.float32)
    masks = [big(np.asarray(r["mask"], bool).astype(np.uint8) * 255) > 0 for r in regions]
    edges = []
    for i, mask in enumerate(masks):
        colour = np.array(COLOURS[i % len(COLOURS)], np.float32)
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * colour
        m_img = Image.fromarray(mask.astype(np.uint8) * 255)
        inner = np.asarray(m_img.filter(ImageFilter.MinFilter(3))) > 0
        edges.append((mask & ~inner, colour))
    for edge, colour in edges:
        canvas[edge] = colour
    picture = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for i, (region, mask) in enumerate(zip(regions, masks)):
        box = bbox_xywh(mask)
        if box is None:
            continue
        label = region.get("class_name") or region.get("code") or f"region {i}"
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        tw, th = right - left, bottom - top
        x = min(max(box[0], 0), max(picture.width - tw - 2, 0))  # keep the label inside the picture
        y = box[1] - th - 3 if box[1] >= th + 3 else min(box[1] + box[3] + 1, picture.height - th - 2)
        draw.rectangle((x - 1, y - 1, x + tw + 1, y + th + 2), fill=(0, 0, 0))
        draw.text((x - left, y - top), label, fill=COLOURS[i % len(COLOURS)], font=font)
    return picture


def _read(image: str | Path, slice_index: int | None, axis: int, window: str | None):
    from medsight.data.io import read_image

    path = Path(image)
    if not path.exists():
        raise DataError(f"{path}: image file not found", path=str(path))
    window_value = parse_window(window)
    try:
        return read_image(path, slice_index=slice_index, axis=axis, window=window_value)
    except Exception as err:  # noqa: BLE001 -- any decoder failure: the user's unreadable file, in one line
        cause = " ".join(str(err).split("; MONAI:")[0].split())
        cause = cause if cause.startswith(str(path)) else f"{path}: cannot read image ({cause})"
        raise DataError(cause[:300] + (")" if "(" in cause[:300] and not cause[:300].endswith(")") else ""),
                        path=str(path)) from None


def predict(export: str | Path, image: str | Path, question: str, out: str | Path,
            slice_index: int | None = None, axis: int = 2, window: str | None = None,
            model: Any = None, device: str | None = None) -> dict:
    """Answer `question` about `image` with the export and write answer.json, masks and overlay.png."""
    if not question.strip():
        raise DataError("--question is empty", field="question")
    rgb, geometry = _read(image, slice_index, axis, window)  # before loading the model: fail fast
    if model is None:
        import torch

        import medsight

        model = medsight.load(export, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    answer = model.answer(rgb, question)
    return write_answer(answer, rgb, geometry, question, out, image_label=str(image))


def region_json(region: dict, mask_files: dict[str, str]) -> dict:
    """One region of `MedSight.answer` as JSON (the same fields, `mask_files` in place of the mask); box
    and area are recomputed from the mask so that answer.json always agrees with the mask files."""
    from medsight.model import mask_box

    mask = np.asarray(region["mask"], bool)
    return {"code": region.get("code"), "class_name": region.get("class_name"),
            "score": float(region.get("score", float("nan"))), "box": mask_box(mask), "area": int(mask.sum()),
            "image_index": int(region.get("image_index", 0)), "mask_files": mask_files}


def write_answer(answer: dict, rgb: np.ndarray, geometry: Any, question: str, out: str | Path,
                 image_label: str) -> dict:
    """Write answer.json, mask_<i>.png (+ mask_<i>.nii.gz for NIfTI input) and overlay.png into `out` for
    `answer` (from `MedSight.answer`) about `rgb`; returns answer.json's content. `image_label` is what
    answer.json names as the image (the path for the CLI)."""
    out = Path(out)
    try:
        return _write_answer(out, answer, rgb, geometry, question, image_label)
    except OSError as err:  # full disk, unwritable folder: one line naming the path
        from medsight.atomic import OutputError, describe_os_error

        raise OutputError(describe_os_error(getattr(err, "filename", None) or out, err)) from None


def _write_answer(out: Path, answer: dict, rgb: np.ndarray, geometry: Any, question: str, image_label: str) -> dict:
    """answer.json is the entry point of the folder: the old one goes first, every file is written
    atomically (medsight.atomic) and answer.json last, so a reader never finds an answer.json that refers
    to missing or half-written masks (a failure leaves no answer.json)."""
    from PIL import Image

    from medsight.atomic import atomic_file, check_writable, write_text
    from medsight.data.io import write_mask

    check_writable(out)
    (out / "answer.json").unlink(missing_ok=True)
    for stale in [*out.glob("mask_*.png"), *out.glob("mask_*.nii.gz")]:  # from an earlier answer
        stale.unlink()
    regions = []
    for i, region in enumerate(answer.get("regions", [])):
        mask = np.asarray(region["mask"], bool)
        if mask.shape != rgb.shape[:2]:
            raise RuntimeError(f"region {i}: mask shape {mask.shape} is not the image size {rgb.shape[:2]}")
        files = {"png": f"mask_{i}.png"}
        with atomic_file(out / files["png"]) as f:
            Image.fromarray(mask.astype(np.uint8) * 255).save(f, format="PNG")
        if geometry.kind == "nifti":
            files["nifti"] = f"mask_{i}.nii.gz"
            write_mask(mask, geometry, out / files["nifti"])
        regions.append(region_json(region, files))
    with atomic_file(out / "overlay.png") as f:
        draw_overlay(rgb, answer.get("regions", [])).save(f, format="PNG")
    result = {"question": question, "image": image_label, "image_size": list(rgb.shape[:2]),
              "slice": geometry.slice_index, "axis": geometry.axis, "window": geometry.window,
              "text": answer["text"], "regions": regions}
    write_text(out / "answer.json", json.dumps(result, indent=1))
    return result
