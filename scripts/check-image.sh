#!/usr/bin/env bash
# Checks the Dockerfile as far as this machine can without a container engine:
# 1. runs the builder stage's cargo command (read from the Dockerfile) here;
# 2. every shared library the binary needs (readelf NEEDED) comes from a Debian package that the
#    runtime stage has: installed by its apt-get line (or pulled in by those packages'
#    dependencies), or part of the debian:bookworm-slim base image;
# 3. the programs the binary runs (Command::new in src/, the vendored fuser's fusermount, probe
#    commands in the chart) come from such packages too;
# 4. the binary's glibc symbol versions exist in bookworm (2.36);
# 5. the Dockerfile's COPY sources exist, and .dockerignore keeps every input of the build (the
#    targets and path dependencies of the Cargo manifests).
# Debian 12 here, like the runtime base, so `dpkg -S` maps files to the packages that ship them.
# CHECK_IMAGE_SKIP_BUILD=1 checks an existing target/release binary without building (iteration).
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKERFILE=${DOCKERFILE:-Dockerfile}
failures=0
fail() { echo "FAIL $*"; failures=$((failures + 1)); }
ok() { echo "ok   $*"; }

# Packages of debian:bookworm-slim (`docker run --rm debian:bookworm-slim dpkg-query -W -f '${Package}\n'`).
BASE_PACKAGES="apt base-files base-passwd bash bsdutils coreutils dash debconf debian-archive-keyring
debianutils diffutils dpkg e2fsprogs findutils gcc-12-base gpgv grep gzip hostname init-system-helpers
libacl1 libapt-pkg6.0 libattr1 libaudit-common libaudit1 libblkid1 libbz2-1.0 libc-bin libc6 libcap-ng0
libcap2 libcom-err2 libcrypt1 libdb5.3 libdebconfclient0 libext2fs2 libffi8 libgcc-s1 libgcrypt20
libgmp10 libgnutls30 libgpg-error0 libhogweed6 libidn2-0 liblz4-1 liblzma5 libmd0 libmount1 libnettle8
libp11-kit0 libpam-modules libpam-modules-bin libpam-runtime libpam0g libpcre2-8-0 libseccomp2
libselinux1 libsemanage-common libsemanage2 libsepol2 libsmartcols1 libss2 libstdc++6 libsystemd0
libtasn1-6 libtinfo6 libudev1 libunistring2 libxxhash0 libzstd1 login logsave mawk mount ncurses-base
ncurses-bin passwd perl-base sed sysvinit-utils tar tzdata usr-is-merged util-linux util-linux-extra zlib1g"

# --- the Dockerfile -----------------------------------------------------------------------------
# The runtime stage is everything after the last FROM.
runtime_stage=$(awk '/^FROM /{buf=""} {buf = buf $0 "\n"} END {printf "%s", buf}' "$DOCKERFILE")
runtime_base=$(grep -m1 '^FROM ' <<<"$runtime_stage" | awk '{print $2}')
[ "$runtime_base" = "debian:bookworm-slim" ] \
  && ok "runtime base is $runtime_base (the base package list above)" \
  || fail "runtime base is $runtime_base; this check knows debian:bookworm-slim only"
# Join continuation lines, then take the words after `apt-get install` up to the next `&&`.
apt_packages=$(sed -e ':a' -e '/\\$/N; s/\\\n//; ta' <<<"$runtime_stage" \
  | grep -o 'apt-get install[^&]*' | sed 's/apt-get install//' | tr ' ' '\n' | grep -v '^-' | grep -v '^$' | sort -u)
[ -n "$apt_packages" ] || fail "no apt-get install in the runtime stage"
echo "     runtime apt packages: $(echo $apt_packages)"
build_cmd=$(sed -e ':a' -e '/\\$/N; s/\\\n//; ta' "$DOCKERFILE" | grep -o 'cargo build [^&]*' | head -1 | sed 's/ *$//')
[ -n "$build_cmd" ] || { fail "no cargo build command in $DOCKERFILE"; exit 1; }
case "$build_cmd" in
  *--locked*--release*|*--release*--locked*) ok "build command is locked and release: $build_cmd" ;;
  *) fail "build command must use --release --locked: $build_cmd" ;;
esac
bin=$(grep -o -- '--bin [A-Za-z0-9_-]*' <<<"$build_cmd" | awk '{print $2}')

