#!/usr/bin/env bash
# Build the launcher stub of PLATFORM with a glibc 2.31 floor: inside a Debian 11 (bullseye) root.
#
#   sudo stubs/build_stub.sh linux-x86_64      # native, ~15 min the first time, seconds when cached
#   sudo stubs/build_stub.sh linux-aarch64     # under qemu-user-static, much slower (see README)
#
# Steps, each cached under $GGUFILE_CACHE (default ~/.cache/ggufile) and skipped when done:
#   1. roots/bullseye-ARCH: `debootstrap --variant=minbase` from Debian's mirror (+ a C toolchain);
#   2. CPython 3.11 built in that root from Debian's own source tarball (bullseye ships 3.9, the
#      runtime needs >= 3.10), so libpython links against glibc 2.31 (aarch64: cross-compiled in
#      the amd64 root, so build linux-x86_64 first);
#   3. the manylinux wheels of NumPy/Numba/PyInstaller and the runtime's dependencies, downloaded
#      by the host's pip for the target platform and installed in the root with no index;
#   4. this tree's sources copied in; the AOT kernels compiled there (for aarch64: the lane
#      kernels' portable vector IR) and the stub frozen there by the ordinary `ggufile stub`.
# The result lands in $GGUFILE_CACHE/stubs/PLATFORM/, where `ggufile build` (and --platform)
# finds it by the hash of the sources it froze. Needs root (debootstrap, chroot, mount), and
# for a foreign architecture Debian's qemu-user-static + binfmt-support.
set -euo pipefail
{ # bash reads this block whole before running it: editing the file mid-build is safe

platform=${1:-}
case $platform in
    linux-x86_64) arch=amd64 machine=x86_64 ;;
    linux-aarch64) arch=arm64 machine=aarch64 ;;
    *) echo "usage: $0 linux-x86_64|linux-aarch64" >&2; exit 2 ;;
esac
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${GGUFILE_CACHE:-$HOME/.cache/ggufile}
root=$cache/roots/bullseye-$arch
mirror=${GGUFILE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
jobs=$(nproc)
# CPython: Debian bookworm's python3.11 source (upstream tarball), verified by sha256.
py_version=3.11.2
py_tarball=python3.11_${py_version}.orig.tar.gz
py_url=$mirror/pool/main/p/python3.11/$py_tarball
py_sha256=2411c74bda5bbcfcddaf4531f66d1adc73f247f529aee981b029513aefdbf849
# What the stub bundles (pinned: a stub is rebuilt only when these or the sources change).
wheels=(numpy==2.4.6 numba==0.68.1 pyinstaller==6.22.3 pip setuptools wheel
        click jinja2 regex starlette uvicorn)
packages=build-essential,libffi-dev,zlib1g-dev,libssl-dev,libbz2-dev,liblzma-dev,uuid-dev,xz-utils

say() { echo "build_stub[$platform]: $*" >&2; }
die() { say "error: $*"; exit 1; }
stamp() { date +%s; }
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot and mount)"
command -v debootstrap >/dev/null || die "needs debootstrap: apt-get install -y debootstrap"
started=$(stamp)
# One build at a time: the aarch64 build uses the amd64 root too, and each unmounts what it mounted.
mkdir -p "$cache/roots"
exec 9>"$cache/roots/.build_stub.lock"
flock -n 9 || { say "waiting for another build_stub.sh to finish"; flock 9; }

# -- foreign architecture: run its binaries through qemu-user-static (binfmt_misc) -------------
if [ "$machine" != "$(uname -m)" ]; then
    command -v "qemu-$machine-static" >/dev/null \
        || die "needs qemu-user-static: apt-get install -y qemu-user-static binfmt-support"
    if [ ! -e "/proc/sys/fs/binfmt_misc/qemu-$machine" ]; then
        mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
        update-binfmts --enable "qemu-$machine" || die "cannot register qemu-$machine with binfmt_misc"
    fi
fi

# -- 1. the bullseye root ----------------------------------------------------------------------
if [ ! -f "$root/.ggufile-root-ok" ]; then
    say "debootstrap bullseye ($arch) into $root"
    t=$(stamp)
    rm -rf "$root.tmp"
    mkdir -p "$(dirname "$root")"
    nice -n 10 debootstrap --variant=minbase --arch="$arch" --include="$packages" \
        bullseye "$root.tmp" "$mirror" >"$cache/roots/debootstrap-$arch.log" 2>&1 \
        || die "debootstrap failed (log: $cache/roots/debootstrap-$arch.log)"
    rm -rf "$root"
    mv "$root.tmp" "$root"
    touch "$root/.ggufile-root-ok"
    say "root ready in $(( $(stamp) - t ))s"
fi

