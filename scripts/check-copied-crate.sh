#!/usr/bin/env bash
# Proves docs/USE-IN-YOUR-SERVICE.md's "What to copy": copies registry/ and proto/ into a temporary
# workspace exactly as it says, uses the section's ```toml block as that workspace's Cargo.toml, and
# builds the library, its example and its unit tests there. Exits non-zero, saying which step
# failed, when the guide does not produce a crate that builds.
#
#   scripts/check-copied-crate.sh
#
# Builds into the project's own target/: cargo keys every artifact by the package's source, so the
# copied registry and proto get artifacts of their own, while the dependencies they share with the
# project's build (same versions from Cargo.lock, same features) are reused: after ./test.sh only
# the copied crates and the few dependencies built with other features compile (about 35 s on
# 2 cores instead of three minutes), and the project's own build stays fresh. Needs network
# access to crates.io when nothing is built yet, like any cargo build.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
guide=docs/USE-IN-YOUR-SERVICE.md
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() {
	echo "check-copied-crate.sh: $*" >&2
	exit 1
}

# Step 2 of the guide: its toml block is the root Cargo.toml.
awk '/^## What to copy/ { section = 1 } section && /^```toml$/ { inside = 1; next }
	inside && /^```$/ { exit } inside { print }' "$guide" >"$work/Cargo.toml"
[[ -s $work/Cargo.toml ]] || fail "no \`\`\`toml block under '## What to copy' in $guide"

# Step 1: the two folders, without the integration tests and the dev-dependencies only they need.
cp -r registry proto "$work/"
rm -rf "$work/registry/tests"
sed -i -E '/^(testkit|tracing-subscriber)( = \{.*\}|\.workspace = true)$/d' "$work/registry/Cargo.toml"
# The versions CI tested.
cp Cargo.lock "$work/"

export CARGO_TARGET_DIR="$root/target"
manifest=(--manifest-path "$work/Cargo.toml")
cargo build "${manifest[@]}" -p registry ||
	fail "the copied registry crate does not build from $guide's steps"
cargo build "${manifest[@]}" -p registry --example greeter_service ||
	fail "the copied crate's example does not build from $guide's steps"
cargo test "${manifest[@]}" -p registry --lib ||
	fail "the copied crate's unit tests fail"
echo "check-copied-crate.sh: registry/ and proto/ copied as $guide says build, with the example and the unit tests"
