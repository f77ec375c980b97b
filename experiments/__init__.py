"""Real example models and data for mixq.

Each example module (``mnist_resnet``, ``minilm``, ``minilm_bible``, ``effnet_fashion``,
``resnet18``) exposes the same small interface so that it can be named on the command
line as ``module:function``:

- ``model() -> torch.nn.Module``: float model in eval mode with real weights.
- ``calib_data(num_batches=...) -> list``: input batches (a Tensor or a tuple of
  Tensors, the model's positional inputs) drawn from the training split.
- ``eval_data() -> list[tuple[inputs, targets]]``: held-out evaluation batches.
- ``metric(outputs, targets) -> numpy.ndarray``: per-sample scores in percent
  (float64); their mean is the metric, and bootstrap intervals resample them.

plus ``evaluate(model) -> float``, the mean of ``metric`` over ``eval_data``.
``effnet_fashion`` and ``minilm_bible`` also name their splits: ``search_data()`` (for
choosing a plan) and ``test_data()`` (disjoint from it; what ``eval_data`` returns).
Trained examples train once per machine, deterministically (``_repro``), and cache their
weights outside the repository (``_cache``).
``resnet18`` is random-init and serves latency benchmarks only, so it has no
``eval_data``/``metric``.
"""
