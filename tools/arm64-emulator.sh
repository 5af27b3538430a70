#!/usr/bin/env bash
# Set up, once, what `edgeft device check BUNDLE --emulate CPU` needs to run a bundle with ONNX
# Runtime's real aarch64 kernels on an x86-64 host, under QEMU user-mode emulation:
#   - QEMU's aarch64 user-mode emulator (Debian's qemu-user-static, unpacked, not installed;
#     or the host's qemu-aarch64-static when there is one)
#   - an arm64 userland with Python 3.11 (Debian's arm64 debs of python3.11 and libstdc++6 and
#     their dependencies, fetched with a private apt configuration: the host's dpkg state is
#     never read or written) unpacked with dpkg -x
#   - aarch64 wheels from PyPI: onnxruntime, numpy, tokenizers, Pillow, pluggy (pip download
#     with the manylinux aarch64 platform tags), installed into the arm64 root
#   - one small root per emulated CPU: links into the shared root plus a /proc/cpuinfo of that CPU
#     (QEMU 7.2 hands the host's to the guest, and onnxruntime picks its kernels from it: a
#     mismatch segfaults or hits SIGILL):
#       cortex-a72   QEMU -cpu cortex-a72: Armv8.0 NEON, no dot product (Raspberry Pi 4; Carmel's int8 class)
#       cortex-a76   QEMU -cpu cortex-a76: Armv8.2 NEON + SDOT/UDOT (Raspberry Pi 5; Cortex-A78AE's class)
#       armv9-i8mm   QEMU -cpu max,sme=off: Armv9 with SVE2, I8MM (SMMLA), BF16 (Tensor G3's class);
#                    SME off: onnxruntime's SME kernels compute wrongly under QEMU 7.2 (STACK.md).
#                    Its cpuinfo "Features" are decoded from the HWCAP bits QEMU gives that core.
# Everything lives under ${EDGEFT_ARM64:-~/.cache/edgeft/arm64}; a second run finds it ready.
# Needs: bash, apt-get and dpkg-deb (Debian or Ubuntu host), python3 with pip, network access to
# a Debian mirror and PyPI (or their caches). About 230 MB.
#
#   tools/arm64-emulator.sh            set up (or say it is ready)
#   tools/arm64-emulator.sh --check    exit 0 when set up, 1 when not
#   tools/arm64-emulator.sh --remove   delete the cache
set -euo pipefail

CACHE="${EDGEFT_ARM64:-${XDG_CACHE_HOME:-$HOME/.cache}/edgeft/arm64}"
ROOT="$CACHE/root"
READY="$CACHE/ready"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
# the device side's dependencies, pinned as the repository's constraints pin them
CONSTRAINTS="$HERE/../constraints.txt"
WHEELS=(onnxruntime numpy tokenizers pillow pluggy)
DEBS=(python3.11 libstdc++6)

case "${1:-}" in
  --check) [[ -f "$READY" ]] && exit 0 || exit 1 ;;
  --remove) rm -rf "$CACHE"; echo "removed $CACHE"; exit 0 ;;
  "") ;;
  *) echo "usage: $0 [--check|--remove]" >&2; exit 2 ;;
