"""Runs ``resnet_jax.training.train`` in a fresh process (tests need fresh processes to choose the number of
simulated devices, to be SIGKILLed, or to join a multi-process run).

    python tests/train_worker.py WORKDIR CONFIG_JSON      (XLA_FLAGS in the environment picks the devices)
Prints one JSON line: {"step", "losses": [...train losses...], "params_digest"}.
"""

import hashlib
import json
import sys

import jax
import ml_collections
import numpy as np

from resnet_jax.training import train


def params_digest(params) -> str:
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(params)):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


def main() -> None:
    workdir, config_json = sys.argv[1], sys.argv[2]
    result = train(ml_collections.ConfigDict(json.loads(config_json)), workdir)
    losses = [r["loss"] for r in result.history if r["split"] == "train"]
    if jax.process_index() == 0:
        print(json.dumps({"step": int(result.state.step), "losses": losses, "devices": jax.device_count(),
                          "params_digest": params_digest(result.state.params)}), flush=True)


if __name__ == "__main__":
    main()
