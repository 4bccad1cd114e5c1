"""Shared pieces of the benchmarks: the cases, the JAX train/eval steps, the torch peers, timing and reporting.

Both frameworks are timed interleaved (round-robin, several rounds, median step time), so a noisy shared machine
moves both alike and the ratio ours/PyTorch is what to trust. ``train_step`` runs torch in a process of its own
(``TorchProcess``); the per-layer benchmarks still time torch's kernels in this one, on our extension's OpenMP
runtime (which changed no model-level figure measurably: BENCHMARKS.md, eighteenth session).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

@dataclass(frozen=True)
class Case:
    """One benchmarked configuration: the same model, batch, image size and precision on both sides."""
    name: str
    model: str  # create_model name
    batch: int
    image: int
    dtype: str  # "float32" or "bfloat16"
    device: str  # "cpu" or "gpu"
    num_classes: int = 1000
    stage_sizes: tuple[int, ...] | None = None  # None: the named model's; smoke tests use one block per stage
    channels: int = 3


CASES = {
    "resnet18_cifar_cpu": Case("resnet18_cifar_cpu", "resnet18_cifar", 128, 32, "float32", "cpu", 10),
    "resnet50_cpu": Case("resnet50_cpu", "resnet50", 32, 224, "float32", "cpu"),
    # the default run (train/configs/default.py): ResNet-20 on the 8x8 digits upsampled to 16 px, greyscale
    "resnet20_digits_cpu": Case("resnet20_digits_cpu", "resnet20", 64, 16, "float32", "cpu", 10, channels=1),
    "resnet50_gpu_bf16": Case("resnet50_gpu_bf16", "resnet50", 256, 224, "bfloat16", "gpu"),
}


def quick(case: Case) -> Case:
    """The smoke-test version of a case: same block type and precision, one block per stage, batch 2, 32px
    (compiling the full ResNet-50 step alone takes minutes on a 2-core machine)."""
    stages = (1,) * (3 if case.model in CIFAR_DEPTHS else 4)
    return Case(case.name, case.model, 2, 32, case.dtype, case.device, case.num_classes, stages, case.channels)


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--quick", action="store_true", help="smoke mode: tiny batch and images, 1 step")
    p.add_argument("--json", default=None, help="where to write the results (default benchmarks/results/...)")
    p.add_argument("--tcmalloc", action=argparse.BooleanOptionalAction, default=True,
                   help="preload tcmalloc if installed (apt-get install libtcmalloc-minimal4)")
    return p


JAX_PLATFORMS = {"cpu": "cpu", "gpu": "cuda"}


def device_env(device: str) -> dict[str, str]:
    """This process's environment with JAX pinned to ``--device``'s platform: left to choose, JAX fell back to
    the CPU where it found no GPU, and results labelled gpu were measured on the CPU."""
    return dict(os.environ, JAX_PLATFORMS=JAX_PLATFORMS[device])


def check_device(device: str, torch_too: bool = False) -> None:
    """Exit at once, saying what is missing, where ``--device`` is not here (JAX's platform, and torch's CUDA
    when torch is measured too), rather than after compiling, or never. JAX is asked in a child process: this
    one's backend, once started on a GPU, would hold most of its memory from the measurements' children."""
    import subprocess

    unpinned = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # pinned, jax says only "assert"
    probe = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"], env=unpinned,
                           capture_output=True, text=True, timeout=600)
    found = probe.stdout.strip() if probe.returncode == 0 else "none: " + (
        probe.stderr.strip().splitlines() or ["no output"])[-1][:300]
    if found != device:
        sys.exit(f"error: --device {device}: JAX finds no {device.upper()} here (its default backend: {found}); run "
                 f"it on a machine with one (and jax[cuda12] installed), or measure --device cpu")
    if torch_too and device == "gpu":
        import torch

        if not torch.cuda.is_available():
            sys.exit("error: --device gpu: torch finds no CUDA device; install a CUDA build of torch, or pass "
                     "--no-torch to measure this project alone")


def environment(allocator: str) -> dict:
    """What a result depends on: machine, versions, allocator, date, command."""
    import jax
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu,
           "cores": os.cpu_count(), "jax": jax.__version__, "jax_devices": [str(d) for d in jax.devices()],
           "python": platform.python_version(), "allocator": allocator, "command": " ".join(sys.argv)}
    for name in ("flax", "optax", "torch", "torchvision"):  # only those this run used: importing torch costs ~5 s
        if name in sys.modules:
            env[name] = sys.modules[name].__version__
    from resnet_jax.ops import cpu
    from resnet_jax.ops.onednn.library import available

    # what the two sides ran with: torch's threads (one per physical core by default) against XLA's (every CPU
    # this process may use), the CPU's vector and bfloat16 instructions, and whether our extension ran
    env["cpu_flags"] = sorted(f for f in cpu.flags().split() if f.startswith(("avx", "amx", "fma")))
    env["threads_available"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    env["extension"] = available()
    if "torch" in sys.modules:
        env["torch_threads"] = sys.modules["torch"].get_num_threads()
    return env


# ---------------------------------------------------------------- JAX side


def jax_model(case: Case, **overrides):
    import jax.numpy as jnp
    from resnet_jax import create_model
    dtype = jnp.bfloat16 if case.dtype == "bfloat16" else jnp.float32
    if case.stage_sizes:
        overrides["stage_sizes"] = case.stage_sizes
    return create_model(case.model, num_classes=case.num_classes, dtype=dtype, in_channels=case.channels,
                        **overrides)


def optimizer():
    """SGD with momentum 0.9 and weight decay 1e-4 on every parameter: torch.optim.SGD's semantics."""
    import optax
    return optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))


