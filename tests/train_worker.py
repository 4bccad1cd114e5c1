"""Runs ``resnet_jax.training.train`` in a fresh process (tests need fresh processes to choose the number of
simulated devices, to receive real signals, or to join a multi-process run).

    python tests/train_worker.py WORKDIR CONFIG_JSON [PARAMS_NPZ]   (XLA_FLAGS in the environment picks the devices)

Prints one JSON line: {"step", "losses": [...train losses...], "params_digest", "ema_digest" (of the weights'
moving average and its count, None without config.model_ema), "resumed_from", "devices"}, and
writes the final variables (params and batch_stats) to PARAMS_NPZ when given (process 0). A run stopped by
SIGTERM/SIGINT prints {"preempted_at": step} instead and exits with the CLI's code for it.
"""

import hashlib
import json
import sys

import jax
import ml_collections
import numpy as np
from flax.traverse_util import flatten_dict

from resnet_jax.training import Preempted, train


def params_digest(params) -> str:
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(params)):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


def main() -> int:
    workdir, config_json = sys.argv[1], sys.argv[2]
    try:
        result = train(ml_collections.ConfigDict(json.loads(config_json)), workdir)
    except Preempted as stopped:
        print(json.dumps({"preempted_at": stopped.step, "process": jax.process_index()}), flush=True)
        return stopped.exit_code
    losses = [r["loss"] for r in result.history if r["split"] == "train"]
    if jax.process_index() == 0:
        if len(sys.argv) > 3:
            np.savez(sys.argv[3], **flatten_dict(jax.device_get(result.state.variables), sep="/"))
        print(json.dumps({"step": int(result.state.step), "losses": losses, "devices": jax.device_count(),
                          "resumed_from": result.resumed_from,
                          "params_digest": params_digest(result.state.params),
                          "ema_digest": None if result.state.ema is None else params_digest(result.state.ema)}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
