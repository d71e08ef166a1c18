"""The reference trainer behind ``greenprop train``: config, loop, checkpoints, evaluation."""
