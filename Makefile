# Two commands, on a fresh Debian/Ubuntu machine as root:  make demo   /   make test
# Each one installs what it needs (Debian packages when missing, a .venv with the project).

VENV       := .venv
BIN        := $(VENV)/bin
PYTHON     ?= python3
# Debian packages the lab and the tests use (checked with dpkg, installed only when missing).
APT_PACKAGES := python3-venv python3-pip debootstrap systemd-container nut-server nut-client haproxy docker-registry \
                dpkg-dev gnupg apt-utils nftables openssh-client openssh-server socat iproute2 procps psmisc curl

.PHONY: all demo test test-unit test-integration lint system-packages venv clean device-wheels

all: test

system-packages:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(BIN)/fleet: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

venv: $(BIN)/fleet

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy patching infra
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/ansible-lint --offline playbooks/

test-unit: venv
	$(BIN)/pytest -q tests/unit

test-integration: system-packages venv
	$(BIN)/pytest -q --durations=25 tests/integration

test: system-packages venv lint
	$(BIN)/pytest -q -n 2 tests/unit
	$(BIN)/pytest -q --durations=25 tests/integration

demo: system-packages venv
	$(BIN)/fleet lab demo

# Wheels for tests/hosts/device/run.sh (the GPU checks on a GPU machine without network access).
device-wheels: venv
	for v in 3.10 3.11 3.12 3.13; do $(BIN)/pip download -q --only-binary=:all: --python-version $$v \
	  --platform manylinux2014_x86_64 -d .device/wheels "pytest>=8,<9" "pytest-testinfra>=10,<11" \
	  "pydantic>=2.7,<3" "pyyaml>=6,<7" exceptiongroup tomli; done

clean:
	rm -rf $(VENV) .fleet .pytest_cache .ruff_cache
