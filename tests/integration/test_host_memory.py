"""Workers keep the memory a step frees (glibc with fixed thresholds) instead of faulting it back in."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# A few training steps of the conv VAE at 32 px in a fresh process (mallopt is process-wide);
# prints the minor page faults per step once the steps have warmed up.
STEPS = """
import resource, sys, torch
from pipeline.train.host_memory import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
torch.manual_seed(0)
torch.set_num_threads(1)
from models import build_model
from pipeline.config import ModelConfig
model = build_model(ModelConfig(name="conv_vae", latent_dim=8, likelihood="bernoulli", resolution=32))
opt = torch.optim.Adam(model.parameters())
x = torch.rand(64, 3, 32, 32)
def step():
    out = model(x)
    out["loss"].backward()
    opt.step()
    opt.zero_grad()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 8)
"""


def _faults_per_step(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.split()[-1])


def test_retained_memory_spares_the_page_faults_of_every_step():
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's mallopt only")
    default, retained = _faults_per_step("default"), _faults_per_step("retain")
    # glibc's defaults return the activations' memory at the end of every step (thousands of
    # zeroed pages to fault back in); with the thresholds fixed, the next step reuses it
    assert default > 1000, default
    assert retained < default / 20, (default, retained)
