"""Training: options (`TrainOptions`), set-up of a run (`prepare`), the epoch loop (`fit`).

`train(opts)` is the whole of `tvae-em train` as a library call; the command only builds the
options and prints. A run is reproducible: batches are fixed by (seed, epoch) and RNG states are
checkpointed, so a resumed run continues to the same result as an uninterrupted one.
"""

from ..errors import UserError
from .loop import TrainingDiverged, TrainResult, fit
from .options import TrainOptions, parse_t_sd
from .setup import TrainingSetup, prepare


def train(opts: TrainOptions, resume: bool = False, explicit=None, progress=None, log=print):
    """Train (or resume) a TARGET-VAE on ``opts.input``, writing everything under ``opts.out_dir``.

    ``progress`` follows `tvae_em.progress` (a factory ``(total, description)`` -> context yielding
    ``advance(n)``); ``log`` receives each log line. Returns a `TrainResult`.
    """
    setup = prepare(opts, resume=resume, explicit=explicit or set())
    try:
        result = fit(setup, progress=progress, log=log)
    except UserError:  # bad input found while training (e.g. NaN pixels)
        setup.release(failed=True)
        raise
    finally:
        setup.release()
    return result


__all__ = [
    "TrainOptions",
    "TrainResult",
    "TrainingDiverged",
    "TrainingSetup",
    "fit",
    "parse_t_sd",
    "prepare",
    "train",
]
