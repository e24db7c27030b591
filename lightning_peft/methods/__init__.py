"""Pure-torch cores of the adaptive methods.

Each core is a plain object with ``state_dict()`` / ``load_state_dict()`` that can be unit-tested
without a Trainer; the callbacks in :mod:`lightning_peft.callbacks` call them from the right
Lightning hooks. Nothing here imports Lightning.

* :class:`~lightning_peft.methods.adalora.RankAllocator`: AdaLoRA's importance scores, cubic budget
  and masks (driven by the ``AdaLoRA`` callback).
* :class:`~lightning_peft.methods.lisa.LayerSampler`: LISA's per-interval block sampler (its callback
  is still to come).
"""
