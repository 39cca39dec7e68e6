"""Face data: built-in synthetic faces, image folders and numpy arrays."""

from .folders import MAX_IMAGE_PIXELS, ImageFolder, NpyImages, images_from_array, load_image_folder, read_image, take
from .synthetic import render, synthetic_faces

__all__ = ["MAX_IMAGE_PIXELS", "ImageFolder", "NpyImages", "images_from_array", "load_image_folder", "read_image",
           "render", "synthetic_faces", "take"]
