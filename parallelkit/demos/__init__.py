"""The jobs behind ``python -m parallelkit``: each runs for real on local gloo ranks or torchrun."""
