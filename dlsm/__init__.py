"""dlsm: declarative, gin-configured conditional score-based generation (DLSM, Chao et al. ICLR 2022)."""

__version__ = "0.1.0"
