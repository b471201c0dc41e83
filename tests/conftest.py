"""Shared test set-up."""

import pytest
from engine_helpers import torch_threads


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_nets(request):
    # Tiny networks run faster on one thread (two threads fight over 2 cores under load);
    # the slow real-size VGG19 tests keep torch's default.
    if request.node.get_closest_marker("slow"):
        yield
    else:
        with torch_threads(1):
            yield
