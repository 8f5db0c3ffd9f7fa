"""fedrec: federated, differentially private search and recommendation for regional silos.

This package stays import-light (no torch) so that every part, the torch-free edge runtime
included, can depend on it.
"""

__version__ = "0.1.0"
