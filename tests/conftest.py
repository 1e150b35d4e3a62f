"""Test configuration: everything offline, small thread pools, deterministic."""
import os

# Must be set before timm / open_clip / diffusers / huggingface_hub are imported, so that an
# accidental pretrained name fails at once instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
