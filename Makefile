# Two commands do all the set-up: `make demo` and `make test`. Both create .venv on first use.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test test-slow test-all bench clean

$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) train.py --config experiments/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-all: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

clean:
	rm -rf runs data/synthetic .pytest_cache
