"""Layer 4: resolved request + host snapshot -> container adjustment (pure).

The public API of the layer is ``__all__``; code outside ``nri_plugin.adjust`` imports only that.
"""

from nri_plugin.adjust.model import Adjustment, MountEdit
from nri_plugin.adjust.pipeline import Decision, decide
from nri_plugin.adjust.proto import to_proto
from nri_plugin.adjust.select import EMPTY_SELECTION, Selection

__all__ = ["EMPTY_SELECTION", "Adjustment", "Decision", "MountEdit", "Selection", "decide", "to_proto"]
