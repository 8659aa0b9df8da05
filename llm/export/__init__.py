"""Hugging Face export of checkpoints (`llm export`); see `llm.export.convert`."""
from llm.export.convert import ExportSummary, export
from llm.export.layers import ExportError

__all__ = ["ExportError", "ExportSummary", "export"]
