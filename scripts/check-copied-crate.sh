#!/usr/bin/env bash
# Proves docs/USE-IN-YOUR-SERVICE.md's "What to copy": copies registry/ and proto/ into a temporary
# workspace exactly as it says, uses the section's ```toml block as that workspace's Cargo.toml, and
# builds the library, its example and its unit tests there. Exits non-zero, saying which step
# failed, when the guide does not produce a crate that builds.
#
#   scripts/check-copied-crate.sh
#
# Builds into target/copied-crate/ (its own directory: crates of the same names from two
# workspaces must not share one), so a second run is quick. Needs network access to crates.io
# the first time, like any cargo build.
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

export CARGO_TARGET_DIR="$root/target/copied-crate"
manifest=(--manifest-path "$work/Cargo.toml")
cargo build "${manifest[@]}" -p registry ||
	fail "the copied registry crate does not build from $guide's steps"
cargo build "${manifest[@]}" -p registry --example greeter_service ||
	fail "the copied crate's example does not build from $guide's steps"
cargo test "${manifest[@]}" -p registry --lib ||
	fail "the copied crate's unit tests fail"
echo "check-copied-crate.sh: registry/ and proto/ copied as $guide says build, with the example and the unit tests"