esac
CPUS=(cortex-a72 cortex-a76 armv9-i8mm)
qemu_cpu() {  # the QEMU -cpu argument of an emulated CPU (edgeft/emulate.py has the same table)
  case "$1" in armv9-i8mm) echo "max,sme=off" ;; *) echo "$1" ;; esac
}
missing=()
for cpu in "${CPUS[@]}"; do [[ -x "$CACHE/cpu/$cpu/usr/bin/python3.11" ]] || missing+=("$cpu"); done
if [[ -f "$READY" && ${#missing[@]} -eq 0 ]]; then
  echo "arm64 emulator ready in $CACHE"; exit 0
fi
mkdir -p "$CACHE"
t0=$SECONDS
if [[ -f "$READY" ]]; then  # set up before a CPU was added: only that CPU's root is new
  QEMU="$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["qemu"])' "$READY")"
  echo "qemu: $QEMU; adding the root of ${missing[*]}"
else

# 1. QEMU user-mode emulator
QEMU="$(command -v qemu-aarch64-static || true)"
if [[ -z "$QEMU" ]]; then
  mkdir -p "$CACHE/qemu-deb"
  if [[ ! -x "$CACHE/qemu/usr/bin/qemu-aarch64-static" ]]; then
    (cd "$CACHE/qemu-deb" && apt-get download qemu-user-static >/dev/null)
    dpkg-deb -x "$CACHE"/qemu-deb/qemu-user-static_*.deb "$CACHE/qemu"
  fi
  QEMU="$CACHE/qemu/usr/bin/qemu-aarch64-static"
fi
echo "qemu: $QEMU ($("$QEMU" --version | head -1))"

# 2. arm64 userland, by a private apt configuration
APT="$CACHE/apt"
mkdir -p "$APT/state/lists/partial" "$APT/cache/archives/partial" "$APT/etc/preferences.d" "$APT/etc/apt.conf.d"
: > "$APT/state/status"
if [[ -d /etc/apt/sources.list.d ]]; then
  mkdir -p "$APT/etc/sources.list.d"
  cp /etc/apt/sources.list.d/*.sources "$APT/etc/sources.list.d/" 2>/dev/null || true
fi
[[ -f /etc/apt/sources.list ]] && cp /etc/apt/sources.list "$APT/etc/sources.list" || : > "$APT/etc/sources.list"
APT_OPTS=(-o "APT::Architecture=arm64" -o "APT::Architectures::=arm64"
          -o "Dir::State=$APT/state" -o "Dir::State::status=$APT/state/status"
          -o "Dir::Cache=$APT/cache" -o "Dir::Etc=$APT/etc"
          -o "Dir::Etc::sourcelist=$APT/etc/sources.list" -o "Dir::Etc::sourceparts=$APT/etc/sources.list.d"
          -o "Dir::Etc::trusted=/etc/apt/trusted.gpg" -o "Dir::Etc::trustedparts=/etc/apt/trusted.gpg.d"
          -o "Debug::NoLocking=1" -o "APT::Sandbox::User=$(id -un)")
apt-get "${APT_OPTS[@]}" -qq update
apt-get "${APT_OPTS[@]}" -qq -y --download-only install "${DEBS[@]}" >/dev/null
mkdir -p "$ROOT"
n=0
for deb in "$APT"/cache/archives/*_arm64.deb "$APT"/cache/archives/*_all.deb; do
  [[ -f "$deb" ]] || continue
  dpkg-deb -x "$deb" "$ROOT"; n=$((n + 1))
done
echo "arm64 userland: $n debs unpacked into $ROOT"
# usrmerge: /lib and /bin are links into /usr on bookworm; the debs ship some files under /lib
for d in lib bin sbin; do
  if [[ -d "$ROOT/$d" && ! -L "$ROOT/$d" ]]; then
    mkdir -p "$ROOT/usr/$d"; cp -a "$ROOT/$d/." "$ROOT/usr/$d/"; rm -rf "${ROOT:?}/$d"
  fi
  [[ -e "$ROOT/$d" ]] || ln -s "usr/$d" "$ROOT/$d"
done

# 3. aarch64 wheels
SITE="$ROOT/usr/lib/python3/dist-packages"
mkdir -p "$CACHE/wheels" "$SITE"
pins=()
for w in "${WHEELS[@]}"; do
  pin="$(grep -i "^$w==" "$CONSTRAINTS" 2>/dev/null | head -1 || true)"
  pins+=("${pin:-$w}")
done
"$PYTHON" -m pip download -q --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 \
  --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 \
  --dest "$CACHE/wheels" "${pins[@]}"
"$PYTHON" -m pip install -q --no-index --no-deps --find-links "$CACHE/wheels" --target "$SITE" \
  --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 \
  --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 --upgrade "$CACHE"/wheels/*.whl
echo "wheels: $(ls "$CACHE/wheels" | wc -l) installed into $SITE"

fi  # the shared root

# 4. one root per CPU: links into the shared root, its own /proc/cpuinfo
cpuinfo() {  # $1 implementer, $2 part number, $3 variant, $4 revision, $5 features
  for i in 0 1 2 3; do
    printf 'processor\t: %s\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: %s\nCPU architecture: 8\nCPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %s\n\n' \
      "$i" "$5" "$1" "$3" "$2" "$4"
  done
}
# Linux's arm64 HWCAP and HWCAP2 bit names, in bit order (arch/arm64/include/uapi/asm/hwcap.h)
HWCAP_NAMES="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg"
HWCAP2_NAMES="dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm svef64mm svebf16 i8mm bf16 dgh rng bti mte ecv afp rpres mte3 sme smei16i64 smef64f64 smei8i32 smef16f32 smeb16f32 smef32f32 smefa64 wfxt"
qemu_features() {  # the feature names of the HWCAP bits QEMU gives core $1 (read by the arm64 Python, no onnxruntime)
  "$QEMU" -cpu "$(qemu_cpu "$1")" -L "$ROOT" "$ROOT/usr/bin/python3.11" -c '
import ctypes, sys
get = ctypes.CDLL(None).getauxval
get.restype, get.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
names = [sys.argv[1].split(), sys.argv[2].split()]
bits = [get(16), get(26)]  # AT_HWCAP, AT_HWCAP2
print(" ".join(n for word, table in zip(bits, names) for i, n in enumerate(table) if word >> i & 1))
' "$HWCAP_NAMES" "$HWCAP2_NAMES"
}
for cpu in "${CPUS[@]}"; do
  dir="$CACHE/cpu/$cpu"
  rm -rf "$dir"; mkdir -p "$dir/proc"
  for entry in "$ROOT"/*; do ln -s "$entry" "$dir/$(basename "$entry")"; done
  case "$cpu" in
    cortex-a72) cpuinfo 0x41 0xd08 0x0 3 "fp asimd evtstrm crc32 cpuid" > "$dir/proc/cpuinfo" ;;
    cortex-a76) cpuinfo 0x41 0xd0b 0x4 1 "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp" > "$dir/proc/cpuinfo" ;;
    # QEMU's max core has MIDR implementer 0 ("software"), part 'Q' (target/arm/cpu64.c)
    armv9-i8mm) cpuinfo 0x00 0x051 0x0 0 "$(qemu_features "$cpu")" > "$dir/proc/cpuinfo" ;;
  esac
done

# 5. prove it: import onnxruntime on each CPU
for cpu in "${CPUS[@]}"; do
  dir="$CACHE/cpu/$cpu"
  "$QEMU" -cpu "$(qemu_cpu "$cpu")" -L "$dir" "$dir/usr/bin/python3.11" -c \
    "import onnxruntime, numpy, tokenizers, PIL, platform; print('$cpu', platform.machine(), 'onnxruntime', onnxruntime.__version__, 'numpy', numpy.__version__)"
done
printf '{"qemu": "%s", "root": "%s", "cpus": ["%s"]}\n' "$QEMU" "$ROOT" "$(IFS=,; echo "${CPUS[*]}" | sed 's/,/", "/g')" > "$READY"
echo "arm64 emulator ready in $CACHE ($((SECONDS - t0)) s)"
