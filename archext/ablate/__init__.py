"""``archext ablate``: train small variants of one base config on the same data, seed and token
budget, and report them side by side (see ``archext ablate --help``)."""
from .runner import DEFAULT_SWEEP_LRS, AblateJob, run
from .train import TrainSettings
from .variants import DEFAULT_VARIANTS, Variant, VariantError

__all__ = ["AblateJob", "run", "TrainSettings", "Variant", "VariantError", "DEFAULT_VARIANTS",
           "DEFAULT_SWEEP_LRS"]
