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
# Debian mirror, RMT_AARCH64_CPU the emulated CPU (qemu -cpu model; default cortex-a76).
# See docs/JETSON.md for what this proves and what it does not.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=${RMT_AARCH64_ROOT:-/var/cache/rmt-edge/aarch64-root}
MIRROR=${RMT_AARCH64_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
INCLUDE=python3,python3-venv,ca-certificates,libstdc++6
ROOT_KEY="suite=$SUITE arch=arm64 variant=minbase include=$INCLUDE"
ROOT_DONE=.rmt-edge-root            # written last: holds ROOT_KEY
ROOT_BUILDING=.rmt-edge-building    # present while the root is being made
# The emulated CPU: qemu's model nearest Jetson Orin's Cortex-A78AE (Armv8.2-A with fp16 and
# dot product; no SVE, i8mm or bf16), so ONNX Runtime picks the kernels it would pick there.
# qemu's default, "max", would offer SVE/SME, which no Jetson has.
CPU=${RMT_AARCH64_CPU:-cortex-a76}
VENV=/opt/rmt-venv                  # inside the root
VENV_DONE=$VENV/.rmt-edge-venv-done
VENV_PACKAGES=(numpy onnxruntime pytest click pydantic tokenizers)  # tokenizers: the wheel's text extra
DEV_PY=$REPO/.venv/bin/python
WHEEL=
KEEP=0

say() { printf '[check_aarch64] %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }
usage() { sed -n '2,14s/^# \{0,1\}//p' "$0" >&2; exit "${1:-0}"; }

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
  if [ "$MOUNTED" -eq 1 ]; then (unmount_under "$ROOT/proc"); (unmount_under "$ROOT/sys"); (unmount_under "$ROOT/dev"); fi
  if [ "$KEEP" -eq 1 ]; then say "kept $TMP and $ROOT/$RUN (the latter until the next run)"
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
  tar -C "$REPO" --exclude=./.venv --exclude=./.venv-triton --exclude=./.git --exclude=__pycache__ --exclude='*.egg-info' \
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
    if [ -f /usr/lib/binfmt.d/qemu-aarch64.conf ] && ! update-binfmts --display qemu-aarch64 >/dev/null 2>&1; then
      grep -v '^#' /usr/lib/binfmt.d/qemu-aarch64.conf > "$bm/register"   # qemu >= 9.1 packages: systemd's binfmt.d
    else
      update-binfmts --enable qemu-aarch64 || die "update-binfmts --enable qemu-aarch64 failed"
    fi
  fi
  grep -qx enabled "$bm/qemu-aarch64" || die "$bm/qemu-aarch64 is not enabled"
  say "binfmt: $(grep -E '^(interpreter|flags)' "$bm/qemu-aarch64" | tr '\n' ' ')"
}
step "host packages and binfmt_misc (qemu-aarch64)" host_packages

in_root() {  # run a command in the root with a clean environment (no host pip config, proxies)
  env -i PATH="$VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" HOME=/root LANG=C.UTF-8 QEMU_CPU="$CPU" \
    PIP_CERT=/etc/rmt-host-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 PIP_ROOT_USER_ACTION=ignore \
    "$@"
}
mount_root() {
  [ "$MOUNTED" -eq 0 ] || return 0
  MOUNTED=1
  local d
  for d in proc sys dev; do unmount_under "$ROOT/$d"; done   # left by a run that was killed
  mount -t proc proc "$ROOT/proc"
  mount --bind /sys "$ROOT/sys"
  mount --bind /dev "$ROOT/dev"
  # Without binfmt's F flag the kernel looks for the interpreter inside the root.
  local bm=/proc/sys/fs/binfmt_misc/qemu-aarch64 interp
  if ! grep -q '^flags:.*F' "$bm"; then
    interp=$(awk '$1 == "interpreter" { print $2 }' "$bm")
    mkdir -p "$ROOT$(dirname "$interp")"
    cp -L "$interp" "$ROOT$interp"
  fi
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
  printf '%s\n' "$ROOT_KEY" > "$ROOT/$ROOT_DONE"
  rm -f "$ROOT/$ROOT_BUILDING"
}
step "arm64 Debian $SUITE root (debootstrap, cached)" make_root
# qemu-user before 8.2 (Debian 12 has 7.2) shows aarch64 programs the HOST's x86 /proc/cpuinfo.
# ONNX Runtime's cpuinfo library finds no ARM processor in it and crashes at import (SIGSEGV,
# NULL pointer). qemu >= 8.2 writes an aarch64 /proc/cpuinfo for the emulated CPU itself; for
# older qemu this writes the same text, in qemu's format, from what the emulated CPU reports
# (MIDR_EL1 read with mrs, HWCAP/HWCAP2 from the aux vector), to bind-mount over it.
emulated_cpuinfo() {
  in_root chroot "$ROOT" /usr/bin/python3 - <<'PY'
import ctypes, mmap, os
HWCAP = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc "
         "dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg").split()
HWCAP2 = ("dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm svef64mm "
          "svebf16 i8mm bf16 dgh rng bti mte ecv afp rpres mte3 sme smei16i64 smef64f64 smei8i32 smef16f32 "
          "smeb16f32 smef32f32 smefa64 wfxt ebf16 sveebf16 cssc rprfm sve2p1 sme2 sme2p1 smei16i32 smebi32i32 "
          "smeb16b16 smef16f16 mops hbc").split()
libc = ctypes.CDLL(None)
libc.getauxval.restype = ctypes.c_ulong
hwcap, hwcap2 = libc.getauxval(16), libc.getauxval(26)  # AT_HWCAP, AT_HWCAP2
code = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
code.write((0xD5380000).to_bytes(4, "little") + (0xD65F03C0).to_bytes(4, "little"))  # mrs x0, midr_el1; ret
midr = ctypes.CFUNCTYPE(ctypes.c_uint64)(ctypes.addressof(ctypes.c_char.from_buffer(code)))()
features = [n for i, n in enumerate(HWCAP) if hwcap >> i & 1] + [n for i, n in enumerate(HWCAP2) if hwcap2 >> i & 1]
for cpu in range(os.cpu_count()):
    print(f"processor\t: {cpu}\nmodel name\t: ARMv8 Processor rev {midr & 0xF} (v8l)\nBogoMIPS\t: 100.00\n"
          f"Features\t: {' '.join(features)}\nCPU implementer\t: 0x{midr >> 24 & 0xFF:02x}\n"
          f"CPU architecture: 8\nCPU variant\t: 0x{midr >> 20 & 0xF:x}\nCPU part\t: 0x{midr >> 4 & 0xFFF:03x}\n"
          f"CPU revision\t: {midr & 0xF}\n")
PY
}
enter_root() {
  root_network
  mount_root
  local machine
  machine=$(in_root chroot "$ROOT" /bin/uname -m)
  say "inside the root: uname -m = $machine; $(in_root chroot "$ROOT" /usr/bin/python3 --version); QEMU_CPU=$CPU;" \
      "$( (qemu-aarch64-static --version || qemu-aarch64 --version) 2>/dev/null | head -n 1)"
  [ "$machine" = aarch64 ] || die "uname -m in the root says $machine, not aarch64"
  if ! in_root chroot "$ROOT" /bin/grep -q '^CPU implementer' /proc/cpuinfo; then
    say "this qemu shows aarch64 programs the host's /proc/cpuinfo (qemu < 8.2): bind-mounting" \
        "the emulated $CPU's over it"
    emulated_cpuinfo > "$TMP/cpuinfo"
    mount --bind "$TMP/cpuinfo" "$ROOT/proc/cpuinfo"
  fi
  say "aarch64 /proc/cpuinfo: $(in_root chroot "$ROOT" /bin/sh -c \
      'grep -m1 "^CPU part" /proc/cpuinfo; grep -m1 ^Features /proc/cpuinfo' | tr '\n\t' '  ' | tr -s ' ')"
}
step "mount /proc, /sys, /dev in the root; resolv.conf and CA bundle for pip; /proc/cpuinfo" enter_root

