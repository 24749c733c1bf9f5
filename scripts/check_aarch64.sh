#!/usr/bin/env bash
# Does the built wheel work on aarch64 (the Jetson CPU architecture)? Runs the installed-wheel
# checks (tests/installed/check_installed.py) in an arm64 Debian bookworm root under
# qemu-user-static and compares the aarch64 numbers with the x86 reference (within 1e-5).
#
#   sudo scripts/check_aarch64.sh                  # build the wheel from this repository
#   sudo scripts/check_aarch64.sh --wheel X.whl    # check a given wheel
#
# Needs root (debootstrap, chroot, mounts), a Debian/Ubuntu host with apt, .venv (the dev
# environment: export + reference), network to the Debian mirror and PyPI the first time.
# The arm64 root and its venv are cached in ${RMT_AARCH64_ROOT:-/var/cache/rmt-edge/aarch64-root}
# (first run ~4 min more); delete that folder to start over. RMT_AARCH64_MIRROR overrides the
# Debian mirror. See docs/JETSON.md for what this proves and what it does not.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=${RMT_AARCH64_ROOT:-/var/cache/rmt-edge/aarch64-root}
MIRROR=${RMT_AARCH64_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
INCLUDE=python3,python3-venv,ca-certificates,libstdc++6
ROOT_KEY="suite=$SUITE arch=arm64 variant=minbase include=$INCLUDE"
ROOT_DONE=.rmt-edge-root            # written last: holds ROOT_KEY
ROOT_BUILDING=.rmt-edge-building    # present while the root is being made
VENV=/opt/rmt-venv                  # inside the root
VENV_DONE=$VENV/.rmt-edge-venv-done
VENV_PACKAGES=(numpy onnxruntime pytest click)
DEV_PY=$REPO/.venv/bin/python
WHEEL=
KEEP=0

say() { printf '[check_aarch64] %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }
usage() { sed -n '2,13s/^# \{0,1\}//p' "$0" >&2; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
  case $1 in
    --wheel) [ $# -ge 2 ] || die "--wheel needs a path"; WHEEL=$(realpath "$2"); shift 2 ;;
    --wheel=*) WHEEL=$(realpath "${1#--wheel=}"); shift ;;
    --keep) KEEP=1; shift ;;   # keep the temporary and in-root work folders (paths printed)
    -h|--help) usage 0 ;;
    *) say "unknown argument: $1"; usage 2 ;;
  esac
done

[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap, chroot and mounts need it)"
[ -x "$DEV_PY" ] || die "no dev venv at $DEV_PY (it exports the sample and computes the x86 reference)"
[ -z "$WHEEL" ] || [ -f "$WHEEL" ] || die "--wheel $WHEEL: no such file"
case $ROOT in /|/usr|/var|/var/cache|/tmp|/home|"") die "RMT_AARCH64_ROOT=$ROOT is not a sensible cache folder";; esac

now() { date +%s.%N; }
T0=$(now)
STEP=0
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
# step "description" command...: one timed step. A failing step ends the script (set -e);
# the EXIT trap then names the step and its time.
CUR_STEP=
step() {
  STEP=$((STEP + 1)); CUR_STEP="step $STEP: $1"; CUR_START=$(now); shift
  say "$CUR_STEP ..."
  "$@"
  say "$CUR_STEP: done in $(elapsed "$CUR_START")s"
  CUR_STEP=
}

TMP=$(mktemp -d /tmp/rmt-aarch64.XXXXXX)
RUN=work/$(basename "$TMP")      # the work folder inside the root, relative to it
MOUNTED=0

