# The two commands of the README. Everything runs from a venv made here, on CPU by default.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VAEPIPE := $(VENV)/bin/vaepipe
QS_DATA ?= data/synth
QS_SHARDS ?= data/shards/synth64
# DeepSpeed as pyproject.toml pins it (one place for the version).
DEEPSPEED := $(shell grep -o 'deepspeed==[0-9.]*' pyproject.toml)

.PHONY: install quickstart test clean bench-data

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU torch first and pinned, so no dependency can pull a CUDA build.
	$(PY) -m pip install -q "torch==2.13.0"
	# DeepSpeed with its CPU shared-memory comm op compiled now, ahead of time, against that
	# torch (no build isolation, which would fetch another torch). Otherwise every process JIT-loads
	# it under a lock file in ~/.cache/torch_extensions, and a process killed while holding that
	# lock (a worker lost in a fault drill) leaves every later DeepSpeed start waiting forever.
	# DS_ENABLE_NINJA builds the op's two C++ files in parallel (DeepSpeed's setup.py compiles them
	# one after the other otherwise): 94 -> 55 s for this step on 2 cores.
	$(PY) -m pip install -q setuptools wheel ninja py-cpuinfo packaging uv
	DS_ENABLE_NINJA=1 DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 \
	  $(PY) -m pip install -q --no-build-isolation --no-cache-dir "$(DEEPSPEED)"
	# The rest with uv, which keeps the torch and DeepSpeed installed above (they satisfy the pins) and
	# resolves, downloads, links and byte-compiles the ~150 other packages in parallel: 48 -> 16 s for
	# this step on 2 cores, with the same `pip freeze` as pip's. --compile-bytecode as pip does: where
	# PYTHONDONTWRITEBYTECODE is set, modules left uncompiled make every process import them from
	# source (mlflow + ray + the test stack: 6.7 -> 13 s per process, measured).
	$(VENV)/bin/uv pip install --python $(PY) -q --compile-bytecode -e ".[test]"
	touch $@

install: $(VENV)/.installed

quickstart: install
	@start=$$(date +%s); set -e; \
	$(VAEPIPE) data synth --out $(QS_DATA) --n 2000 --seed 0; \
	$(VAEPIPE) data shard --source $(QS_DATA) --out $(QS_SHARDS) --resolution 64 --shard-size 250; \
	$(VAEPIPE) train --config jobs/quickstart.yaml; \
	$(VAEPIPE) sample --model models:/vae-quickstart@champion --n 64 --out quickstart_samples.png; \
	echo; echo "quickstart finished in $$(( $$(date +%s) - start )) s"; \
	echo "  MLflow UI:   $(VAEPIPE:vaepipe=mlflow) ui --backend-store-uri sqlite:///mlruns.db   (image slider, system metrics, data set input on each run page)"; \
	echo "  registered:  models:/vae-quickstart@champion"; \
	echo "  samples:     quickstart_samples.png"

# Shards the benchmarks' job files read (jobs/bench/*.yaml): 4096 synthetic faces at 32 and 64 px.
bench-data: install
	$(VAEPIPE) data synth --out data/synth-bench --n 4096 --seed 1
	$(VAEPIPE) data shard --source data/synth-bench --out data/shards/synth32 --resolution 32 --shard-size 512
	$(VAEPIPE) data shard --source data/synth-bench --out data/shards/synth64 --resolution 64 --shard-size 512

# Two pytest processes, each taking whole test modules, costliest first (tests/conftest.py);
# each process starts its own services (Ray, MLflow server, moto) when a module first needs them.
TEST_PROCS ?= 2
test: install
	# The project's own modules byte-compiled first (~2 s): where PYTHONDONTWRITEBYTECODE is set no
	# process writes them, and each of the suite's Python processes (Ray workers, CLI runs, drivers)
	# would compile them again on import (0.4 s each, measured).
	$(PY) -m compileall -q pipeline models tests > /dev/null
	$(PY) -m pytest -q -n $(TEST_PROCS) --dist loadscope --no-loadscope-reorder

clean:
	rm -rf data runs mlruns.db mlartifacts quickstart_samples.png
