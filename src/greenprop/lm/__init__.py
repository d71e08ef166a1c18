"""Causal language modelling: the next-token task (:mod:`greenprop.lm.task`)."""
