"""Federated GradSamp on Flower: strategies that replace whole rounds by a GGD draw.

Import :mod:`greenprop.fl.offline` first (it sets Flower's telemetry/update-check
switches before ``flwr`` is imported); the strategies live in
:mod:`greenprop.fl.strategies`, the client-side terms in :mod:`greenprop.fl.local`, the
client partitions in :mod:`greenprop.fl.partitions`.
"""
