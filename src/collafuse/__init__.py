"""collafuse: collaborative diffusion models (CollaFuse, arXiv 2406.14429).

Clients keep private data and a private denoiser for the low-noise steps 1..t_zeta; one shared
server denoiser owns the high-noise steps t_zeta+1..T and learns only from the clients'
noised uploads x_{t_zeta}.
"""

from .client import Client, Upload
from .config import Config
from .errors import CollafuseError, ConfigError, UploadRejected
from .models import Denoiser
from .schedule import NoiseSchedule
from .server import Server
from .split import Split

__version__ = "0.1.0"

__all__ = ["Client", "CollafuseError", "Config", "ConfigError", "Denoiser", "NoiseSchedule", "Server", "Split",
           "Upload", "UploadRejected", "__version__"]
