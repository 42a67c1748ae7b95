"""Images and masks of the embedded synthetic dataset (medsight.data.synthetic): the four modality groups
(GroupSpec, GROUPS), the target -> class and lesion -> finding tables, and the drawing.

case_params draws one patient's anatomy (organ jitter and shapes, 0..2 lesions) from the case's random stream;
draw_slice renders one slice at stack position t in [-0.5, 0.5] from the slice's stream: an (S, S, 3) float image in
[0, 1] and a bool (S, S) mask per visible target. Every lesion covers < MAX_LESION_FRACTION of the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.ndimage import binary_erosion, gaussian_filter

from medsight.vocab import SYNTHETIC_MODALITY_GROUPS


@dataclass(frozen=True)
class GroupSpec:
    """One modality group of the synthetic dataset (one BiomedParse sub-dataset)."""

    name: str  # modality group name (SYNTHETIC_MODALITY_GROUPS)
    dataset: str  # BiomedParse sub-dataset folder
    prefix: str  # case id prefix
    modality: str  # modality token in file names
    site: str  # site token in file names
    organs: tuple[str, ...]  # organ targets (always present)
    lesions: tuple[str, ...]  # lesion targets (0..2 per case)


GROUPS = (
    GroupSpec("CT", "SynthAbdomenCT", "ct", "CT", "abdomen", ("liver", "left kidney", "right kidney"),
              ("liver tumor", "kidney cyst")),
    GroupSpec("MRI", "SynthBrainMRI", "mr", "MRI", "brain", ("brain",), ("brain tumor", "brain hemorrhage")),
    GroupSpec("X-Ray", "SynthChestXRay", "xr", "X-Ray", "chest", ("left lung", "right lung", "heart"),
              ("left lung infection", "right lung infection")),
    GroupSpec("Dermoscopy", "SynthDermoscopy", "dm", "Dermoscopy", "skin", ("blood vessel",), ("skin lesion",)),
)
assert [g.name for g in GROUPS] == list(SYNTHETIC_MODALITY_GROUPS)

#: target -> BiomedParse class id
TARGET_CLASS = {
    "liver": 1, "left kidney": 3, "right kidney": 3, "liver tumor": 10, "kidney cyst": 13,
    "brain": 6, "brain tumor": 10, "brain hemorrhage": 14,
    "left lung": 2, "right lung": 2, "heart": 5, "left lung infection": 11, "right lung infection": 11,
    "blood vessel": 8, "skin lesion": 12,
}
#: lesion target -> (finding word, organ/location phrase)
FINDING = {
    "liver tumor": ("tumor", "liver"), "kidney cyst": ("cyst", "kidney"),
    "brain tumor": ("tumor", "brain"), "brain hemorrhage": ("hemorrhage", "brain"),
    "left lung infection": ("infection", "left lung"), "right lung infection": ("infection", "right lung"),
    "skin lesion": ("lesion", "skin"),
}
MAX_LESION_FRACTION = 0.02  # each lesion covers less than this share of the image


# ------------------------------------------------------------------------------------------ shapes
def _blob(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float, angle: float = 0.0,
          harm: np.ndarray | None = None) -> np.ndarray:
    """Irregular ellipse: boundary radius 1 + sum_k a_k cos(k theta + p_k). harm: (K, 2) amps/phases."""
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    u, v = (c * dx + s * dy) / rx, (-s * dx + c * dy) / ry
    r = np.sqrt(u * u + v * v)
    bound = np.ones_like(r)
    if harm is not None:
        theta = np.arctan2(v, u)
        for k, (a, p) in enumerate(harm, start=2):
            bound = bound + a * np.cos(k * theta + p)
    return r <= bound


def _harm(rng: np.random.Generator, amp: float, k: int = 3) -> np.ndarray:
    return np.stack([rng.uniform(0, amp, k), rng.uniform(0, 2 * np.pi, k)], 1)  # (K, 2)


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Low-frequency texture in about [-1, 1]. (S, S)"""
    n = gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma)
    return n / (np.abs(n).max() + 1e-6)


def _lesion(yy, xx, rng: np.random.Generator, organ: np.ndarray, cy: float, cx: float, r: float,
            harm: np.ndarray, size: int) -> np.ndarray:
    """A lesion blob inside `organ`, shrunk until it covers < MAX_LESION_FRACTION of the image."""
    limit = MAX_LESION_FRACTION * 0.9 * size * size
    for _ in range(6):
        m = _blob(yy, xx, cy, cx, r, r * 0.9, 0.0, harm) & organ
        if m.sum() < limit:
            return m
        r *= 0.8
    return m & False


