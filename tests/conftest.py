"""Shared test setup: offline hub, and one intra-op thread per process.

Tiny models gain nothing from a second thread, and the multi-process tests run two processes on
the two cores of the CI machine: more threads than cores made the suite several times slower.
"""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# data modules that cache what they build (DocstringWordOrderDataModule) cache it here, not in the user's home
os.environ.setdefault("LIGHTNING_PEFT_DATA", tempfile.mkdtemp(prefix="lightning_peft_data_"))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the DDP subprocesses

import torch  # noqa: E402

torch.set_num_threads(1)
