# The virtualenv is built from setup.cfg; every target below uses it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test dist-check crash interop bench bench-queue deb-tools lint venv clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/twistd -n relay $(ARGS)

# The project's suite, and the example plugin's tests (examples/test_*.py,
# written with relay.testing as a plugin author would).
test: $(STAMP)
	$(BIN)/trial $(TRIAL_ARGS) tests examples

# The packaging check: the wheel `pip wheel` builds, installed into a fresh
# virtualenv outside the checkout and run from outside it (twistd relay,
# relayctl, one message over SMTP); the transcript goes to
# _trial_temp/dist-check-transcript.txt.
dist-check: $(STAMP)
	$(BIN)/trial $(TRIAL_ARGS) tests.system.dist

# The crash suite (SIGKILL at random moments, disk full) and the interop suite
# (real Postfix and swaks on loopback) are trial modules that `make test`
# does not collect: their names do not start with test_.
crash: $(STAMP)
	$(BIN)/trial $(TRIAL_ARGS) tests.system.crash

interop: $(STAMP) deb-tools
	$(BIN)/trial $(TRIAL_ARGS) tests.system.interop

# Benchmarks against Postfix, aiosmtpd and twisted.mail; writes bench/RESULTS.md.
bench: $(STAMP) deb-tools
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# The queue benchmark (issue 12): a backlog of deferred entries (100,000;
# BENCH_ARGS=--million adds 1,000,000) held and drained by relay and by
# Postfix into one smtp-sink, with the queue tools timed on it; writes its
# own section of bench/RESULTS.md.
bench-queue: $(STAMP) deb-tools
	$(BIN)/python bench/bench_queue.py $(BENCH_ARGS)

# Debian's postfix (smtp-source, smtp-sink, a private Postfix instance) and
# swaks.  The system Postfix is installed unconfigured and never started:
# the suites run their own instances on loopback only.
# swaks speaks TLS through Net::SSLeay, which it only recommends.
DEB_TOOLS := postfix swaks libnet-ssleay-perl

deb-tools:
	@if command -v smtp-source >/dev/null && command -v smtp-sink >/dev/null \
	    && command -v postfix >/dev/null && command -v swaks >/dev/null \
	    && perl -MNet::SSLeay -e1 2>/dev/null; then :; else \
	  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q --no-install-recommends $(DEB_TOOLS) \
	    || { apt-get update -q && apt-get install -y -q --no-install-recommends $(DEB_TOOLS); }; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check relay tests twisted examples
	$(BIN)/mypy

clean:
	rm -rf $(VENV) _trial_temp build *.egg-info
