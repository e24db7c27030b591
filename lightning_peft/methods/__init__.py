"""Pure-torch cores of the adaptive methods.

Each core is a plain object with ``state_dict()`` / ``load_state_dict()`` that can be unit-tested
without a Trainer; the callbacks in :mod:`lightning_peft.callbacks` call them from the right
Lightning hooks. Nothing here imports Lightning.

* :class:`~lightning_peft.methods.adalora.RankAllocator`: AdaLoRA's importance scores, cubic budget
  and masks (driven by the ``AdaLoRA`` callback).
* :class:`~lightning_peft.methods.lisa.LayerSampler`: LISA's per-interval block sampler (``LISA``).
* :class:`~lightning_peft.methods.id3.Unmasker`: ID³'s step-by-step global top-k unmasking (``ID3``).
* :class:`~lightning_peft.methods.sara.SaRASelector` and :func:`~lightning_peft.methods.sara.nuclear_norm_grad`:
  SaRA's smallest-weight selection and low-rank penalty (``SaRA``).
* :class:`~lightning_peft.methods.spiel.SpIELSelector`: SpIEL's drop-and-regrow schedule (``SpIEL``).
"""
