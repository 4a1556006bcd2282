#!/usr/bin/env bash
# Run the numerics-sensitive tests (`-m numerics`) once under each OpenBLAS kernel
# set this CPU can execute: Haswell (AVX2; what AMD Zen CPUs get) and SkylakeX
# (AVX-512). `agentcache doctor` names the set a plain run picks.
set -euo pipefail
cd "$(dirname "$0")/.."
flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
has() { [[ " $flags " == *" $1 "* ]]; }
for core in Haswell SkylakeX; do
  case $core in
    Haswell) has avx2 && has fma || { echo "kernel set $core: not run, this CPU lacks AVX2/FMA"; continue; } ;;
    SkylakeX) has avx512f && has avx512bw && has avx512vl && has avx512dq || { echo "kernel set $core: not run, this CPU lacks AVX-512"; continue; } ;;
  esac
  echo "kernel set $core: $(OPENBLAS_CORETYPE=$core agentcache doctor | grep -m1 '^blas ')"
  OPENBLAS_CORETYPE=$core python -m pytest -q -m numerics
done
