"""Reading other projects' files: open_clip checkpoints (`convert open-clip`) and the released MedSIGHT
checkpoints (`import official`). Nothing here executes code from a file: pickles go through
medsight.safeload."""
