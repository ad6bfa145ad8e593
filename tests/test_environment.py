import jax
import jax.numpy as jnp
import pytest


def test_eight_simulated_devices():
    assert jax.device_count() == 8


def test_strict_promotion_is_on():
    with pytest.raises(Exception):
        jnp.ones(3, jnp.bfloat16) + jnp.ones(3, jnp.float32)
    with pytest.raises(ValueError):
        jnp.ones((2, 3)) + jnp.ones(3)
