# The virtualenv is built from setup.cfg; every target below uses it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test dist-check crash interop bench bench-queue deb-tools exim lint venv clean

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

interop: $(STAMP) deb-tools exim
	$(BIN)/trial $(TRIAL_ARGS) tests.system.interop

# Benchmarks against Postfix, Haraka, python-slimta, aiosmtpd and twisted.mail
# (Haraka and slimta installed into $TMPDIR/relay-bench-cache when missing);
# writes bench/RESULTS.md and bench/ratios.png.
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

# Exim, only as an SMTP client for the CHUNKING interop test: Debian's exim4
# conflicts with the postfix package, so exim4-daemon-light (and libidn12,
# which it needs) is unpacked under build/exim, never installed; the setuid
# bit is dropped (the test runs it as an ordinary user with its own
# configuration).  Without it the Exim test is skipped.
EXIM_ROOT := build/exim

exim:
	@if [ ! -x $(EXIM_ROOT)/usr/sbin/exim4 ]; then \
	  rm -rf $(EXIM_ROOT) && mkdir -p $(EXIM_ROOT)/debs && cd $(EXIM_ROOT)/debs && \
	  { apt-get download -q exim4-daemon-light libidn12 \
	    || { apt-get update -q && apt-get download -q exim4-daemon-light libidn12; }; } \
	  && for deb in *.deb; do dpkg -x "$$deb" ..; done \
	  && chmod 0755 ../usr/sbin/exim4 \
	  || echo "Exim could not be unpacked: its interop test will be skipped"; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check relay tests twisted examples
	$(BIN)/mypy

clean:
	rm -rf $(VENV) _trial_temp build *.egg-info
