"""Starting a local Ray that every part of vaepipe addresses explicitly.

With a second Ray instance on the machine (another ``vaepipe train``, an evaluation, a test
suite), anything that auto-detects "the" cluster fails with ``Found multiple active Ray
instances``. Ray Train V2's placement-group cleaner does exactly that through the State API,
so a stopped trial's workers kept their CPUs and the next trial could never be placed. The
local instance is therefore started with a known dashboard port, and ``RAY_API_SERVER_ADDRESS``
names it before the first Ray process starts: every process of this instance (driver, Train
controller, cleaner, Tune) inherits the variable and talks to this instance alone.
"""

from __future__ import annotations

import os
import socket


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local_ray(num_cpus: int, log_to_driver: bool = True) -> str:
    """``ray.init`` a new local instance on loopback; returns its dashboard (State API) URL."""
    import ray

    port = _free_loopback_port()
    url = f"http://127.0.0.1:{port}"
    os.environ["RAY_API_SERVER_ADDRESS"] = url
    # The dashboard process serves the State API that Train V2's placement-group cleaner
    # polls; without it finished runs leak their workers' CPUs. Bound to loopback.
    # address="local": a new instance even when another one's address is recorded in
    # /tmp/ray/ray_current_cluster (which ray.init would otherwise join, refusing num_cpus)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             log_to_driver=log_to_driver)
    return url
