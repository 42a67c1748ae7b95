"""Data: the embedded synthetic dataset, readers for the real formats, MONAI transforms, one DataModule.

Batch contract (after collate; every stage relies on it):

task="segmentation" (BiomedParse-style data):
    image       (B, 3, S, S) float32, CLIP-normalised, S = data.image_size
    masks       (B, M, S, S) float32 in {0, 1}; M = most masks of any image in the batch (<= data.max_masks)
    mask_valid  (B, M) bool, False on padding
    labels      (B, M) int64 BiomedParse class id (1..16), -1 on padding
    modality    (B,) int64 index into data.modality_groups
    id, case    list[str] image id (file stem) and case (patient) id
    ann_ids     list[list[str]] annotation ids of the masks, in mask order
task="vqa" (LLaVA-Med VQA form):
    image, modality, id as above; question, answer, answer_type (CLOSED|OPEN): list[str]
task="instruct" (LLaVA conversation form with <mask> or code tokens, mask_orders/mask_files):
    image, modality, id as above; conversations: list[list[{"from", "value"}]];
    masks/mask_valid/labels as above but in `mask_orders` order (the i-th code <-> the i-th mask)
    (labels 0 where the record gives no class); every batch also has `kind`: list[str] (record source:
    biomedparse | vqa | omnimedvqa | instruct | diagseg); vqa batches also `options` (OmniMedVQA dict or None)
several images per sample (PubMedVision rows; vqa and instruct tasks), only when a batch holds such a row:
    images       (N, 3, S, S) every sample's images, sample by sample (N = sum(image_counts)); `image` keeps
                 each sample's first image
    image_counts (B,) int64; the dialogue of such a sample has one <image> per image (vqa batches carry its
                 `conversations`, None for the single-image samples)

Public API (import from the submodules; this package only defines DataError):
    medsight.data.datamodule  MedicalDataModule(cfg, task, collate_fn=None, sources=None): .dataset(split),
                              .records(split), train/val/test_dataloader(), .skipped
    medsight.data.dataset     MedicalDataset(samples, task, split, store, transform, policy), collate(samples)
    medsight.data.transforms  load_transform(image_size), split_transform(cfg, task, split) (MONAI dict transforms)
    medsight.data.io          load_image(path, slice_index=None, axis=2, window=None) -> (H, W, 3) uint8;
                              read_image(...) -> (array, ImageGeometry); read_mask; write_mask; WINDOWS
    medsight.data.formats     FORMATS (name -> reader of a distributed layout: vqa-rad, slake, pathvqa,
                              omnimedvqa, diagseg, pubmedvision, instruct, biomedparse, synthetic), read_format
    medsight.data.readers     Sample, ErrorPolicy, read_biomedparse, read_conversations, read_vqa,
                              read_omnimedvqa, read_diagseg (the original names; code in data.formats)
    medsight.data.synthetic   ensure_synthetic(root, cfg), generate(root, params), split_cases, case_of
    medsight.data.check       run_check(format, path, ...) -> dict;  python -m medsight.data.check FORMAT PATH
"""

from __future__ import annotations


class DataError(ValueError):
    """A dataset file or record is wrong; the message names the file and the field (also as attributes)."""

    def __init__(self, message: str, path: str | None = None, field: str | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.field = field


__all__ = ["DataError"]
