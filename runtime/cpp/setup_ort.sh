#!/usr/bin/env bash
# Fetch ONNX Runtime's C/C++ API headers for runtime/cpp, idempotently, without touching the system's apt
# sources. The PyPI onnxruntime wheel ships the library but no headers; Debian 12 has no onnxruntime
# package. We take the headers of Debian 13 (trixie) libonnxruntime-dev 1.21.0 (C API version 21)
# through a private apt configuration that adds the trixie suite of the mirror this machine already
# uses, then unpack the .deb with dpkg-deb -x. The library itself is the wheel's libonnxruntime.so,
# opened at run time with dlopen (ORT_API_MANUAL_INIT): no link-time dependency on its versioned symbols.
#
# Output: runtime/cpp/third_party/onnxruntime/include/onnxruntime_cxx_api.h (and friends).
# Users with their own ONNX Runtime SDK skip this and configure CMake with -DONNXRUNTIME_ROOT=DIR.
# Also makes sure the build tools and the two Debian -dev packages the library uses are installed
# (nlohmann-json3-dev, libssl-dev; libgrpc++-dev, optional) when run as root; otherwise it says what is missing.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="$here/third_party/onnxruntime"
package="libonnxruntime-dev"
version="1.21.0"                       # pinned: C API version 21; the wheel's 1.2x/1.3x libraries serve it

if [ -n "${ONNXRUNTIME_ROOT:-}" ]; then
    echo "setup_ort: ONNXRUNTIME_ROOT=$ONNXRUNTIME_ROOT: CMake uses that SDK's headers; nothing to fetch"
elif [ -f "$dest/include/onnxruntime_cxx_api.h" ] && [ "$(cat "$dest/VERSION" 2>/dev/null)" = "$version" ]; then
    echo "setup_ort: headers present in $dest (ONNX Runtime $version)"
else
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    # The Debian mirror the system already uses (deb822 or one-line sources); deb.debian.org otherwise.
    mirror="$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
              | grep -v security | grep -oE 'https?://[^ ]+/debian/?' | head -1 || true)"
    mirror="${mirror:-http://deb.debian.org/debian}"
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    mkdir -p "$work/etc/sources.list.d" "$work/etc/preferences.d" "$work/state/lists/partial" \
             "$work/cache/archives/partial"
    echo "deb [signed-by=$keyring] ${mirror%/} trixie main" > "$work/etc/sources.list"
    apt_private=(-o "Dir::Etc::SourceList=$work/etc/sources.list" -o "Dir::Etc::SourceParts=$work/etc/sources.list.d"
                 -o "Dir::Etc::Preferences=$work/etc/preferences" -o "Dir::Etc::PreferencesParts=$work/etc/preferences.d"
                 -o "Dir::State=$work/state" -o "Dir::State::status=/dev/null" -o "Dir::Cache=$work/cache"
                 -o "APT::Architecture=amd64" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
    echo "setup_ort: fetching $package $version from ${mirror%/} trixie (private apt configuration)"
    apt-get "${apt_private[@]}" -qq update
    (cd "$work" && apt-get "${apt_private[@]}" -qq download "$package=$version*")
    deb="$(ls "$work"/${package}_*.deb)"
    dpkg-deb -x "$deb" "$work/x"
    headers="$(dirname "$(find "$work/x" -name onnxruntime_cxx_api.h | head -1)")"
    [ -f "$headers/onnxruntime_c_api.h" ] || { echo "setup_ort: $deb has no onnxruntime_c_api.h" >&2; exit 1; }
    rm -rf "$dest"
    mkdir -p "$dest/include"
    cp "$headers"/*.h "$dest/include/"
    echo "$version" > "$dest/VERSION"
    echo "setup_ort: headers in $dest/include"
fi

missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v g++ >/dev/null || missing+=(g++)
command -v ninja >/dev/null || missing+=(ninja-build)
[ -f /usr/include/nlohmann/json.hpp ] || missing+=(nlohmann-json3-dev)
[ -f /usr/include/openssl/evp.h ] || missing+=(libssl-dev)
# optional: libnezha_grpc (the native gRPC transport and load client) is built only when gRPC is there
if [ ! -f /usr/include/grpcpp/grpcpp.h ]; then
    if [ "$(id -u)" = 0 ]; then missing+=(libgrpc++-dev pkg-config)
    else echo "setup_ort: no libgrpc++-dev: libnezha_grpc is not built (nezha serve then speaks gRPC through grpcio)" >&2
    fi
fi
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get -qq update && apt-get install -y -qq "${missing[@]}"
    else
        echo "setup_ort: missing ${missing[*]}: run apt-get install ${missing[*]} as root" >&2
        exit 1
    fi
fi
