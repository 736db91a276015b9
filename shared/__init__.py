"""Wire protocol and code used by both the edge daemon and the cloud controller."""

__version__ = "0.1.0"