# --- 1. the build ---------------------------------------------------------------------------------
target_dir=${CARGO_TARGET_DIR:-target}
if [ "${CHECK_IMAGE_SKIP_BUILD:-}" = 1 ] && [ -x "$target_dir/release/$bin" ]; then
  echo "     CHECK_IMAGE_SKIP_BUILD=1: not running $build_cmd (checking the existing binary)"
else
  echo "     running: $build_cmd"
  $build_cmd
fi
binary="$target_dir/release/$bin"
[ -x "$binary" ] && ok "built $binary" || { fail "no $binary"; exit 1; }

# The runtime stage's packages: the apt list, their dependencies (recursively), the base image.
declare -A have=()
for p in $BASE_PACKAGES; do have[$p]=1; done
deps_of() { # Depends and Pre-Depends of a package: installed (dpkg) or known to apt.
  local d
  d=$(dpkg-query -W -f='${Depends}, ${Pre-Depends}' "$1" 2>/dev/null) \
    || d=$(apt-cache show --no-all-versions "$1" 2>/dev/null | sed -n 's/^\(Pre-\)\{0,1\}Depends: //p' | tr '\n' ',') \
    || d=""
  # Alternatives (a | b): the first one is what apt installs.
  tr ',' '\n' <<<"$d" | sed 's/|.*//; s/(.*)//; s/:any//; s/ //g' | grep -v '^$' || true
}
queue=($apt_packages)
while [ ${#queue[@]} -gt 0 ]; do
  p=${queue[0]}; queue=("${queue[@]:1}")
  [ -n "${have[$p]:-}" ] && continue
  have[$p]=1
  if ! dpkg-query -W "$p" >/dev/null 2>&1 && ! apt-cache show "$p" >/dev/null 2>&1; then
    if compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
      fail "package $p (runtime stage) is not a Debian 12 package"
    else
      echo "note package $p is not installed and apt has no package lists (apt-get update): its dependencies are not followed"
    fi
  fi
  for d in $(deps_of "$p"); do queue+=("$d"); done
done

package_of() { # the Debian package shipping a file (merged /usr aware)
  local f=$1 alt out
  for alt in "$f" "$(readlink -f "$f")" "${f#/usr}" "/usr$f"; do
    out=$(dpkg -S "$alt" 2>/dev/null | head -1 | cut -d: -f1) && [ -n "$out" ] && { echo "$out"; return 0; }
  done
  return 1
}

# --- 2. shared libraries ----------------------------------------------------------------------
interp=$(readelf -l "$binary" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
for lib in $(readelf -d "$binary" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
  # awk reads to the end (no early exit): ldconfig would die of SIGPIPE, and pipefail with it.
  path=$(ldconfig -p | awk -v l="$lib" '!found && $1 == l && /x86-64|x86_64|AArch64|aarch64/ {print $NF; found = 1}')
  [ -z "$path" ] && [ "$(basename "$interp")" = "$lib" ] && path=$interp
  if [ -z "$path" ]; then fail "shared library $lib: not found on this machine"; continue; fi
  pkg=$(package_of "$path") || { fail "shared library $lib ($path): no package ships it"; continue; }
  [ -n "${have[$pkg]:-}" ] && ok "shared library $lib: $pkg (in the runtime image)" \
    || fail "shared library $lib comes from $pkg, which the runtime stage does not install"
done

# --- 3. programs the binary and the chart run ---------------------------------------------------
# src/: string literals given to Command::new or to the PathBuf it runs (files that use Command).
programs=$(grep -rlE 'Command::new' src | xargs grep -hoE '(Command::new|PathBuf::from)\("[A-Za-z0-9._-]+"\)' \
  | sed -E 's/.*\("(.*)"\)/\1/' | sort -u || true)
# The vendored fuser (pure-Rust mounts, no libfuse) runs fusermount3 when it cannot mount(2).
grep -q 'FUSERMOUNT3_BIN: &str = "fusermount3"' vendor/fuser/src/mnt/fuse_pure.rs && programs="$programs fusermount3"
# Probe commands of the chart's containers (exec probes run inside our image).
probes=$(grep -hoE 'command: \["[A-Za-z0-9._-]+"' manifests/*.yaml 2>/dev/null | sed -E 's/.*\["//; s/"$//' | sort -u || true)
programs=$(echo $programs $probes | tr ' ' '\n' | sort -u)
for prog in $programs; do
  [ "$prog" = datastore ] && continue
  path=$(type -P "$prog" || true)
  if [ -z "$path" ]; then fail "program $prog: not installed here, cannot tell its package"; continue; fi
  pkg=$(package_of "$path") || { fail "program $prog ($path): no package ships it"; continue; }
  [ -n "${have[$pkg]:-}" ] && ok "program $prog: $pkg (in the runtime image)" \
    || fail "program $prog comes from $pkg, which the runtime stage does not install"
done
# Lustre mounts (high-performance volumes) also need mount.lustre, which Debian does not package.
type -P mount.lustre >/dev/null || echo "note mount.lustre (Lustre client utilities) is not in Debian: the image has no" \
  "Lustre mount helper, so high-performance mounts need a Lustre-enabled image or host"

# --- 4. glibc symbol versions -------------------------------------------------------------------
glibc_max=$(objdump -T "$binary" | grep -oE 'GLIBC_[0-9]+\.[0-9]+' | sed 's/GLIBC_//' | sort -V | tail -1)
if [ "$(printf '%s\n2.36\n' "$glibc_max" | sort -V | tail -1)" = "2.36" ]; then
  ok "glibc symbols up to $glibc_max (bookworm has 2.36)"
else
  fail "the binary needs glibc $glibc_max; bookworm has 2.36"
fi

# --- 5. COPY sources ------------------------------------------------------------------------------
while read -r src_path; do
  [ -e "$src_path" ] || { fail "COPY source $src_path does not exist"; continue; }
  ok "COPY source $src_path exists"
done < <(grep -E '^COPY ' "$DOCKERFILE" | grep -v -- '--from=' | awk '{for (i = 2; i < NF; i++) print $i}')
# What cargo needs to load the workspace and build: every target and path dependency of the
# manifests, the build script and what it reads (proto/); none may be excluded by .dockerignore.
if ! python3 - <<'PY'
import fnmatch, sys, tomllib
from pathlib import Path

def inputs(manifest: Path) -> set[str]:
    base = manifest.parent
    doc = tomllib.loads(manifest.read_text())
    found = {manifest, base / "Cargo.lock"} if base == Path(".") else {manifest}
    for kind, default in (("bin", None), ("lib", None), ("test", "tests"), ("bench", "benches"), ("example", "examples")):
        targets = doc.get(kind, [])
        for t in targets if isinstance(targets, list) else [targets]:
            if "path" in t:
                found.add(base / t["path"])
            elif default:
                found.add(base / default / f"{t['name']}.rs")
    if (base / "build.rs").exists():
        found.add(base / "build.rs")
    tables = [doc.get(k, {}) for k in ("dependencies", "dev-dependencies", "build-dependencies")]
    tables += list(doc.get("patch", {}).values())
    for table in tables:
        for dep in table.values():
            if isinstance(dep, dict) and "path" in dep:
                found |= inputs(base / dep["path"] / "Cargo.toml")
                found.add(base / dep["path"] / "src")
    for member in doc.get("workspace", {}).get("members", []):
        if member != ".":
            found |= inputs(base / member / "Cargo.toml")
    return found

needed = {str(p).removeprefix("./") for p in inputs(Path("Cargo.toml"))} | {"src", "proto"}
patterns = [l.strip().rstrip("/") for l in Path(".dockerignore").read_text().splitlines()
            if l.strip() and not l.startswith("#")]
bad = 0
for path in sorted(needed):
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = [p for p in patterns if not p.startswith("!") and any(fnmatch.fnmatch(x, p) for x in prefixes)]
    if not Path(path).exists():
        print(f"FAIL build input {path} does not exist"); bad += 1
    elif excluded:
        print(f"FAIL build input {path} is excluded by .dockerignore ({excluded[0]})"); bad += 1
print(f"ok   {len(needed) - bad} build inputs in the context: " + ", ".join(sorted(needed)))
sys.exit(1 if bad else 0)
PY
then
  failures=$((failures + 1))
fi
grep -q "cp target/release/$bin /out/$bin" "$DOCKERFILE" && grep -q "COPY --from=builder /out/$bin " "$DOCKERFILE" \
  && ok "the runtime stage copies the built $bin" || fail "the runtime stage does not copy target/release/$bin"
grep -q 'kubectl-datastore' "$DOCKERFILE" && grep -rq '"kubectl-datastore"' src/cli \
  && ok "kubectl-datastore link (the binary answers to that name)" || fail "kubectl-datastore link or its handling in src/cli missing"

if [ "$failures" -gt 0 ]; then
  echo "check-image: $failures failed"
  exit 1
fi
echo "check-image: all checks passed"
