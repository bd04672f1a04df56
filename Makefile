# The few verbs people type. `make test` on a fresh machine installs everything it needs
# (Debian packages, the Python venv, the Go tools, the VM kernel) and runs every test tier.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
PY := $(CURDIR)/.venv/bin/python
STAMPS := .stamps
HOST_PKGS := e2fsprogs xfsprogs btrfs-progs util-linux thin-provisioning-tools dmsetup kmod \
  mmdebstrap buildah containerd
# the e2e cluster: container runtime, loopback-only CNI, iptables for kubelet, busybox for test pods
E2E_PKGS := runc containernetworking-plugins iptables busybox-static
LINT_DIRS := csi_thin tests $(wildcard bench)
# Host tiers, one pytest run each (a folder of tests/ each); the vm tier runs in the VM.
HOST_TIERS := unit integration root kube e2e
# Each tier's pytest gets its own base temp dir, keyed by this checkout: pytest prunes older numbered
# dirs of the shared /tmp/pytest-of-<user>, and would pull pools and mounts out from under a run of
# another checkout on the same host (short, for unix socket paths).
BASETEMP := /tmp/ct-$(shell echo '$(CURDIR)' | cksum | cut -c1-6)
TIMES := $(STAMPS)/times.tsv

.PHONY: all setup deps venv proto tools manifests vm-setup image image-context lint unit test test-host test-stress vm-test demo demo-reflink bench bench-native bench-scale bench-kube clean

all: test

setup: deps venv proto tools vm-setup

deps: $(STAMPS)/deps
$(STAMPS)/deps: Makefile scripts/apt-install.sh
	scripts/apt-install.sh $(HOST_PKGS) $(E2E_PKGS)
	@mkdir -p $(STAMPS) && touch $@

venv: $(STAMPS)/venv
$(STAMPS)/venv: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@mkdir -p $(STAMPS) && touch $@

proto: csi_thin/csi/pb/__init__.py csi_thin/snapshotter/pb/__init__.py
csi_thin/csi/pb/__init__.py csi_thin/snapshotter/pb/__init__.py &: tools/csi/go.mod tools/csi/go.sum \
  tools/kubelet/go.mod tools/kubelet/go.sum tools/containerd/go.mod tools/containerd/go.sum scripts/gen-proto.sh $(STAMPS)/venv
	PYTHON=$(PY) scripts/gen-proto.sh

tools:
	tools/build.sh

# deploy/: plain manifests rendered from the chart's defaults (a test fails when they are stale).
manifests: tools
	scripts/manifests.sh

vm-setup: deps
	vm/setup.sh

# The container image (Containerfile) built here without a registry: the base from Debian packages
# (mmdebstrap), buildah --pull=never, an OCI archive for `ctr images import` (scripts/image.sh).
# Rebuilt only when its inputs change; the base is cached under ~/.cache/csi-thin/image.
image: deps venv proto
	scripts/image.sh

# Only the build context (bin/image/context: the wheels), for docker or podman:
#   docker build -f Containerfile -t localhost/csi-thin:VERSION bin/image/context
image-context: venv proto
	scripts/image.sh context

lint: venv proto
	$(PY) -m ruff check $(LINT_DIRS)
	$(PY) -m ruff format --check $(LINT_DIRS)
	$(PY) -m mypy
	.venv/bin/lint-imports

unit: venv proto
	$(PY) -m pytest tests/unit -q

# Host tiers: unit, integration (with the tools-marked tests), root. The vm tier is deselected here
# by marker and runs in the VM below; a vm test run on the host fails instead of skipping.
test-host: setup lint image
	for t in $(HOST_TIERS); do $(PY) -m pytest tests/$$t -m "not vm" -q --basetemp=$(BASETEMP)-$$t; done

