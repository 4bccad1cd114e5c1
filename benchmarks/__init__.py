"""Side-by-side benchmarks against PyTorch; run each as ``python -m benchmarks.<name>`` from the repo root."""