# ----------------------------------------------------------------------------------------- cases
def case_params(group: GroupSpec, rng: np.random.Generator, lesion_free: bool) -> dict[str, Any]:
    """Per-patient anatomy: organ positions/sizes/shapes and the lesions the patient has."""
    j = lambda s: rng.uniform(-s, s)
    p: dict[str, Any] = {"jit": {k: (j(0.03), j(0.03), 1 + j(0.12), 1 + j(0.12), j(0.25)) for k in group.organs},
                         "harm": {k: _harm(rng, 0.08) for k in group.organs}, "tone": 1 + j(0.08)}
    n_les = 0 if lesion_free else int(rng.integers(1, min(2, len(group.lesions)) + 1))
    chosen = list(rng.choice(len(group.lesions), size=n_les, replace=False)) if n_les else []
    p["lesions"] = [
        dict(target=group.lesions[i], u=rng.uniform(-0.45, 0.45), v=rng.uniform(-0.45, 0.45),  # noqa: C408
             r=rng.uniform(0.035, 0.065), harm=_harm(rng, 0.15), side=int(rng.integers(0, 2)))
        for i in sorted(chosen)
    ]
    if group.name == "Dermoscopy":
        p["skin"] = np.array([0.86, 0.66, 0.55]) * (1 + rng.uniform(-0.08, 0.08, 3))
        p["vessel"] = dict(y0=rng.uniform(0.3, 0.7), amp=rng.uniform(0.04, 0.1), lam=rng.uniform(0.25, 0.5),  # noqa: C408
                           ph=rng.uniform(0, 2 * np.pi), w=rng.uniform(1.3, 2.2), x0=rng.uniform(0.2, 0.3),
                           x1=rng.uniform(0.7, 0.8))
    return p


def _organ_geom(p: dict, name: str, base: tuple[float, float, float, float], t: float, size: int):
    """Organ (cy, cx, ry, rx, angle) in pixels at slice position t in [-0.5, 0.5]."""
    dy, dx, sy, sx, ang = p["jit"][name]
    cy, cx, ry, rx = base
    scale = 1.0 - 0.5 * t * t  # organs shrink towards the ends of the stack
    return ((cy + dy + 0.02 * t) * size, (cx + dx) * size, ry * sy * scale * size, rx * sx * scale * size, ang)


