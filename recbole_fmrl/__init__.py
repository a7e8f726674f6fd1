"""recbole-fmrl: Matryoshka representation learning for (multimodal) recommendation on RecBole."""

from recbole_fmrl import compat

compat.apply()

from recbole_fmrl.config import Config  # noqa: E402
from recbole_fmrl.utils import get_model, get_trainer  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Config", "get_model", "get_trainer", "__version__"]
