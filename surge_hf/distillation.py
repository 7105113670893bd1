"""Removed: merged into `surge_hf.objective`. This module only names the new home (for one release)."""

raise ImportError(
    "surge_hf.distillation was merged into surge_hf.objective: import DistillationConfig, compute_loss, "
    "logits_distillation_loss, layerwise_mse and soft_cross_entropy from surge_hf.objective (DistillationConfig and "
    "compute_loss also from surge_hf). See CHANGELOG.md."
)
