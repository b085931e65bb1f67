# Developer shortcuts. The README's two commands do their own set-up; these
# targets assume the virtual environment in .venv (make venv creates it).
PY ?= .venv/bin/python
PROTO = netlite/proto/netlite.proto

.PHONY: venv proto test lint bench train clean

venv:
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,plot,dev]"

# Regenerate the checked-in protobuf module; commit the result.
# tests/engine_tests/test_proto.py fails when it is out of date.
proto:
	$(PY) -m grpc_tools.protoc -Inetlite/proto --python_out=netlite/proto $(PROTO)

test:
	bash scripts/test.sh

lint:
	$(PY) -m ruff check netlite layers tests benchmarks examples

bench:
	$(PY) benchmarks/bench_softmax_loss.py

train:
	bash scripts/train.sh

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
