"""The adapter zoo: publish, find, download and load adapters (``LocalZoo``, ``HubZoo``).

Not implemented yet. Until it lands, a trained adapter is a folder written by
:func:`lightning_peft.adapters.save_adapter` (or the ``save_dir`` of a callback) in peft's format,
loaded back with :func:`lightning_peft.adapters.load_adapter`.
"""