mounted=()
cleanup() {
    local m
    for m in "${mounted[@]}"; do umount -l "$m" 2>/dev/null || true; done
}
trap cleanup EXIT
mount_root() {  # /proc and /dev inside a root, unmounted on exit
    local r=$1 m
    for m in proc dev; do
        if ! mountpoint -q "$r/$m"; then
            if [ $m = proc ]; then mount -t proc proc "$r/proc"; else mount --bind /dev "$r/dev"; fi
            mounted+=("$r/$m")
        fi
    done
}
chroot_env() {  # chroot_env ROOT CMD...: a clean environment inside ROOT
    local r=$1; shift
    chroot "$r" /usr/bin/env -i HOME=/root LANG=C.UTF-8 PATH=/opt/python/bin:/usr/bin:/bin:/usr/sbin:/sbin \
        PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore DEBIAN_FRONTEND=noninteractive \
        nice -n 10 "$@"
}
in_root() { chroot_env "$root" "$@"; }
mount_root "$root"

# -- 2. CPython in the root --------------------------------------------------------------------
# Natively for x86-64. For aarch64 it is cross-compiled in the amd64 root (Debian's
# gcc-aarch64-linux-gnu + the arm64 -dev packages through multiarch, against the same bullseye
# glibc), with the amd64 root's CPython as the build Python: compiling it under qemu takes hours.
configure_flags="--prefix=/opt/python --enable-shared --without-ensurepip --disable-test-modules LDFLAGS=-Wl,-rpath,/opt/python/lib"
fetch_python() {
    mkdir -p "$cache/src"
    if [ ! -f "$cache/src/$py_tarball" ]; then
        say "fetching $py_url"
        curl -fsSL -o "$cache/src/$py_tarball.part" "$py_url" && mv "$cache/src/$py_tarball.part" "$cache/src/$py_tarball"
    fi
    echo "$py_sha256  $cache/src/$py_tarball" | sha256sum -c --quiet - || die "$py_tarball: checksum mismatch"
}
unpack_python() {  # unpack_python ROOT DIR
    rm -rf "$1/$2" && mkdir -p "$1/$2"
    tar -xzf "$cache/src/$py_tarball" -C "$1/$2"
}
if [ ! -f "$root/opt/python/.ggufile-python-ok" ]; then
    fetch_python
    t=$(stamp)
    if [ "$machine" = "$(uname -m)" ]; then
        say "building CPython $py_version in the root ($jobs jobs)"
        unpack_python "$root" tmp/python-build
        in_root sh -c "cd /tmp/python-build/Python-$py_version && ./configure $configure_flags \
                >/tmp/python-build/configure.log 2>&1 && \
            make -j$jobs >/tmp/python-build/make.log 2>&1 && make install >/tmp/python-build/install.log 2>&1" \
            || die "CPython build failed (logs in $root/tmp/python-build/)"
        rm -rf "$root/tmp/python-build"
    else
        native=$cache/roots/bullseye-amd64
        [ -f "$native/opt/python/.ggufile-python-ok" ] \
            || die "cross-building CPython needs the x86-64 root first: $0 linux-x86_64"
        mount_root "$native"
        say "cross-compiling CPython $py_version for $machine in the amd64 root ($jobs jobs)"
        cp /etc/resolv.conf "$native/etc/resolv.conf"
        cross_pkgs="gcc-$machine-linux-gnu pkg-config"
        for dev in libffi-dev zlib1g-dev libssl-dev libbz2-dev liblzma-dev uuid-dev; do cross_pkgs="$cross_pkgs $dev:$arch"; done
        chroot_env "$native" sh -c "dpkg --add-architecture $arch && apt-get update -qq && \
            apt-get install -y -qq $cross_pkgs" >"$cache/roots/cross-$arch.log" 2>&1 \
            || die "installing the cross toolchain failed (log: $cache/roots/cross-$arch.log)"
        unpack_python "$native" "tmp/python-cross-$arch"
        chroot_env "$native" sh -c "cd /tmp/python-cross-$arch/Python-$py_version && \
            PKG_CONFIG_LIBDIR=/usr/lib/$machine-linux-gnu/pkgconfig:/usr/share/pkgconfig \
            ./configure --host=$machine-linux-gnu --build=x86_64-linux-gnu \
                --with-build-python=/opt/python/bin/python3.11 $configure_flags \
                ac_cv_file__dev_ptmx=yes ac_cv_file__dev_ptc=no ac_cv_buggy_getaddrinfo=no >../configure.log 2>&1 && \
            make -j$jobs >../make.log 2>&1 && make install DESTDIR=/tmp/python-cross-$arch/dest >../install.log 2>&1" \
            || die "CPython cross build failed (logs in $native/tmp/python-cross-$arch/)"
        rm -rf "$root/opt/python"
        mkdir -p "$root/opt"
        cp -a "$native/tmp/python-cross-$arch/dest/opt/python" "$root/opt/python"
        rm -rf "$native/tmp/python-cross-$arch"
        in_root python3 -c "import ctypes, ssl, lzma, bz2, zlib, uuid; print('CPython', __import__('sys').version)" \
            || die "the cross-built CPython does not start in the $arch root"
    fi
    touch "$root/opt/python/.ggufile-python-ok"
    say "CPython ready in $(( $(stamp) - t ))s"
