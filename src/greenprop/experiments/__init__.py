"""Experiments: the comparison runner (``greenprop compare``), presets, report, plots, GGD check."""
