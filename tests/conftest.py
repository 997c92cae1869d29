import atexit
import os
import shutil
import tempfile

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")  # no GPU: Triton kernels run in its interpreter
# The suite's own cache of searched noise multipliers (fedortho.privacy), shared by the runs it
# starts, not the user's.
_CACHE = tempfile.mkdtemp(prefix="fedortho-test-cache-")
os.environ["FEDORTHO_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, True)
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A small random BERT classifier saved to a folder: the Hugging Face loading path."""
    from fedortho.models import save_tiny_bert

    return str(save_tiny_bert(tmp_path_factory.mktemp("tiny-bert")))


@pytest.fixture()
def tiny_cfg(tiny_model_dir):
    from fedortho.config import RunConfig

    return RunConfig(model=tiny_model_dir, clients=3, clients_per_round=3, rounds=2, local_steps=2,
                     batch_size=16, max_train_examples=240, max_test_examples=64, num_threads=2)