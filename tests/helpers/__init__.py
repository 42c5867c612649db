"""Helpers the tests share (fixtures are in tests/conftest.py)."""

from tests.helpers.checkpoints import (
    assert_same_weights_and_ema,
    load_checkpoint,
    run_whole_and_split,
    write_untrained_checkpoint,
)
from tests.helpers.config import CONFIG_DIR, ROOT, TINY, compose_config
from tests.helpers.data import write_fake_cifar10
from tests.helpers.processes import run_entry_point

__all__ = ["CONFIG_DIR", "ROOT", "TINY", "compose_config", "run_entry_point", "write_fake_cifar10",
           "write_untrained_checkpoint", "load_checkpoint", "assert_same_weights_and_ema", "run_whole_and_split"]
