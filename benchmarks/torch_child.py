"""torch's side of a benchmark in a process of its own, driven one step at a time over a pipe.

Why not in the benchmark's process: there our extension has loaded the system's libgomp with
``OMP_WAIT_POLICY=passive`` first, and torch's ``libtorch_cpu`` then binds to that same runtime, so torch ran
with our threads' sleep policy, not the default a user's torch process has. In its own process torch keeps its
own OpenMP settings, while the parent still alternates the two sides step by step (``common.time_interleaved``):
a machine's drift still moves both alike. Each step is timed here, so the pipe's latency is not counted.

Protocol (one JSON object per line): ``{"build": name, "case": {...}, "train": bool, "channels_last": bool,
"compile": bool}`` answers ``{"ok": true, "torch": version, "threads": n}`` or ``{"error": text}``;
``{"run": name}`` answers ``{"seconds": s}``.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    from benchmarks import common

    runners = {}
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if "build" in request:
                import torch

                runners[request["build"]] = common.torch_runner(
                    common.Case(**request["case"]), request["train"], request["channels_last"], request["compile"])
                answer = {"ok": True, "torch": torch.__version__, "threads": torch.get_num_threads()}
            else:
                run = runners[request["run"]]
                start = time.perf_counter()
                run()
                answer = {"seconds": time.perf_counter() - start}
        except Exception as err:  # noqa: BLE001 - reported to the parent, which decides
            answer = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
