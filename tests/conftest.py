import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster, and does not stall on a busy machine.

    Subprocess tests (torchrun, the deepspeed launcher) set OMP_NUM_THREADS themselves.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
