"""Test configuration: everything offline, small thread pools, deterministic."""
import os

# Must be set before timm / open_clip / diffusers / huggingface_hub are imported, so that an
# accidental pretrained name fails at once instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

#: ``torch_settings``: every test leaves torch's global settings as it found them (see its docstring);
#: ``pytester``: runs a small pytest session inside a test (``test_torch_settings.py``)
pytest_plugins = ["torch_settings", "pytester"]


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seeded, and one intra-op thread: the test models are tiny, and on a shared 2-core machine
    more threads mostly wait for each other (measured: a tiny diffusion test went from 99 s to 14 s)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
