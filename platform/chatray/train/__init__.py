"""Fine-tuning on Ray Train.

Modules (import what you need; this package itself imports nothing heavy, so the Ray-free parts such as
:mod:`chatray.train.step` and :mod:`chatray.train.batches` work where Ray is not installed):

* :mod:`chatray.train.batches`   rows -> packed/padded batches; the Ray Dataset of the train split; a shard's stream
* :mod:`chatray.train.splits`    how the train split is dealt to the workers (every row to exactly one)
* :mod:`chatray.train.step`      :class:`~chatray.train.step.TrainStep`, one optimizer step (no Ray)
* :mod:`chatray.train.plan`      the checks before a run and the :class:`~chatray.train.plan.RunPlan` workers get
* :mod:`chatray.train.state`     a checkpoint's train state (``train_state.pt``): saving it, resuming from it
* :mod:`chatray.train.loop`      ``train_loop_per_worker`` run by every Ray Train worker
* :mod:`chatray.train.trainer`   ``build_trainer(cfg) -> TorchTrainer``, ``run_training``
* :mod:`chatray.train.metrics`   ``metrics.jsonl``, the log of a run's steps
* :mod:`chatray.train.runs`      status, list and logs of runs in storage
* :mod:`chatray.train.submit`    ``chatray train submit`` through the Ray Jobs API
* :mod:`chatray.train.commands`  the ``chatray train`` click group
* :mod:`chatray.train.console`   the lines ``chatray train`` prints
"""

__all__: list[str] = []