def draw_slice(group: GroupSpec, p: dict, t: float, rng: np.random.Generator, size: int):
    """One slice: image (S, S, 3) float in [0, 1] and objects [(target, mask (S, S) bool)]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    objs: list[tuple[str, np.ndarray]] = []
    organs: dict[str, np.ndarray] = {}
    les_scale = 1.0 - 1.2 * t * t  # lesions are 3D blobs: smaller on the outer slices

    def organ(name, base):
        g = _organ_geom(p, name, base, t, size)
        m = _blob(yy, xx, *g, harm=p["harm"][name])
        organs[name] = m
        return m, g

    def lesion_mask(les, host: np.ndarray, g):
        cy, cx, ry, rx, _ = g
        return _lesion(yy, xx, rng, host, cy + les["v"] * ry, cx + les["u"] * rx, les["r"] * size * les_scale,
                       les["harm"], size)

    if group.name == "CT":
        img = np.full((size, size), 0.03, np.float32)
        body = _blob(yy, xx, 0.5 * size, 0.5 * size, 0.36 * size, 0.46 * size, 0.0, p["harm"]["liver"] * 0.3)
        img[body] = 0.36 * p["tone"]
        img[_blob(yy, xx, 0.74 * size, 0.5 * size, 0.05 * size, 0.05 * size)] = 0.95  # spine (unlabelled)
        liver, gl = organ("liver", (0.42, 0.32, 0.17, 0.15))
        img[liver] = 0.58 + 0.04 * _smooth_noise(rng, size, 3)[liver]
        geo = {"liver": gl}
        for name, cx in (("right kidney", 0.33), ("left kidney", 0.67)):  # patient's right on image left
            m, g = organ(name, (0.6, cx, 0.065, 0.045))
            img[m] = 0.8
            geo[name] = g
        objs += [(k, organs[k]) for k in group.organs]
        for les in p["lesions"]:
            if les["target"] == "liver tumor":
                m = lesion_mask(les, liver, gl)
                img[m] = 0.28
            else:  # kidney cyst in one kidney
                host = "left kidney" if les["side"] else "right kidney"
                les = dict(les, u=les["u"] * 0.5, v=les["v"] * 0.5, r=les["r"] * 0.6)
                m = lesion_mask(les, organs[host], geo[host])
                img[m] = 0.15
            objs.append((les["target"], m))
        img = img + rng.normal(0, 0.045, img.shape).astype(np.float32)  # CT noise
        rgb = np.repeat(img[..., None], 3, -1)
    elif group.name == "MRI":
        img = np.zeros((size, size), np.float32)
        cy, cx, ry, rx, _ = _organ_geom(p, "brain", (0.5, 0.5, 0.38, 0.31), t, size)
        skull = _blob(yy, xx, cy, cx, ry * 1.1, rx * 1.12, 0.0)
        img[skull] = 0.85
        brain, gb = organ("brain", (0.5, 0.5, 0.38, 0.31))
        img[brain] = 0.45 + 0.07 * _smooth_noise(rng, size, 2.5)[brain] * p["tone"]
        for side in (-1, 1):  # ventricles (unlabelled)
            img[_blob(yy, xx, cy, cx + side * 0.06 * size, 0.09 * size, 0.025 * size, side * 0.3)] = 0.25
        objs.append(("brain", brain))
        for les in p["lesions"]:
            m = lesion_mask(les, brain, gb)
            if les["target"] == "brain tumor":  # ring-enhancing: bright rim, dark core
                core = binary_erosion(m, iterations=2)
                img[m] = 0.95
                img[core] = 0.3
            else:
                img[m] = 0.05
            objs.append((les["target"], m))
        img = gaussian_filter(img, 0.8) + rng.normal(0, 0.01, img.shape).astype(np.float32)
        rgb = np.repeat(img[..., None], 3, -1)
    elif group.name == "X-Ray":
        body = _blob(yy, xx, 0.55 * size, 0.5 * size, 0.6 * size, 0.47 * size)
        img = np.where(body, 0.55 + 0.25 * (yy / size) - 0.15 * np.abs(xx / size - 0.5), 0.04).astype(np.float32)
        heart, _ = organ("heart", (0.6, 0.56, 0.14, 0.13))
        ribs = 0.05 * np.sin(yy / size * 2 * np.pi * 7 + 0.5 * np.sin(xx / size * 6))
        lungs = {}
        for name, cx in (("right lung", 0.3), ("left lung", 0.7)):
            m, g = organ(name, (0.45, cx, 0.28, 0.14))
            m = m & ~heart
            organs[name] = lungs[name] = m
            img[m] = 0.16 + ribs[m]
        img[heart] = 0.78
        objs += [("left lung", lungs["left lung"]), ("right lung", lungs["right lung"]), ("heart", heart)]
        haze = np.zeros_like(img)
        for les in p["lesions"]:
            host = "left lung" if les["target"].startswith("left") else "right lung"
            g = _organ_geom(p, host, (0.45, 0.7 if host == "left lung" else 0.3, 0.28, 0.14), t, size)
            m = lesion_mask(dict(les, r=les["r"] * 1.2), lungs[host], g)
            haze[m] = 0.38
            objs.append((les["target"], m))
        img = gaussian_filter(img + gaussian_filter(haze, 0.7), 0.7)
        rgb = np.repeat(img[..., None], 3, -1)
    else:  # Dermoscopy
        tex = _smooth_noise(rng, size, 4)
        rgb = p["skin"][None, None, :] * (1 + 0.06 * tex[..., None])
        fov = _blob(yy, xx, 0.5 * size, 0.5 * size, 0.56 * size, 0.56 * size)
        vs = p["vessel"]
        x0, x1 = vs["x0"] * size, vs["x1"] * size
        shift = 0.02 * t * size
        ycurve = (vs["y0"] * size + shift + vs["amp"] * size * np.sin(2 * np.pi * xx / (vs["lam"] * size) + vs["ph"]))
        vessel = (np.abs(yy - ycurve) <= vs["w"]) & (xx >= x0) & (xx <= x1) & fov
        rgb[vessel] = np.array([0.72, 0.16, 0.18])
        objs.append(("blood vessel", vessel))
        for les in p["lesions"]:
            m = lesion_mask(les, fov & ~vessel, (0.5 * size, 0.5 * size, 0.3 * size, 0.3 * size, 0))
            core = binary_erosion(m, iterations=2)
            rgb[m] = np.array([0.42, 0.25, 0.15])
            rgb[core] = np.array([0.28, 0.15, 0.08])
            objs.append((les["target"], m))
        rgb = rgb + rng.normal(0, 0.015, rgb.shape)
        rgb[~fov] = 0.02
    return np.clip(rgb, 0, 1), [(n, m) for n, m in objs if m.any()]
