"""Writes the cache files in this folder with the store code of commit 553b79e
(container version 2, formats agentcache-kv-2 and agentcache-prefix): one
agent per KV mode of the tiny test model, two agents sharing a prefix block
(q4), and a version 1 file (format agentcache-kv, no kv_mode), the relabelled
q4 file that code still read. Kept to show how they were made; later code
writes other files, so rerunning it does not reproduce these.

    python tests/data/store_v2/make.py
"""

import json
import shutil
import struct
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parents[1]))

from tiny import tiny_runner, tokens  # noqa: E402

from mlx_agentcache.pool import CachePool  # noqa: E402
from mlx_agentcache.store import container  # noqa: E402

MODES = ("fp16", "q8", "q4", "q4k", "q4c")
N = 300  # two q4c key groups, a 44-token 8-bit tail


def turn(pool, runner, name, prompt):
    pool.checkout(name)
    cache, reuse = pool.begin_turn(name, prompt)
    runner.prefill(prompt[reuse:], cache, logits=False)
    pool.checkin(name, cache)


def relabel_v1(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__")
    meta["format"] = "agentcache-kv"
    del meta["kv_mode"]
    meta["table_crc32"] = str(container._table_crc(header))
    meta["meta_crc32"] = str(container._meta_crc(meta))
    raw = json.dumps({**header, "__metadata__": meta}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    dst.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def main() -> None:
    for mode in MODES:
        d = HERE / mode
        shutil.rmtree(d, ignore_errors=True)
        runner = tiny_runner(kv_bits=mode)
        pool = CachePool(d, runner.fingerprint, runner.new_cache, budget_bytes=float("inf"), share_prefixes=False)
        turn(pool, runner, "agent", tokens(N))
        pool.close()
    runner = tiny_runner(kv_bits="q4")
    d = HERE / "shared"
    shutil.rmtree(d, ignore_errors=True)
    pool = CachePool(d, runner.fingerprint, runner.new_cache, budget_bytes=float("inf"))
    turn(pool, runner, "first", tokens(600))
    turn(pool, runner, "second", tokens(512) + tokens(40, seed=2))
    pool.close()
    d = HERE / "v1"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    relabel_v1(HERE / "q4" / "agent.safetensors", d / "agent.safetensors")
    for p in sorted(HERE.rglob("*")):
        if p.is_file() and p.suffix != ".py":
            print(p.relative_to(HERE), p.stat().st_size)


if __name__ == "__main__":
    main()
