"""Face data: built-in synthetic faces, image folders and numpy arrays."""

from .folders import ImageFolder, NpyImages, images_from_array, load_image_folder, take
from .synthetic import render, synthetic_faces

__all__ = ["ImageFolder", "NpyImages", "images_from_array", "load_image_folder", "render", "synthetic_faces", "take"]
