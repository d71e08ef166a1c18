"""greenprop: cheaper neural-network training by doing less backpropagation."""

from greenprop.errors import GreenpropError
from greenprop.metering.quantity import Quantity
from greenprop.train.hooks import Controller

__version__ = "0.1.0"

__all__ = ["Controller", "GreenpropError", "Quantity", "__version__"]
