"""DM-FNet science: networks, diffusion, losses, fusion pipeline (no HTTP, no DICOM)."""

__version__ = "0.1.0"