def jax_batch(case: Case, seed: int = 0):
    import jax
    import jax.numpy as jnp
    kx, ky = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (case.batch, case.image, case.image, case.channels), jnp.float32)
    y = jax.random.randint(ky, (case.batch,), 0, case.num_classes)
    return x, y


def jax_train_step(model):
    """(state, x, y) -> (state, loss): forward, backward, BatchNorm update, SGD step; the state is donated."""
    import jax
    import optax
    tx = optimizer()

    def loss_fn(params, batch_stats, x, y):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                      mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates["batch_stats"]

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, x, y):
        params, batch_stats, opt_state = state
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    def init(x):
        variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
        return variables["params"], variables["batch_stats"], tx.init(variables["params"])

    return step, init


def jax_runner(model, case: Case, train: bool) -> Callable[[], None]:
    """A no-argument callable that runs one step to completion (block_until_ready)."""
    import jax
    x, y = jax_batch(case)
    if train:
        step, init = jax_train_step(model)
        holder = [init(x)]

        def run():
            holder[0], loss = step(holder[0], x, y)
            loss.block_until_ready()
        return run
    from resnet_jax.ops import fold_batchnorm
    # inference as evaluation and prediction run it: BatchNorm folded into the convolutions
    folded_model, variables = fold_batchnorm(model, jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(0), x))
    infer = jax.jit(functools.partial(folded_model.apply, train=False))
    return lambda: infer(variables, x).block_until_ready()


# ---------------------------------------------------------------- PyTorch side


CIFAR_DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}


