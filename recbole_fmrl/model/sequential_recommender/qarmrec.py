"""QARMRec: fMRLRec whose items are the trainable embeddings of their QARM codes.

"QARM: Quantitative Alignment Multi-Modal Recommendation at Kuaishou" (arXiv 2411.11739), the first open
implementation: frozen multimodal features are aligned to behaviour (InfoNCE on U2I/I2I pairs of the
training split), quantised into RQ-Kmeans and VQ codes, and the codes' embeddings train end to end with the
nested LRU encoder. The code embeddings are Matryoshka like everything else, so every size exports.
Defaults: ``properties/model/fMRLRec.yaml``, then ``properties/model/QARMRec.yaml``.
"""

from __future__ import annotations

from recbole_fmrl.errors import ConfigError
from recbole_fmrl.model.sequential_recommender.fmrlrec import fMRLRec


class QARMRec(fMRLRec):
    """fMRLRec with ``item_tower: qarm`` (see ``recbole_fmrl.model.layers.item_tower.QARMItemTower``)."""

    @classmethod
    def check_config(cls, config) -> None:
        if config["item_tower"] != "qarm":
            raise ConfigError(
                f"QARMRec needs item_tower: qarm (got {config['item_tower']!r}); for another tower use fMRLRec."
            )
        super().check_config(config)
