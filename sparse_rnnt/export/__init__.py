"""Export a pruned pathway to a compact artifact (dense, 2:4, BSR, bitmap) and load it back."""

from .artifact import Artifact, ExportOptions, export_checkpoint, load_artifact
from .formats import FORMATS

__all__ = ["FORMATS", "Artifact", "ExportOptions", "export_checkpoint", "load_artifact"]