make_venv() {
  if [ -f "$ROOT$VENV_DONE" ] && in_root chroot "$ROOT" "$VENV/bin/python" -c 'import numpy, onnxruntime, pytest, click, pydantic, tokenizers' 2>/dev/null; then
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
  # Work folders of earlier runs (killed, or --keep): this run holds the lock, none is in use.
  find "$ROOT/work" -mindepth 1 -maxdepth 1 -name 'rmt-aarch64.*' -exec rm -rf --one-file-system {} + 2>/dev/null || true
  mkdir -p "$ROOT/$RUN"
  cp "$WHEEL" "$ROOT/$RUN/"
  in_root chroot "$ROOT" "$VENV/bin/python" -m pip install --quiet --force-reinstall --no-deps "/$RUN/$(basename "$WHEEL")"
  in_root chroot "$ROOT" "$VENV/bin/python" -m pip check   # the wheel's requirements are all present
  in_root chroot "$ROOT" "$VENV/bin/python" -m pip list --format=freeze 2>/dev/null \
    | grep -iE '^(rmt-edge|onnxruntime|numpy|click|pydantic|torch)==' | tr '\n' ' ' >&2; echo >&2
}
step "install $(basename "$WHEEL") in the root's venv (--force-reinstall --no-deps)" install_wheel

# ---- 4. the checks on aarch64 -------------------------------------------------------------
run_checks() {
  cp -r "$BUNDLE" "$ROOT/$RUN/bundle"
  cp "$TMP/x86/reference.npz" "$ROOT/$RUN/reference.npz"
  cp "$REPO/tests/installed/check_installed.py" "$ROOT/$RUN/test_installed.py"
  in_root RMT_CHECK_BUNDLE="/$RUN/bundle" RMT_CHECK_REFERENCE="/$RUN/reference.npz" \
    chroot "$ROOT" /bin/sh -c "cd /$RUN && exec $VENV/bin/python -m pytest -q -p no:cacheprovider --basetemp=/$RUN/pytest test_installed.py"
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
