"""Pure-torch cores of the adaptive methods (AdaLoRA allocator, LISA sampler, ID³ unmasker, SaRA selector).

Each core is a plain object with ``step(...)``, ``state_dict()`` and ``load_state_dict()`` that can
be unit-tested without a Trainer; the callbacks in :mod:`lightning_peft.callbacks` call them from
the right Lightning hooks. Nothing here imports Lightning. No method core has landed yet: LoRA,
the static baseline, needs none (see :mod:`lightning_peft.adapters`).
"""
