"""The synthetic/LLaVA-form readers under their original import names (the code lives in
`medsight.data.formats`, one module per layout; the table of every format is `medsight.data.formats.FORMATS`)."""

from __future__ import annotations

from medsight.data.formats.biomedparse import read_biomedparse
from medsight.data.formats.common import MASK_TOKEN, SPLITS, ErrorPolicy, PathMap, Sample, modality_index
from medsight.data.formats.diagseg import read_diagseg
from medsight.data.formats.llava import read_conversations, read_vqa, vqa_as_conversation
from medsight.data.formats.omnimedvqa import read_omnimedvqa

__all__ = [
    "MASK_TOKEN",
    "SPLITS",
    "ErrorPolicy",
    "PathMap",
    "Sample",
    "modality_index",
    "read_biomedparse",
    "read_conversations",
    "read_diagseg",
    "read_omnimedvqa",
    "read_vqa",
    "vqa_as_conversation",
]
