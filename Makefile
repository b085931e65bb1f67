# Developer shortcuts. The README's two commands do their own set-up; these
# targets assume the virtual environment in .venv (make venv creates it).
PY ?= .venv/bin/python
PROTO = netlite/proto/netlite.proto

.PHONY: venv proto test train lint bench clean

venv:
	bash scripts/bootstrap.sh test,plot,dev

# Regenerate the checked-in protobuf module; commit the result.
# tests/engine_tests/test_proto.py fails when it is out of date.
proto:
	$(PY) -m grpc_tools.protoc -Inetlite/proto --python_out=netlite/proto $(PROTO)

# The README's two commands. Each sets itself up (venv, install, data).
test:
	bash scripts/test.sh $(ARGS)

train:
	bash scripts/train.sh $(ARGS)

lint:
	$(PY) -m ruff check netlite layers tests benchmarks examples

bench:
	$(PY) benchmarks/bench_softmax_loss.py
	$(PY) benchmarks/bench_lenet.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
