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


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    """A sentencepiece model of the evaluation sample (tests.helpers.SAMPLE_VOCAB tokens)."""
    from tests.helpers import train_sample_tokenizer

    return train_sample_tokenizer(tmp_path_factory.mktemp("tok"))
