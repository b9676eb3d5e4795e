#!/usr/bin/env bash
# Checks that each Simplified Chinese translation is in sync with its English original.
#
# For every (English, Chinese) pair below:
#   - the fenced code blocks (```sh, ```text, ```rust, ... but not ```mermaid, whose labels are
#     translated) must be the same, in the same order, byte for byte, fences included;
#   - the two files must have the same sequence of `## ` / `### ` headings (count and order);
#   - every relative link `](target)` in the Chinese file must resolve: the file exists relative
#     to the Chinese file, and a `#fragment` names a heading of the target (GitHub's anchors).
#
# Prints one line per pair in sync and exits 0; otherwise says which pair, which block (with a
# unified diff), which headings or which link, and exits 1.
#
# Usage: scripts/check-docs-sync.sh        (from anywhere; paths are relative to the repo root)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PAIRS=(
  "README.md README.zh-CN.md"
  "docs/HOW-IT-WORKS.md docs/zh-CN/HOW-IT-WORKS.md"
)

# A UTF-8 locale, so that sed's [:alnum:] keeps Chinese characters when building anchors.
# Without one, #fragments are not checked (only that the linked files exist).
check_fragments=0
for loc in C.UTF-8 C.utf8 en_US.UTF-8 en_US.utf8; do
  if locale -a 2>/dev/null | grep -qx "$loc"; then
    export LC_ALL="$loc"
    check_fragments=1
    break
  fi
done
if ((!check_fragments)); then
  echo "note: no UTF-8 locale found; #fragments of links are not checked" >&2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# split_blocks FILE DIR: writes each non-mermaid fenced code block of FILE (fence lines included)
