"""dcnc toolkit: DCNv2 tower models, spec files, loading, datasets, training, runners and verification."""

__version__ = "0.1.0"
