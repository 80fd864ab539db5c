import pytest


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one AcceleratorState per process and refuses a second mixed precision in it; tests
    train with several in one process, so each starts from a clean state (as accelerate's own tests do)."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
