"""Fixed vocabularies shared by every stage: BiomedParse's 17 class ids and the modality groups.

The class list is BiomedParse's (SPEC section 6). Modality groups are configurable (`data.modality_groups`);
the paper uses 18, the embedded synthetic dataset 4.
"""

from __future__ import annotations

#: BiomedParse class ids -> names. Id 0 is background and never has a mask.
CLASSES: dict[int, str] = {
    0: "background",
    1: "liver",
    2: "lung",
    3: "kidney",
    4: "pancreas",
    5: "heart anatomies",
    6: "brain anatomies",
    7: "eye anatomies",
    8: "vessel",
    9: "other organ",
    10: "tumor",
    11: "infection",
    12: "lesion",
    13: "fluid disturbance",
    14: "other abnormality",
    15: "histology structure",
    16: "other",
}
NUM_CLASSES = len(CLASSES)  # 17; the perceiver's class head has NUM_CLASSES + 1 outputs ("no object")
ABNORMAL_CLASS_IDS = (10, 11, 12, 13, 14)

#: The paper's 18 modality groups (names as used for the `paper` overlay).
PAPER_MODALITY_GROUPS = [
    "CT", "MRI", "X-Ray", "Ultrasound", "Pathology", "Endoscopy", "Dermoscopy", "Fundus", "OCT",
    "Microscopy", "PET", "Mammography", "Angiography", "Nuclear", "Histology", "Colonoscopy",
    "Cytology", "Other",
]
#: The embedded synthetic dataset's groups.
SYNTHETIC_MODALITY_GROUPS = ["CT", "MRI", "X-Ray", "Dermoscopy"]


def class_name(class_id: int) -> str:
    """Name of a BiomedParse class id; raises a clear error on an unknown id."""
    if class_id not in CLASSES:
        raise KeyError(f"unknown class id {class_id}; BiomedParse ids are 0..{NUM_CLASSES - 1}")
    return CLASSES[class_id]


def code_token(group: int, index: int) -> str:
    """Name of a region-code token, `[C{group}_{index}]` (SPEC section 1)."""
    return f"[C{group}_{index}]"
