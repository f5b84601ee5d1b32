#!/usr/bin/env bash
# Code and data size of the library on an ARM Cortex-M4 (Thumb-2, -Os), per source file, and the
# size of the structs a 32-key x 256-byte mirror needs (Debian: apt-get install gcc-arm-none-eabi).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v arm-none-eabi-gcc >/dev/null 2>&1 || { echo "needs arm-none-eabi-gcc (Debian: gcc-arm-none-eabi)" >&2; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
flags=(-mcpu=cortex-m4 -mthumb -Os -std=c99 -Wall -Wextra -Wpedantic -Wconversion -Wshadow -Werror
       -ffunction-sections -fdata-sections -Iinclude)
for f in src/*.c; do
  arm-none-eabi-gcc "${flags[@]}" -fstack-usage -c "$f" -o "$out/$(basename "$f" .c).o"
done
echo "ARM Cortex-M4, arm-none-eabi-gcc $(arm-none-eabi-gcc -dumpversion), -Os -mthumb:"
arm-none-eabi-size -t "$out"/client.o "$out"/json.o "$out"/mirror.o
echo
echo "Deepest stack frames (bytes; nothing in the library recurses):"
cat "$out"/*.su | sort -t$'\t' -k2 -n -r | head -5 | sed 's/^/  /'
# The structs, measured by the compiler for the target (sizeof as array lengths, read back by nm).
cat >"$out/sizes.c" <<'C'
#include "ddp/ddp.h"
char sizeof_ddp_client[sizeof(ddp_client)];
char sizeof_ddp_mirror[sizeof(ddp_mirror)];
char sizeof_ddp_entry[sizeof(ddp_entry)];
char sizeof_ddp_token[sizeof(ddp_token)];
char tokens_for_32x256[DDP_TOKENS_FOR(32, 256) * sizeof(ddp_token)];
char storage_32x64x256[32 * sizeof(ddp_entry) + 32 * 65 + 32 * 257];
C
arm-none-eabi-gcc "${flags[@]}" -fcommon -c "$out/sizes.c" -o "$out/sizes.o"
echo
echo "RAM (bytes) on the target:"
arm-none-eabi-nm -S --size-sort "$out/sizes.o" | while read -r _ size _ name; do
  printf '  %-22s %6d\n' "$name" "$((16#$size))"
done
