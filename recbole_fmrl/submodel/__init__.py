"""Sub-models: the size-d prefix of a nested model as an ordinary model (export), and the portable
checkpoint format that stores it without pickled objects (checkpoint)."""

from recbole_fmrl.submodel.checkpoint import read_checkpoint, save_portable
from recbole_fmrl.submodel.export import export_submodel, parameter_counts

__all__ = ["export_submodel", "parameter_counts", "read_checkpoint", "save_portable"]
