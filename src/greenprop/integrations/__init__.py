"""Adapters that run greenprop's methods inside other trainers.

- :mod:`greenprop.integrations.lightning`: ``GreenpropCallback`` for PyTorch Lightning
  (``pip install 'greenprop[lightning]'``);
- :mod:`greenprop.integrations.hf`: ``GreenpropCallback`` and ``GreenpropTrainer`` for the
  Hugging Face Trainer (``pip install 'greenprop[text]'``);
- :mod:`greenprop.integrations.driver`: what both share (controllers, FLOP counting,
  state), and :class:`~greenprop.integrations.driver.EpochShuffle`, a sampler whose order
  depends only on the seed and the epoch.

The framework modules are not imported here, so importing this package needs neither.
"""
