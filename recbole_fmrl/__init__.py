"""recbole-fmrl: Matryoshka representation learning for (multimodal) recommendation on RecBole."""

from recbole_fmrl import compat

compat.apply()  # before anything imports RecBole's broken parts


def _wire_into_recbole() -> None:
    """What the plugin adds to RecBole itself: drop reports, and a checkpoint loader that knows our models."""
    import recbole.quick_start as package
    from recbole.quick_start import quick_start

    from recbole_fmrl.data.atomic import install_filter_report
    from recbole_fmrl.quick_start import load_data_and_model

    install_filter_report()
    # RecBole's own load_data_and_model calls a bare torch.load and only knows RecBole's models.
    package.load_data_and_model = load_data_and_model
    quick_start.load_data_and_model = load_data_and_model


_wire_into_recbole()

from recbole_fmrl.config import Config  # noqa: E402
from recbole_fmrl.utils import get_model, get_trainer  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Config", "get_model", "get_trainer", "__version__"]
