"""Face data: built-in synthetic faces, image folders and numpy arrays."""

from .folders import images_from_array, load_image_folder
from .synthetic import render, synthetic_faces

__all__ = ["images_from_array", "load_image_folder", "render", "synthetic_faces"]
