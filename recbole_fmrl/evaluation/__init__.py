"""Matryoshka evaluation: every size in one pass (evaluate), what each size costs (costs), the report."""

from recbole_fmrl.evaluation.costs import size_costs
from recbole_fmrl.evaluation.evaluate import evaluate_all_sizes
from recbole_fmrl.evaluation.report import format_table, report_all_sizes, write_report

__all__ = ["evaluate_all_sizes", "format_table", "report_all_sizes", "size_costs", "write_report"]