fi

# -- 3. the wheels (the host's pip fetches the target's manylinux wheels) -----------------------
wheel_dir=$cache/wheels-stub/$platform
plats=()  # every manylinux tag glibc 2.31 runs (pip does not expand a --platform to older ones)
for v in 31 30 29 28 27 26 25 24 17; do plats+=(--platform "manylinux_2_${v}_$machine"); done
plats+=(--platform "manylinux2014_$machine")
if [ ! -f "$wheel_dir/.ok-${wheels[*]// /_}" ]; then
    say "downloading the manylinux wheels for $platform"
    rm -rf "$wheel_dir" && mkdir -p "$wheel_dir"
    python3 -m pip download -q --only-binary=:all: "${plats[@]}" --python-version 3.11 \
        --implementation cp --abi cp311 -d "$wheel_dir" "${wheels[@]}" || die "pip download failed"
    touch "$wheel_dir/.ok-${wheels[*]// /_}"
fi
if [ ! -f "$root/opt/python/.ggufile-wheels-ok-${wheels[*]// /_}" ]; then
    say "installing the wheels in the root"
    if [ "$machine" = "$(uname -m)" ]; then
        rm -rf "$root/tmp/wheels" && cp -r "$wheel_dir" "$root/tmp/wheels"
        pip_wheel=$(cd "$root/tmp/wheels" && ls pip-*.whl | head -n 1)
        in_root python3 "/tmp/wheels/$pip_wheel/pip" install -q --no-index --find-links /tmp/wheels \
            "${wheels[@]}" || die "installing the wheels in the root failed"
        rm -rf "$root/tmp/wheels"
    else  # installing is unpacking: the host's pip does it, not pip under qemu
        python3 -m pip install -q --no-index --find-links "$wheel_dir" --only-binary=:all: "${plats[@]}" \
            --python-version 3.11 --implementation cp --abi cp311 \
            --target "$root/opt/python/lib/python3.11/site-packages" "${wheels[@]}" \
            || die "installing the wheels in the root failed"
    fi
    touch "$root/opt/python/.ggufile-wheels-ok-${wheels[*]// /_}"
fi

# -- 4. this tree: AOT kernels, then the stub ---------------------------------------------------
dest=$cache/stubs/$platform
tree=$(python3 -c 'import runpy, sys; print(runpy.run_path(sys.argv[1])["tree_hash"]())' "$repo/builder/platforms.py")
if [ -z "${GGUFILE_STUB_FORCE:-}" ] && grep -qs "\"tree\": \"$tree\"" "$dest"/*.json; then
    say "a stub for these sources (tree $tree) is cached in $dest (GGUFILE_STUB_FORCE=1 rebuilds)"
    exit 0
fi
say "copying the sources (tree $tree), compiling the AOT kernels ($machine)"
t=$(stamp)
build=$root/tmp/ggufile-build
rm -rf "$build" && mkdir -p "$build/src/ggufile" "$build/cache"
for part in runtime builder stubs; do
    tar -C "$repo" --exclude=__pycache__ --exclude='*.pyc' --exclude='*.so' --exclude='*.pyd' \
        --exclude=stubs/cache --exclude=stubs/prebuilt -cf - "$part" | tar -C "$build/src/ggufile" -xf -
done
echo '"""ggufile (staged for a stub build)."""' >"$build/src/ggufile/__init__.py"
in_root env CC=gcc PYTHONPATH=/tmp/ggufile-build/src python3 -m ggufile.runtime.kernels.src.aot_build \
    || die "AOT kernel build failed"
say "AOT kernels in $(( $(stamp) - t ))s; freezing the stub"
t=$(stamp)
in_root env PYTHONPATH=/tmp/ggufile-build/src GGUFILE_CACHE=/tmp/ggufile-build/cache \
    python3 -m ggufile.builder stub --launcher cached --force || die "stub build failed"
say "stub frozen in $(( $(stamp) - t ))s"

mkdir -p "$dest"
for f in "$build"/cache/stubs/*.runtime.tar.gz; do
    cp "$f.json" "$dest/$(basename "$f").json.part"
    cp "$f" "$dest/$(basename "$f").part"
    mv "$dest/$(basename "$f").part" "$dest/$(basename "$f")"
    mv "$dest/$(basename "$f").json.part" "$dest/$(basename "$f").json"
    say "stub: $dest/$(basename "$f") ($(du -h "$dest/$(basename "$f")" | cut -f1))"
done
# The kernels compiled in the root, kept beside the stub (the wheel build can ship them).
mkdir -p "$dest/kernels"
cp "$build"/src/ggufile/runtime/kernels/_aot_*.so "$dest/kernels/"
rm -rf "$build"
say "done in $(( $(stamp) - started ))s"
exit
}
