"""icnn-pl: deep image reconstruction from CNN features (iCNN, Shen et al. 2019)."""

__version__ = "0.1.0"
