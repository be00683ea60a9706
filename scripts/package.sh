#!/usr/bin/env bash
# Builds the Debian package into target/debian/ (blkrep_<version>-1_<arch>.deb):
# installs cargo-deb if missing, builds the release binary (or reuses it), generates
# the man pages and shell completions from the CLI, and packs them with the binary,
# the systemd units (contrib/systemd) and the example configurations
# (contrib/config, conffiles in /etc/blkrep). What goes where is
# [package.metadata.deb] in Cargo.toml. Prints the package's path last.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo deb --version >/dev/null 2>&1; then
    echo "== Installing cargo-deb"
    cargo install cargo-deb --locked
fi

target_dir=${CARGO_TARGET_DIR:-target}
release="$target_dir/release"

echo "== Release build"
cargo build --release --locked --bin blkrep

echo "== Man pages and completions from the CLI"
docs="$release/docs"
rm -rf "$docs"
"$release/blkrep" generate-docs --dir "$docs" >/dev/null
# Debian keeps man pages compressed; -n leaves no time stamp in them.
gzip -9n "$docs"/man/*.1

echo "== The package"
rm -f "$target_dir"/debian/blkrep_*.deb "$target_dir"/debian/blkrep-dbgsym_*.ddeb
# The binary stripped; its debug symbols (the release profile keeps them) in
# blkrep-dbgsym_<version>-1_<arch>.ddeb beside it, as Debian does.
cargo deb --no-build --locked --dbgsym
ls "$target_dir"/debian/blkrep_*.deb
