#!/bin/sh
# Fails if the library's sources use the heap or hold mutable static/global state.
set -eu
src=${1:-$(dirname "$0")/../src}
status=0
if grep -nE '\b(malloc|calloc|realloc|free|alloca)[[:space:]]*\(' "$src"/*.c "$src"/*.h; then
  echo "heap use in $src" >&2; status=1
fi
# static variables that are not const (static functions, static inline and static const are fine)
if grep -nE '^[[:space:]]*static[[:space:]]' "$src"/*.c "$src"/*.h | grep -vE 'static[[:space:]]+(inline[[:space:]]+)?const[[:space:]]|static[[:space:]]+const[[:space:]]+char[[:space:]]+\*const' | grep -vE '\)[[:space:]]*\{?[[:space:]]*$|\)[[:space:]]*\{.*\}[[:space:]]*$|\([^;]*$' ; then
  echo "static non-const variables in $src" >&2; status=1
fi
# file-scope variables (a declaration at column 0 that is not a function, type or macro)
if grep -nE '^[A-Za-z_][A-Za-z0-9_ \*]*[[:space:]]+\**[A-Za-z_][A-Za-z0-9_]*[[:space:]]*(\[[^]]*\])?[[:space:]]*(=[^=].*)?;' "$src"/*.c | grep -vE '^[^:]*:[0-9]+:(typedef|extern|struct [a-z_]+;)'; then
  echo "global variables in $src" >&2; status=1
fi
[ $status = 0 ] && echo "no heap, no mutable globals in $src"
exit $status
