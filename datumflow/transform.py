"""What a `transform.function` imports: the public names for user code in the worker.

The worker's modules move as datumflow grows; user code imports from here, which stays put:

    from datumflow.transform import Datum, DatumTimeout
"""

from __future__ import annotations

from datumflow.functions.worker.inprocess import Datum
from datumflow.functions.worker.userthread import DatumTimeout

__all__ = ["Datum", "DatumTimeout"]
