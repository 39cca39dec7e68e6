"""advface-engine: adversarial facial features that keep recognition and defeat reconstruction.

    import advface_engine as afe
    z_adv = afe.protect(z, shadow=S, encoder=E, config=afe.ProtectConfig())   # z: a tensor or a NumPy array

``afe.errors`` holds the typed refusals (all ValueErrors), ``afe.backends`` the backend protocol and registry.
"""

from . import backends, errors
from .config import ProtectConfig
from .models import build_model, load_encoder, load_model, save_model
from .principal import principal_directions
from .protect import Protector, protect

__version__ = "0.2.0"
__all__ = ["ProtectConfig", "Protector", "__version__", "backends", "build_model", "errors", "load_encoder",
           "load_model", "principal_directions", "protect", "save_model"]