# The root tier beside a node's normal noise (tests/stress.py: loop devices of someone else's coming
# and going, blkid-like readers of ours; STRESS_STALE=1 adds stale EIO loop devices for the whole
# run, which breaks anyone on this machine running code without the fix), STRESS_RUNS times in a row.
# A failure stops the loop: it is a bug to fix, never a retry. PYTEST_ADDOPTS narrows it as usual.
# Its own --basetemp: pytest then never sweeps the shared /tmp/pytest-of-root of others' old runs.
STRESS_RUNS ?= 1
STRESS_STALE ?= 0
STRESS_TMP ?= /tmp/csi-thin-stress-$(notdir $(CURDIR))
test-stress: venv proto tools
	for i in $$(seq 1 $(STRESS_RUNS)); do \
	  start=$$(date +%s); \
	  CSI_THIN_STRESS=1 CSI_THIN_STRESS_STALE=$(STRESS_STALE) $(PY) -m pytest tests/root -q -p no:cacheprovider \
	    --basetemp=$(STRESS_TMP) \
	    || { echo "stress: run $$i failed"; exit 1; }; \
	  echo "stress: run $$i of $(STRESS_RUNS) clean in $$(( $$(date +%s) - start ))s"; \
	done

vm-test: venv proto vm-setup
	VM_ENV="PYTEST_ADDOPTS" vm/run.sh -- "$(PY) -m pytest -m vm tests/vm -q -p no:cacheprovider --basetemp=/scratch/pytest"

# Every step timed (scripts/timed.sh); the per-tier table ends the run, and a failing step prints
# it before the run stops.
test:
	@rm -f $(TIMES)
	@scripts/check-tiers.sh $(HOST_TIERS) vm
	scripts/timed.sh setup $(MAKE) --no-print-directory setup
	scripts/timed.sh lint $(MAKE) --no-print-directory lint
	scripts/timed.sh image $(MAKE) --no-print-directory image
	for t in $(HOST_TIERS); do scripts/timed.sh $$t $(PY) -m pytest tests/$$t -m "not vm" -q --basetemp=$(BASETEMP)-$$t; done
	scripts/timed.sh vm $(MAKE) --no-print-directory vm-test
	@scripts/timing-table.sh

# The embedded default on real dm-thin: natively where the kernel has device-mapper, else in the VM.
demo: venv proto
	if [ -e /dev/mapper/control ]; then $(PY) -m csi_thin.demo --backend dmthin; \
	else $(MAKE) --no-print-directory vm-setup && vm/run.sh -- "$(PY) -m csi_thin.demo --backend dmthin"; fi

# The same demo on the reflink backend, natively (no device-mapper needed; root for loop + mount).
# XFS volumes: online ext4 grow needs CAP_SYS_RESOURCE, which sandboxed hosts like ours may lack.
demo-reflink: venv proto
	$(PY) -m csi_thin.demo --backend reflink --fs-type xfs

# Benchmarks print ratios measured side by side in one VM boot, with LMDB and the pools on a virtio
# disk (an fsync costs what a disk costs, not tmpfs's nothing). Each bench exits non-zero when it
# misses its target; all run, and `make bench` fails if any missed.
# bench/kube_ops.py runs natively (make bench-kube); synctrace.py is a helper, not a bench
BENCHES := $(filter-out bench/synctrace.py bench/kube_ops.py,$(wildcard bench/*.py))
bench: venv proto vm-setup
	@echo "bench: host load average before: $$(cut -d' ' -f1-3 /proc/loadavg) on $$(nproc) cores"
	rc=0; vm/run.sh --disk 8G -- 'rc=0; for b in $(BENCHES); do echo "== $$b"; $(PY) $$b || rc=1; done; exit $$rc' \
	  || rc=$$?; echo "bench: host load average after: $$(cut -d' ' -f1-3 /proc/loadavg)"; exit $$rc

# The CSI-layer bench natively on the reflink backend (real CPU speed, no emulation).
bench-native: venv proto
	$(PY) bench/csi_ops.py

# 10,000 volumes + 10,000 snapshots natively on the reflink backend (bench/scale.py; `make bench` runs it
# on dm-thin in the VM). BENCH_SCALE_N=2000 for a quicker look.
bench-scale: venv proto
	$(PY) bench/scale.py

# Kubernetes mode natively: a real kube-apiserver + etcd, the controller and a node agent (root).
bench-kube: venv proto tools
	$(PY) bench/kube_ops.py

clean:
	rm -rf $(STAMPS) csi_thin/csi/pb csi_thin/snapshotter/pb bin .mypy_cache .ruff_cache .pytest_cache
