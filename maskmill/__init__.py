"""maskmill: synthetic segmentation data from Stable Diffusion attention."""
__version__ = "0.1.0"
