"""skimbench: one fair protocol for measuring efficient BERT inference methods."""

__version__ = "0.1.0"
