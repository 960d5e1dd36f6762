# babylm-kd entry points. Every target takes CONFIG=... and extra overrides in ARGS="key=value ...".
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/demo.yaml
ARGS ?=
# On a machine without CUDA, install the CPU wheel of torch first (a plain `torch` requirement
# would pull a multi-GB CUDA build). GPU users: `make install TORCH_SPEC=` keeps their own torch,
# or e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,torch==2.13.0)
BABYLM_DIR ?=
BLIMP_DIR ?=
# With several named teachers (`teachers:` in the config): TEACHER=NAME makes or caches that one
# alone; empty, every one in turn.
TEACHER ?=

.PHONY: install test demo data teacher teacher-logits baseline distill sweep eval bench chaos clean

install:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_SPEC),$(PY) -m pip install -q $(TORCH_SPEC),)
	$(PY) -m pip install -q -e ".[dev]"

test:
	$(PY) -m pytest

demo:
	$(PY) -m pipeline --config $(CONFIG) \
		$(if $(BABYLM_DIR),data.dir=$(BABYLM_DIR),) $(if $(BLIMP_DIR),eval.minimal_pairs=$(BLIMP_DIR),) $(ARGS)

data:
	$(PY) -m precompute.corpus --config $(CONFIG) $(ARGS)

teacher:
	$(PY) -m precompute.teacher --config $(CONFIG) $(if $(TEACHER),--teacher $(TEACHER),) $(ARGS)

teacher-logits:
	$(PY) -m precompute.logits --config $(CONFIG) $(if $(TEACHER),--teacher $(TEACHER),) $(ARGS)

baseline:
	$(PY) -m student.train --config $(CONFIG) distill.alpha=1 $(ARGS)

distill:
	$(PY) -m student.train --config $(CONFIG) $(ARGS)

sweep:
	$(PY) -m student.sweep --config $(CONFIG) $(ARGS)

eval:
	$(PY) -m student.evaluate --config $(CONFIG) $(ARGS)

bench:
	$(PY) -m bench $(ARGS)

chaos:
	$(PY) -m pytest tests/reliability --chaos-kills=40 --fault-matrix=full

clean:
	rm -rf runs