# Every mount point at or under $1, deepest first.
mounts_under() {
  awk -v d="$1" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r
}
unmount_under() {
  local m
  for m in $(mounts_under "$1"); do umount "$m" 2>/dev/null || umount -l "$m" || true; done
  [ -z "$(mounts_under "$1")" ] || die "could not unmount everything under $1: $(mounts_under "$1" | tr '\n' ' ')"
}
cleanup() {
  local rc=$?
  set +e
  if [ "$MOUNTED" -eq 1 ]; then unmount_under "$ROOT/proc"; unmount_under "$ROOT/sys"; unmount_under "$ROOT/dev"; fi
  if [ "$KEEP" -eq 1 ]; then say "kept $TMP and $ROOT/$RUN"
  else rm -rf "$TMP"; [ -d "$ROOT/$RUN" ] && rm -rf --one-file-system "${ROOT:?}/$RUN"; fi
  [ $rc -eq 0 ] || [ -z "$CUR_STEP" ] || say "$CUR_STEP: FAILED after $(elapsed "$CUR_START")s"
  [ $rc -eq 0 ] || say "FAILED (exit $rc) after $(elapsed "$T0")s in total"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# One run at a time per cache (a second run waits).
mkdir -p "$(dirname "$ROOT")"
exec 9>"$ROOT.lock"
flock -n 9 || { say "another check holds $ROOT.lock; waiting"; flock 9; }

# ---- 1. the wheel -------------------------------------------------------------------------
build_wheel() {
  # A copy of the source, as tests/packaging/test_wheel.py does (the build writes build/, egg-info).
  mkdir -p "$TMP/source" "$TMP/dist"
  tar -C "$REPO" --exclude=./.venv --exclude=./.git --exclude=__pycache__ --exclude='*.egg-info' \
      --exclude=./build --exclude=.pytest_cache --exclude=./out --exclude=./.whl -cf - . | tar -C "$TMP/source" -xf -
  "$DEV_PY" -m build --wheel --no-isolation --outdir "$TMP/dist" "$TMP/source" > "$TMP/build.log" 2>&1 \
    || { tail -n 40 "$TMP/build.log" >&2; return 1; }
  WHEEL=$(ls "$TMP"/dist/*.whl)
}
if [ -z "$WHEEL" ]; then step "build the wheel from $REPO" build_wheel; fi
say "wheel: $WHEEL"

# ---- 2. x86 export + reference (the same calls as test_wheel.py's `exported` fixture) ------
export_reference() {
  PYTHONPATH=$REPO "$DEV_PY" - "$REPO" "$TMP/x86" <<'EOF'
import platform, sys
from pathlib import Path

import numpy as np
import onnxruntime

from rmt_export.exporter import ExportOptions, export_bundle
from rmt_export.validate import ValidationPlan
from rmt_runtime import RMTRuntime
from tests.installed.check_installed import make_reference

repo, work = Path(sys.argv[1]), Path(sys.argv[2])
work.mkdir(parents=True)
bundle = export_bundle(repo / "samples/keyrecall/model.pt", work / "bundle",
                       ExportOptions(plan=ValidationPlan(segments=2))).path
rng = np.random.default_rng(0)
rt = RMTRuntime.load(bundle)
reference = make_reference(rt, rng.integers(0, rt.bundle.vocab_size, 150), rng.integers(0, 256, 20), 12)
np.savez(work / "reference.npz", **reference)
(work / "bundle_path").write_text(str(bundle))
print(f"[check_aarch64] x86 reference: {platform.machine()}, Python {platform.python_version()}, "
      f"onnxruntime {onnxruntime.__version__}, numpy {np.__version__}; bundle {bundle}", file=sys.stderr)
EOF
}
step "export samples/keyrecall/model.pt and compute the x86 reference" export_reference
BUNDLE=$(cat "$TMP/x86/bundle_path")

# ---- 3. the arm64 root (cached) -----------------------------------------------------------
host_packages() {
  local missing=() p
  for p in debootstrap qemu-user-static binfmt-support; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing host packages: ${missing[*]}"
    command -v apt-get >/dev/null || die "need ${missing[*]} and there is no apt-get here"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  local bm=/proc/sys/fs/binfmt_misc
  if ! mountpoint -q "$bm"; then
    mount -t binfmt_misc binfmt_misc "$bm" \
      || die "cannot mount binfmt_misc on $bm (a container without CAP_SYS_ADMIN? run it on the host or a --privileged container)"
  fi
  if ! grep -qx enabled "$bm/qemu-aarch64" 2>/dev/null; then
    update-binfmts --enable qemu-aarch64 || die "update-binfmts --enable qemu-aarch64 failed"
  fi
  grep -qx enabled "$bm/qemu-aarch64" || die "$bm/qemu-aarch64 is not enabled"
  say "binfmt: $(grep -E '^(interpreter|flags)' "$bm/qemu-aarch64" | tr '\n' ' ')"
}
step "host packages and binfmt_misc (qemu-aarch64)" host_packages

in_root() {  # run a command in the root with a clean environment (no host pip config, proxies)
  env -i PATH="$VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" HOME=/root LANG=C.UTF-8 \
    PIP_CERT=/etc/rmt-host-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 PIP_ROOT_USER_ACTION=ignore \
    "$@"
}
mount_root() {
  [ "$MOUNTED" -eq 0 ] || return 0
  MOUNTED=1
  mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
  mountpoint -q "$ROOT/sys" || mount --bind /sys "$ROOT/sys"
  mountpoint -q "$ROOT/dev" || mount --bind /dev "$ROOT/dev"
}
root_network() {  # for pip: the host's resolver and CA bundle
  cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
  local ca
  for ca in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
    [ -f "$ca" ] && { cp -L "$ca" "$ROOT/etc/rmt-host-ca.crt"; return 0; }
  done
  cp -L "$ROOT/etc/ssl/certs/ca-certificates.crt" "$ROOT/etc/rmt-host-ca.crt"
}

root_usable() {
  [ -f "$ROOT/$ROOT_DONE" ] && [ "$(cat "$ROOT/$ROOT_DONE")" = "$ROOT_KEY" ] && [ ! -e "$ROOT/$ROOT_BUILDING" ] \
    && [ -x "$ROOT/usr/bin/python3" ] && [ -d "$ROOT/proc" ]
}
make_root() {
  if root_usable; then say "reusing the arm64 root in $ROOT"; return 0; fi
  if [ -d "$ROOT" ] && [ -n "$(ls -A "$ROOT")" ]; then
    [ -e "$ROOT/$ROOT_DONE" ] || [ -e "$ROOT/$ROOT_BUILDING" ] \
      || die "$ROOT exists, is not empty and was not made by this script; not deleting it (set RMT_AARCH64_ROOT)"
    say "the root in $ROOT is incomplete or stale (a run died half-way?); rebuilding it"
    unmount_under "$ROOT"
    rm -rf --one-file-system "${ROOT:?}"
  fi
  mkdir -p "$ROOT"
  touch "$ROOT/$ROOT_BUILDING"
  say "debootstrap $SUITE arm64 into $ROOT from $MIRROR (a few minutes; log: $ROOT.debootstrap.log)"
  if ! debootstrap --arch=arm64 --variant=minbase --include="$INCLUDE" "$SUITE" "$ROOT" "$MIRROR" \
       > "$ROOT.debootstrap.log" 2>&1; then
    tail -n 30 "$ROOT.debootstrap.log" >&2
    [ -f "$ROOT/debootstrap/debootstrap.log" ] && tail -n 30 "$ROOT/debootstrap/debootstrap.log" >&2
    return 1
  fi
  unmount_under "$ROOT"   # debootstrap's own proc/sys mounts, should any be left
  rm -f "$ROOT/$ROOT_BUILDING"
  printf '%s\n' "$ROOT_KEY" > "$ROOT/$ROOT_DONE"
}
step "arm64 Debian $SUITE root (debootstrap, cached)" make_root
enter_root() {
  root_network
  mount_root
  local machine
  machine=$(in_root chroot "$ROOT" /bin/uname -m)
  say "inside the root: uname -m = $machine; $(in_root chroot "$ROOT" /usr/bin/python3 --version)"
  [ "$machine" = aarch64 ] || die "uname -m in the root says $machine, not aarch64"
}
step "mount /proc, /sys, /dev in the root; resolv.conf and CA bundle for pip" enter_root

make_venv() {
  if [ -f "$ROOT$VENV_DONE" ] && in_root chroot "$ROOT" "$VENV/bin/python" -c 'import numpy, onnxruntime, pytest, click' 2>/dev/null; then
    say "reusing the root's venv $VENV"; return 0
  fi
  rm -rf --one-file-system "${ROOT:?}$VENV"
  in_root chroot "$ROOT" /usr/bin/python3 -m venv "$VENV"
  in_root chroot "$ROOT" "$VENV/bin/python" -m pip install --quiet "${VENV_PACKAGES[@]}"
  in_root chroot "$ROOT" "$VENV/bin/python" -m pip list --format=freeze | tr '\n' ' ' >&2; echo >&2
  touch "$ROOT$VENV_DONE"
}
step "venv in the root: pip install ${VENV_PACKAGES[*]} (cached)" make_venv

install_wheel() {
  mkdir -p "$ROOT/$RUN"
  cp "$WHEEL" "$ROOT/$RUN/"
  in_root chroot "$ROOT" "$VENV/bin/python" -m pip install --quiet --force-reinstall --no-deps "/$RUN/$(basename "$WHEEL")"
  in_root chroot "$ROOT" "$VENV/bin/python" -m pip check   # the wheel's requirements are all present
  in_root chroot "$ROOT" "$VENV/bin/python" -m pip list --format=freeze 2>/dev/null \
    | grep -iE '^(rmt-edge|onnxruntime|numpy|click|torch)==' | tr '\n' ' ' >&2; echo >&2
}
step "install $(basename "$WHEEL") in the root's venv (--force-reinstall --no-deps)" install_wheel

# ---- 4. the checks on aarch64 -------------------------------------------------------------
run_checks() {
  cp -r "$BUNDLE" "$ROOT/$RUN/bundle"
  cp "$TMP/x86/reference.npz" "$ROOT/$RUN/reference.npz"
  cp "$REPO/tests/installed/check_installed.py" "$ROOT/$RUN/test_installed.py"
  in_root RMT_CHECK_BUNDLE="/$RUN/bundle" RMT_CHECK_REFERENCE="/$RUN/reference.npz" \
    chroot "$ROOT" /bin/sh -c "cd /$RUN && exec $VENV/bin/python -m pytest -q -p no:cacheprovider test_installed.py"
}
step "tests/installed/check_installed.py on aarch64 (pytest in the chroot)" run_checks

compare() {
  in_root chroot "$ROOT" /bin/sh -c "cd /$RUN && exec $VENV/bin/python -" <<'EOF'
import json, platform, subprocess, sys
from pathlib import Path
import numpy as np
import onnxruntime

with np.load("reference.npz") as data:
    ref = {name: data[name] for name in data.files}
np.save("ids.npy", ref["ids"])
run = subprocess.run([str(Path(sys.executable).with_name("rmt-run")), "--bundle", "bundle", "--ids", "ids.npy", "--json",
                      "--save-outputs", "out.npz"], capture_output=True, text=True)
if run.returncode:
    sys.exit(f"rmt-run failed:\n{run.stderr}")
report = json.loads(run.stdout)
with np.load("out.npz") as out:
    diffs = {name: float(np.abs(out[name].astype(np.float64) - ref[name]).max()) for name in ("memory", "last_logits")}
print(f"[check_aarch64] aarch64: {platform.machine()}, Python {platform.python_version()}, onnxruntime "
      f"{onnxruntime.__version__}, numpy {np.__version__}, backend {report['backend']}", file=sys.stderr)
print("[check_aarch64] max |aarch64 - x86|: " + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()), file=sys.stderr)
sys.exit(0 if max(diffs.values()) <= 1e-5 else "over the 1e-5 tolerance")
EOF
}
step "rmt-run --save-outputs on aarch64 vs the x86 reference" compare

say "PASSED: the wheel installs and runs on aarch64 (qemu), numbers within 1e-5 of x86; total $(elapsed "$T0")s"
