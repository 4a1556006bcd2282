#!/usr/bin/env bash
# Run the numerics-sensitive tests (`-m numerics`) under each OpenBLAS kernel set
# this CPU can execute: Haswell (AVX2; what AMD Zen CPUs get) and SkylakeX
# (AVX-512). `agentcache doctor` names the set a plain run picks; with
# --except-default that set is left out (the whole suite just ran under it).
set -euo pipefail
cd "$(dirname "$0")/.."
default=""
[ "${1:-}" = --except-default ] && default=$(agentcache doctor | sed -n 's/^blas .*kernels \([A-Za-z0-9]*\).*/\1/p')
flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
has() { [[ " $flags " == *" $1 "* ]]; }
for core in Haswell SkylakeX; do
  case $core in
    Haswell) has avx2 && has fma || { echo "kernel set $core: not run, this CPU lacks AVX2/FMA"; continue; } ;;
    SkylakeX) has avx512f && has avx512bw && has avx512vl && has avx512dq || { echo "kernel set $core: not run, this CPU lacks AVX-512"; continue; } ;;
  esac
  if [ "$core" = "$default" ]; then echo "kernel set $core: the default here, the whole suite ran under it"; continue; fi
  echo "kernel set $core: $(OPENBLAS_CORETYPE=$core agentcache doctor | grep -m1 '^blas ')"
  OPENBLAS_CORETYPE=$core python -m pytest -q -n 2 -m numerics
done
