"""Front-ends for training frameworks: thin callbacks that attach a `stabwatch.Monitor` at the
framework's hook points.

- `stabwatch.integrations.lightning.StabwatchCallback` (``pip install stabwatch[lightning]``)
- `stabwatch.integrations.transformers.StabwatchCallback` (``pip install stabwatch[huggingface]``)

Each module imports its framework when it is imported itself; ``import stabwatch`` never does.
"""
