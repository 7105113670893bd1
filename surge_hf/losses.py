"""Removed: the auxiliary loss is collected, not stored (`surge_hf.aux_loss`). This module only names what replaces
it (for one release)."""

raise ImportError(
    "surge_hf.losses was removed, and auxiliary_loss(model) with it: the auxiliary loss is collected during the "
    "forward pass. Use `with surge_hf.collect_auxiliary_loss() as aux: outputs = model(**batch)` and add aux.total() "
    "to the loss; a SURGE model also returns it as outputs.aux_loss, included in outputs.loss, and "
    "surge_hf.objective.compute_loss counts it once. See CHANGELOG.md."
)
