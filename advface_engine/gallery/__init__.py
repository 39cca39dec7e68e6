"""Gallery jobs: re-protect a stored gallery of embeddings, streamed, resumable and optionally on Ray.

    from advface_engine.gallery import protect_gallery
    protect_gallery("gallery.npy", "protected.npy", shadow="shadow.safetensors", encoder="encoder.safetensors")
"""

from .formats import FORMATS, Chunk, Gallery, format_of, open_gallery
from .job import POLICIES, GalleryResult, protect_gallery

__all__ = ["FORMATS", "POLICIES", "Chunk", "Gallery", "GalleryResult", "format_of", "open_gallery", "protect_gallery"]
