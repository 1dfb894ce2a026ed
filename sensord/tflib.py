"""TensorFlow, imported quietly and in one place: training, the latent-space plot and the benchmark workers.

The daemon never imports TensorFlow (it serves with LiteRT). Where TensorFlow is
needed, it comes through :func:`import_tensorflow`, which is also the one place
``TF_CPP_MIN_LOG_LEVEL`` is set: TensorFlow's C++ start-up chatter (CUDA probes,
oneDNN notes) goes straight to file descriptor 2, so a training log stays
readable only if the variable is set, and fd 2 pointed elsewhere, before the
first import.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any


def import_tensorflow() -> tuple[Any, Any]:
    """``(keras, tensorflow)``, the first import with its C++ start-up lines silenced."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" not in sys.modules:
        saved = os.dup(2)
        try:
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), 2)
                import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    import keras
    import tensorflow as tf
    return keras, tf


def init_training_worker() -> None:
    """Initializer of the worker processes that train (``bench skab``, ``train --per-device``): one
    TensorFlow thread each, set before TensorFlow runs anything. The workers already fill the cores, and a
    fixed thread count keeps a model the same whatever --jobs is (it changes the order of float sums)."""
    _, tf = import_tensorflow()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    logging.getLogger("sensord").setLevel(logging.WARNING)
