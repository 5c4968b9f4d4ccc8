"""Fine-tuning on Ray Train.

Modules (import what you need; this package itself imports nothing heavy, so the Ray-free parts such as
:mod:`chatray.train.step` and :mod:`chatray.train.batches` work where Ray is not installed):

* :mod:`chatray.train.batches`  rows -> packed/padded batches; the Ray Dataset of the train split
* :mod:`chatray.train.step`     :class:`~chatray.train.step.TrainStep`, one optimizer step (no Ray)
* :mod:`chatray.train.loop`     ``train_loop_per_worker`` run by every Ray Train worker
* :mod:`chatray.train.trainer`  ``plan_run``, ``build_trainer(cfg) -> TorchTrainer``, ``run_training``
* :mod:`chatray.train.runs`     status, list and logs of runs in storage
* :mod:`chatray.train.submit`   ``chatray train submit`` through the Ray Jobs API
* :mod:`chatray.train.commands` the ``chatray train`` click group
"""

__all__: list[str] = []
