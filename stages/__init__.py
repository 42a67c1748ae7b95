"""The stage entry points (`python -m stages.stage1|stage2|stage3`)."""

# First, before any stage imports torch: the medsight package sets OMP_WAIT_POLICY=PASSIVE (spinning OpenMP
# waits made shared-CPU training 3-4x slower), and OpenMP reads it only when torch loads.
import medsight  # noqa: F401
