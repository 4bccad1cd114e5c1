"""``python -m train --workdir=DIR --config=train/configs/default.py [--config.key=value ...]``

Trains (or resumes, when DIR already holds checkpoints) and leaves in DIR: checkpoints/, metrics.jsonl,
tensorboard/, learning_curves.png and config.json. A config that changes the run already in DIR is refused
(exit code 1, nothing written); ``--config.restart=True`` moves that run aside to DIR/previous_runs/ first.
SIGTERM or SIGINT finishes the current step, saves a checkpoint and exits with code 75 (EX_TEMPFAIL): run the
same command again to resume. Multi-host: pass ``--config.coordinator_address=HOST:PORT
--config.num_processes=N --config.process_id=I`` to each process (or set RESNET_JAX_COORDINATOR,
RESNET_JAX_NUM_PROCESSES, RESNET_JAX_PROCESS_ID); under SLURM, Open MPI or on a TPU pod,
``--config.coordinator_address=auto`` takes them from the cluster. Where Debian's libtcmalloc-minimal4 (or
another tcmalloc) is installed the command runs under it (``resnet_jax/allocator.py``; ``RESNET_JAX_TCMALLOC=0``
turns that off).
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

DEFAULT_CONFIG = str(Path(__file__).parent / "configs" / "default.py")
flags.DEFINE_string("workdir", "runs/default", "directory for checkpoints, metrics and plots (resumes if present)")
config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "training config file", lock_config=True)


def show_library_info() -> None:
    """resnet_jax's own INFO lines on stderr: that the oneDNN extension is being built (a minute, once), or why
    it is off and what to run. Other libraries' INFO stays hidden."""
    import logging

    library = logging.getLogger("resnet_jax")
    if not library.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        library.addHandler(handler)
    library.setLevel(logging.INFO)
    library.propagate = False  # not again through absl's handler on the root logger


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; options are --workdir and --config[.key=value]")
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # Orbax reports every save at INFO
    show_library_info()
    from resnet_jax.checkpoint import CheckpointError
    from resnet_jax.hub import HubUnavailable
    from resnet_jax.pretrained import DownloadError
    from resnet_jax.training import Preempted, TrainingDiverged, train

    try:
        result = train(flags.FLAGS.config, flags.FLAGS.workdir)
    except Preempted as stopped:
        print(f"preempted: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except (ValueError, FileNotFoundError, TrainingDiverged, CheckpointError, DownloadError, HubUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    val = [r for r in result.history if r["split"] == "val"]
    final = f"; final val accuracy {val[-1]['accuracy']:.4f}" if val else ""
    print(f"{result.stop_reason}: step {int(result.state.step)}{final}; outputs in {flags.FLAGS.workdir}")
    return 0


if __name__ == "__main__":
    from resnet_jax.allocator import preload_tcmalloc

    preload_tcmalloc()  # re-execs under tcmalloc when installed (faster CPU steps); before jax is imported
    app.run(main)