def torch_cifar_resnet(blocks_per_stage, num_classes, in_channels, stage_sizes=None):
    """He et al.'s CIFAR ResNet (widths 16/32/64, parameter-free "option A" shortcuts) in torch, as ours:
    torchvision has none, and the benchmark's peer must do the same work."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
            self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
            self.stride, self.extra = stride, cout - cin

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            shortcut = x[:, :, ::self.stride, ::self.stride]
            if self.extra:
                shortcut = nn.functional.pad(shortcut, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
            return torch.relu(y + shortcut)

    layers, cin = [nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
    for stage, width in enumerate((16, 32, 64)):
        for j in range(stage_sizes[stage] if stage_sizes else blocks_per_stage):
            layers.append(Block(cin, width, 2 if stage and not j else 1))
            cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
    return nn.Sequential(*layers)


def torch_model(case: Case):
    import torch
    import torchvision
    if case.model in CIFAR_DEPTHS:
        return torch_cifar_resnet(CIFAR_DEPTHS[case.model], case.num_classes, case.channels, case.stage_sizes)
    model = getattr(torchvision.models, case.model.removesuffix("_cifar"))(num_classes=case.num_classes)
    if case.stage_sizes:
        block = type(model.layer1[0])
        model = torchvision.models.resnet.ResNet(block, list(case.stage_sizes), num_classes=case.num_classes)
    if case.model.endswith("_cifar"):  # the CIFAR stem: 3x3 stride-1 conv, no max-pool
        model.conv1 = torch.nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = torch.nn.Identity()
    return model


def torch_inference_model(model, memory_format):
    """``model`` in eval mode with each BatchNorm folded into the convolution before it (fx's conv-BN fusion), as
    ours is (``jax_runner``): torch's inference had run BatchNorm as a pass of its own."""
    from torch.fx.experimental.optimization import fuse

    return fuse(model.eval()).to(memory_format=memory_format)


def torch_runner(case: Case, train: bool, channels_last: bool, compile: bool) -> Callable[[], None]:
    """One torch step (same model, batch, optimizer); AMP bf16 when the case is bf16; synchronised on GPU."""
    import torch
    dev = "cuda" if case.device == "gpu" else "cpu"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = torch_model(case).to(dev, memory_format=fmt)
    x = torch.randn(case.batch, case.channels, case.image, case.image, device=dev).to(memory_format=fmt)
    y = torch.randint(0, case.num_classes, (case.batch,), device=dev)
    amp = torch.autocast(dev, dtype=torch.bfloat16, enabled=case.dtype == "bfloat16")
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    if not train:
        model = torch_inference_model(model, fmt)
        # inductor's freezing also folds BatchNorm and keeps mkldnn's packed weights; it is off by default
        fwd = torch.compile(model, options={"freezing": True}) if compile else model

        def infer():
            with torch.inference_mode(), amp:
                fwd(x)
            sync()
        return infer
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        with amp:
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    step = torch.compile(step) if compile else step

    def run():
        step()
        sync()
    return run


class TorchProcess:
    """torch's runners in a child process (``benchmarks/torch_child.py`` says why), each a no-argument callable
    that runs one step there and returns its seconds. Its environment is this process's (tcmalloc's preload
    included) without the extension's OpenMP setting; ``info`` records its torch version and threads."""

    def __init__(self):
        import subprocess

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self._child = subprocess.Popen([sys.executable, "-m", "benchmarks.torch_child"], cwd=root, text=True,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=dict(os.environ))
        self.info: dict = {}
        self._built = 0

    def _ask(self, request: dict) -> dict:
        self._child.stdin.write(json.dumps(request) + "\n")
        self._child.stdin.flush()
        line = self._child.stdout.readline()
        if not line:
            raise RuntimeError(f"torch's benchmark process ended (exit status {self._child.wait()})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def runner(self, case: Case, train: bool, channels_last: bool, compile: bool) -> Callable[[], float]:
        name, self._built = str(self._built), self._built + 1
        answer = self._ask({"build": name, "case": dataclasses.asdict(case), "train": train,
                            "channels_last": channels_last, "compile": compile})
        self.info = {"torch": answer["torch"], "torch_threads": answer["threads"], "torch_process": "own"}
        return lambda: self._ask({"run": name})["seconds"]

    def close(self) -> None:
        if self._child.poll() is None:
            self._child.stdin.close()
            self._child.wait(timeout=60)


def openvino_runner(case: Case, precision: str) -> Callable[[], None]:
    """Inference of torchvision's same model compiled by OpenVINO for the CPU. ``precision`` "f32" pins float32
    (``INFERENCE_PRECISION_HINT``); "default" leaves OpenVINO its own choice (bf16 where the CPU has bf16
    instructions). Raises ImportError where openvino is not installed (``pip install openvino``)."""
    import numpy as np
    import openvino
    import torch
    model = torch_model(case).eval()
    x = torch.randn(case.batch, case.channels, case.image, case.image)
    with torch.no_grad():
        converted = openvino.convert_model(model, example_input=x)
    config = {"INFERENCE_PRECISION_HINT": "f32"} if precision == "f32" else {}
    request = openvino.Core().compile_model(converted, "CPU", config).create_infer_request()
    data = np.ascontiguousarray(x.numpy())
    return lambda: request.infer({0: data})


def openvino_images_per_s(case: Case, precision: str, steps: int) -> float | None:
    """OpenVINO's inference rate for ``case``, timed in a child process under glibc's malloc (OpenVINO's
    libraries abort with "munmap_chunk(): invalid pointer" under a preloaded tcmalloc): the anchor of
    ``benchmarks.train_step``. None where openvino is not installed."""
    import importlib.util
    import subprocess
    if importlib.util.find_spec("openvino") is None:
        return None
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    code = ("import json, statistics, sys, time; from benchmarks import common; "
            "case = common.Case(**json.loads(sys.argv[1])); run = common.openvino_runner(case, sys.argv[2]); run()\n"
            "ts = []\nfor _ in range(int(sys.argv[3])):\n"
            "    t = time.perf_counter(); run(); ts.append(time.perf_counter() - t)\n"
            "print('RATE', case.batch / statistics.median(ts))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(case.__dict__), precision, str(int(steps))],
                          capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rates = [float(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("RATE ")]
    if not rates:
        print(f"OpenVINO anchor failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
        return None
    return rates[0]


# ---------------------------------------------------------------- timing and reporting


def time_interleaved(runners: dict[str, Callable[[], None]], warmup: int, steps: int, rounds: int) -> dict:
    """Median seconds per step of each runner; runners alternate within each round so load hits all alike. A
    runner that returns a float (``TorchProcess``'s, timed in its own process) gives its own step time."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            for _ in range(steps):
                start = time.perf_counter()
                own = run()
                elapsed = time.perf_counter() - start
                times[name].append(own if isinstance(own, float) else elapsed)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "samples": len(t)} for name, t in times.items()}


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [header] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    print(f"\n{title}\n{line(cells[0])}\n|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print(line(r))
    sys.stdout.flush()


def write_json(path: str | None, default_name: str, payload: dict) -> str:
    path = path or os.path.join(os.path.dirname(__file__), "results", default_name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"\nwrote {path}")
    return path