# to DIR/0001, DIR/0002, ... and its starting line number to DIR/lines.
split_blocks() {
  mkdir -p "$2"
  awk -v dir="$2" '
    !inb && /^[ ]*```/ {
      inb = 1; lang = $0; sub(/^[ ]*```[ ]*/, "", lang); sub(/[ ].*$/, "", lang)
      keep = (lang != "mermaid")
      if (keep) { n++; out = sprintf("%s/%04d", dir, n); print NR > (dir "/lines") }
      if (keep) print > out
      next
    }
    inb {
      if (keep) print > out
      if ($0 ~ /^[ ]*```[ ]*$/) { inb = 0; if (keep) close(out) }
    }
  ' "$1"
  touch "$2/lines"
}

# prose FILE: the lines of FILE outside fenced code blocks, as "LINENO<TAB>text".
prose() {
  awk '
    /^[ ]*```/ { inb = !inb; next }
    !inb { print NR "\t" $0 }
  ' "$1"
}

# heading_levels FILE: one line per `## `/`### ` heading: "LEVEL LINENO text".
heading_levels() {
  prose "$1" | awk -F'\t' '
    $2 ~ /^## /  { print "## line " $1 ": " substr($2, 4) }
    $2 ~ /^### / { print "### line " $1 ": " substr($2, 5) }
  '
}

# anchors FILE: the GitHub anchor of every heading of FILE, one per line.
anchors() {
  local text slug
  declare -A seen=()
  while IFS= read -r text; do
    slug=$(printf '%s' "$text" | sed -E 's/^ +| +$//g; s/[^[:alnum:] _-]//g; s/ /-/g')
    slug=${slug,,}
    [[ -z $slug ]] && continue
    if [[ -n ${seen[$slug]+x} ]]; then
      seen[$slug]=$((seen[$slug] + 1))
      printf '%s-%s\n' "$slug" "${seen[$slug]}"
    else
      seen[$slug]=0
      printf '%s\n' "$slug"
    fi
  done < <(prose "$1" | cut -f2- | sed -nE 's/^#{1,6} +//p')
}

# check_links FILE: every relative link of FILE resolves. Prints the broken ones; returns 1 if any.
check_links() {
  local file=$1 dir lineno text target path frag resolved bad=0
  dir=$(dirname "$file")
  while IFS=$'\t' read -r lineno text; do
    # Drop inline code spans, then take every ](target).
    # shellcheck disable=SC2016 # the backticks are literal: they delimit inline code spans
    text=$(printf '%s' "$text" | sed -E 's/`[^`]*`//g')
    while IFS= read -r target; do
      [[ -z $target ]] && continue
      target=${target#](}
      target=${target%)}
      target=${target%% *} # drop a "title"
      case $target in
        http://* | https://* | mailto:* | ftp://*) continue ;;
      esac
      path=${target%%#*}
      frag=
      [[ $target == *#* ]] && frag=${target#*#}
      if [[ -z $path ]]; then
        resolved=$file
      elif [[ $dir == . ]]; then
        resolved=$path
      else
        resolved="$dir/$path"
      fi
      if [[ ! -e $resolved ]]; then
        echo "  $file:$lineno: broken link: $target (no such file: $resolved)"
        bad=1
        continue
      fi
      if ((check_fragments)) && [[ -n $frag && -f $resolved && $resolved == *.md ]]; then
        # Read the whole list (no `anchors | grep -q`: with pipefail, grep's early exit
        # would fail the pipeline through SIGPIPE).
        if ! grep -qxF -- "$frag" <<<"$(anchors "$resolved")"; then
          echo "  $file:$lineno: broken link: $target (no heading with anchor #$frag in $resolved)"
          bad=1
        fi
      fi
    done < <(printf '%s\n' "$text" | grep -oE '\]\([^)]*\)' || true)
  done < <(prose "$file" | grep -F '](' || true)
  return "$bad"
}

status=0
pairno=0
for pair in "${PAIRS[@]}"; do
  read -r en zh <<<"$pair"
  pairno=$((pairno + 1))
  failed=0
  for f in "$en" "$zh"; do
    if [[ ! -f $f ]]; then
      echo "FAIL $en <-> $zh: $f does not exist"
      status=1
      continue 2
    fi
  done

  # 1. Code blocks, byte for byte.
  split_blocks "$en" "$work/$pairno/en"
  split_blocks "$zh" "$work/$pairno/zh"
  mapfile -t en_lines <"$work/$pairno/en/lines"
  mapfile -t zh_lines <"$work/$pairno/zh/lines"
  n_en=${#en_lines[@]}
  n_zh=${#zh_lines[@]}
  if ((n_en != n_zh)); then
    echo "FAIL $en <-> $zh: $n_en code blocks in $en, $n_zh in $zh (mermaid not counted)"
    failed=1
  fi
  max=$((n_en > n_zh ? n_en : n_zh))
  for ((i = 1; i <= max; i++)); do
    b=$(printf '%04d' "$i")
    a="$work/$pairno/en/$b"
    z="$work/$pairno/zh/$b"
    [[ -f $a ]] || : >"$a"
    [[ -f $z ]] || : >"$z"
    if ! cmp -s "$a" "$z"; then
      echo "FAIL $en <-> $zh: code block $i differs" \
        "($en line ${en_lines[i - 1]:-none}, $zh line ${zh_lines[i - 1]:-none})"
      diff -u --label "$en block $i" --label "$zh block $i" "$a" "$z" || true
      failed=1
      # With a block added or missing, every later block differs too: the first is enough.
      ((n_en == n_zh)) || break
    fi
  done

  # 2. Same ##/### headings, in the same order.
  heading_levels "$en" >"$work/$pairno/en.headings"
  heading_levels "$zh" >"$work/$pairno/zh.headings"
  if ! cmp -s <(cut -d' ' -f1 "$work/$pairno/en.headings") <(cut -d' ' -f1 "$work/$pairno/zh.headings"); then
    echo "FAIL $en <-> $zh: headings differ:" \
      "$(grep -c '^## ' "$work/$pairno/en.headings" || true) ## and" \
      "$(grep -c '^### ' "$work/$pairno/en.headings" || true) ### in $en," \
      "$(grep -c '^## ' "$work/$pairno/zh.headings" || true) ## and" \
      "$(grep -c '^### ' "$work/$pairno/zh.headings" || true) ### in $zh"
    # The first position where the heading levels differ (or one side has no more headings).
    paste -d'\t' "$work/$pairno/en.headings" "$work/$pairno/zh.headings" |
      awk -F'\t' -v en="$en" -v zh="$zh" '
        { split($1, a, " "); split($2, b, " ") }
        a[1] != b[1] {
          printf "  first difference in level, heading %d:\n    %s: %s\n    %s: %s\n", NR, en,
            ($1 == "" ? "(none)" : $1), zh, ($2 == "" ? "(none)" : $2)
          exit
        }'
    failed=1
  fi
  n_headings=$(wc -l <"$work/$pairno/en.headings")

  # 3. Relative links in the translation resolve.
  if ! broken=$(check_links "$zh"); then
    echo "FAIL $en <-> $zh: broken relative link(s) in $zh:"
    printf '%s\n' "$broken"
    failed=1
  fi

  if ((failed)); then
    status=1
  else
    echo "ok   $en <-> $zh: $n_en code blocks identical, $n_headings ##/### headings match, links resolve"
  fi
done
exit "$status"
