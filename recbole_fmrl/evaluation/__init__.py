"""Matryoshka evaluation (every size, one pass) and sub-model export."""

from recbole_fmrl.evaluation.export import export_submodel, parameter_counts, speaks_matryoshka
from recbole_fmrl.evaluation.matryoshka import evaluate_all_sizes, format_table, size_costs, write_report

__all__ = [
    "evaluate_all_sizes",
    "export_submodel",
    "format_table",
    "parameter_counts",
    "size_costs",
    "speaks_matryoshka",
    "write_report",
]
