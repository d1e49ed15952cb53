"""Test configuration: 8 simulated CPU devices for the ring tests.

XLA_FLAGS must be set before jax is imported anywhere, which is why this file
does it at the top and why the library itself never touches devices at import.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
