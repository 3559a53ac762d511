"""Checkpointer: a checkpoint of another train-state layout stops the resume, untouched."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from cbp_jax import checkpointing


def test_checkpoint_of_another_layout_is_named_and_kept(tmp_path):
    ckpt = checkpointing.Checkpointer(str(tmp_path / "ckpt"), every=1, async_save=False)
    state = {"params": {"w": jnp.ones(3)}, "opt_state": {"mu": {"w": jnp.zeros(3)}}}
    ckpt.save(1, state, {"step": 1}, force=True)
    step, restored, data_state = ckpt.restore_latest(state)
    assert step == 1 and data_state == {"step": 1}
    np.testing.assert_array_equal(restored["params"]["w"], np.ones(3))
    other = {"params": {"w": jnp.ones(3)}, "opt_state": {"groups": {"w": jnp.zeros(3)}}}
    with pytest.raises(checkpointing.CheckpointLayoutError, match="1 entries missing") as e:
        ckpt.restore_latest(other)
    assert "opt_state.groups.w" in str(e.value) and "opt_state.mu.w" in str(e.value)
    assert isinstance(e.value, checkpointing.NoUsableCheckpointError)  # a stop error
    assert os.listdir(tmp_path / "ckpt") == ["1"]  # not moved aside as broken
    ckpt.close()
