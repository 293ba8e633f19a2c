#!/usr/bin/env bash
# The layering invariant of ARCHITECTURE.md ("Layers"), checked over the imports of src/.
#
# Every module of src/ stands on a floor (the table between the `layers` markers in
# ARCHITECTURE.md). A module may import only from modules on lower floors (or from within its
# own folder), and no files may import each other in a loop. Imports are read from the code:
# `crate::a::b` paths anywhere (`use` lines and inline paths), `super::`/`self::` paths, and the
# `use x::` / `pub use x::` of a folder's mod.rs naming its own child modules. A parent's
# `mod x;` is not an import. lib.rs (the module list) and main.rs (the binary) stand above all.
#
# Fails (exit 1) naming the file and the import for every import from a higher floor, every
# module without a floor, and every loop.
set -euo pipefail
cd "$(dirname "$0")/.."

doc=ARCHITECTURE.md
declare -A floor=()
while IFS='|' read -r _ n mods _; do
    n=${n// /}
    [[ $n =~ ^[0-9]+$ ]] || continue
    for m in $(grep -o '`[a-z_]*`' <<<"$mods" | tr -d '`'); do
        floor[$m]=$n
    done
done < <(sed -n '/<!-- layers -->/,/<!-- \/layers -->/p' "$doc")
if [[ ${#floor[@]} -eq 0 ]]; then
    echo "check-layers: no floors found between <!-- layers --> and <!-- /layers --> in $doc" >&2
    exit 1
fi

# Module path (a::b) of every source file; lib.rs and main.rs are not modules.
declare -A file_of=()
declare -A known=([proto]=generated)
for f in $(find src -name '*.rs' ! -path src/lib.rs ! -path src/main.rs | sort); do
    m=${f#src/}
    m=${m%.rs}
    m=${m%/mod}
    m=${m//\//::}
    file_of[$m]=$f
    known[$m]=$f
done

# The longest known module that `path` (a::b::Item) starts with.
module_of() {
    local path=$1
    while [[ -n $path ]]; do
        if [[ -n ${known[$path]:-} ]]; then
            echo "$path"
            return
        fi
        [[ $path == *::* ]] || return 0
        path=${path%::*}
    done
}

failed=0
edges=$(mktemp)
trap 'rm -f "$edges"' EXIT
for m in "${!file_of[@]}"; do
    f=${file_of[$m]}
    top=${m%%::*}
    if [[ -z ${floor[$top]:-} ]]; then
        echo "$f: module \`$top\` has no floor in $doc (Layers)"
        failed=1
        continue
    fi
    # The module `super::` names: the parent of this module (a mod.rs is its folder's module).
    if [[ $m == *::* ]]; then parent=${m%::*}; else parent=""; fi
    children=$(sed -n 's/^\s*\(pub \)\?mod \([a-z_0-9]*\);/\2/p' "$f")
    # Without comments (whole-line and trailing `//`), collect the paths; from `#[cfg(test)]` on
    # (the unit tests' module) `super::` is the file itself.
    tests_from=$(grep -n -m1 '^#\[cfg(test)\]' "$f" | cut -d: -f1 || true)
    while IFS=: read -r line path; do
        [[ -n $path ]] || continue
        up=$parent
        [[ -n $tests_from ]] && ((line > tests_from)) && up=$m
        case $path in
            crate::*) target=${path#crate::} ;;
            super::*) target=${path#super::}; [[ -n $up ]] && target=$up::$target ;;
            self::*) target=$m::${path#self::} ;;
            *) target=$m::$path ;;
        esac
        target=${target%::}
        to=$(module_of "$target")
        [[ -n $to && $to != "$m" ]] || continue
        # A module's own children may be named without `self::` only in `use` lines.
        if [[ $path != crate::* && $path != super::* && $path != self::* ]]; then
            grep -qx "${path%%::*}" <<<"$children" || continue
        fi
        echo "$m $to" >>"$edges"
        to_top=${to%%::*}
        if [[ $to_top != "$top" ]] && ((floor[$to_top] >= floor[$top])); then
            echo "$f:$line: \`$m\` (floor ${floor[$top]}) imports \`$to\` (floor ${floor[$to_top]}): an import from the same or a higher floor"
            failed=1
        fi
    done < <(sed -e 's#^\s*//.*##' -e 's#\s//[^"]*$##' "$f" |
        grep -noE '(crate|super|self)::[a-z_0-9]+(::[a-z_0-9]+)*(::)?|^\s*(pub(\([a-z]+\))? )?use [a-z_0-9]+::[a-z_0-9:]*' |
        sed -E 's/:\s*(pub(\([a-z]+\))? )?use /:/')
done

[[ -z ${CHECK_LAYERS_SHOW:-} ]] || sort -u "$edges"

# Loops: tsort names the files of each one it finds.
if ! loops=$(sort -u "$edges" | tsort 2>&1 >/dev/null); then
    echo "$loops" | head -n 40 | sed -e 's/^tsort: -: input contains a loop:/check-layers: these files import each other in a loop:/' -e 's/^tsort: /  /'
    failed=1
fi

if ((failed)); then
    echo "check-layers: the layering of src/ is broken (see ARCHITECTURE.md, Layers)" >&2
    exit 1
fi
echo "check-layers: $(sort -u "$edges" | wc -l) imports between $(echo "${!file_of[@]}" | wc -w) modules, all downward, no loop"
