"""Tracking: metrics.jsonl, progress bar, summary table, curves."""

from fedlora.tracking.metrics import MetricsLog
from fedlora.tracking.report import RoundProgress, plot_curves, summary_table

__all__ = ["MetricsLog", "RoundProgress", "plot_curves", "summary_table"]
