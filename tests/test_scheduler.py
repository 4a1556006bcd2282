"""The batched scheduler on the real SmolLM2: batch == alone, reloads hidden
behind decoding, cancellation, slow readers, and `agentcache run`."""

import json
import threading
import time
from pathlib import Path

import mlx_agentcache  # noqa: F401  (loads the BLAS before mlx)
import pytest

from mlx_agentcache.models.runner import ModelRunner
from mlx_agentcache.pool import CachePool
from mlx_agentcache.scheduler import Scheduler, Turn

TEXT = " ".join(f"Note {i}: the {'red' if i % 3 else 'blue'} box holds {i * 7 % 11} apples." for i in range(60))


@pytest.fixture(scope="module")
def runner(model_home, smollm2_path):
    return ModelRunner.load(str(smollm2_path), model_home)


@pytest.fixture
def sched(runner, tmp_path):
    # no shared prefixes: agents here repeat prompts, and a shared segment would change float summation order
    pool = CachePool(tmp_path / "agents", runner.fingerprint, runner.new_cache, float("inf"), share_prefixes=False)
    s = Scheduler(runner, pool, max_batch=4, prefill_chunk=128)
    yield s
    s.close(cancel=True)


def chat(runner, text: str) -> list[int]:
    msgs = [{"role": "user", "content": text}]
    return list(runner.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))


def make_warm(sched, name: str, prompt: list[int]) -> None:
    """A saved agent that is no longer in memory."""
    sched.submit(Turn(name, prompt, max_tokens=1)).wait()
    assert not sched.pool.flush()
    sched.pool.forget(name)
    assert sched.pool.tier(name) == "warm"


def after_tokens(h, n: int, timeout: float = 120.0) -> None:
    """Return once turn `h` generated `n` tokens, woken by its own stream (up to `timeout`)."""
    reached = threading.Event()

    def follow():
        try:
            for _ in h:
                if len(h.tokens) >= n:
                    reached.set()
        finally:
            reached.set()  # the turn ended (or failed): the assertion below says which

    threading.Thread(target=follow, daemon=True).start()
    assert reached.wait(timeout), f"{h.agent} generated {len(h.tokens)} tokens in {timeout} s"
    assert len(h.tokens) >= n, f"{h.agent} ended after {len(h.tokens)} tokens"


def decode_span(sched, agent: str) -> tuple[float, float]:
    steps = [(t0, t1) for kind, who, t0, t1 in sched.timeline if kind == "decode" and agent in who]
    return steps[0][0], steps[-1][1]


@pytest.mark.numerics
def test_batch_gives_each_agent_its_solo_tokens(sched, runner):
    words = TEXT.split()
    turns = [
        Turn("short", chat(runner, "Name three colors."), max_tokens=10),
        Turn("medium", chat(runner, " ".join(words[:120]) + " Which box is blue?"), max_tokens=10),
        Turn("long", chat(runner, " ".join(words[:330]) + " Summarize."), max_tokens=10),
        Turn("sampled", chat(runner, "Tell me a fact about cats."), max_tokens=10, temperature=0.8, seed=7),
    ]
    lengths = {len(t.prompt) for t in turns}
    assert len(lengths) == 4 and max(lengths) > 300
    solo = {}
    for t in turns:  # one at a time: every decode step has batch size 1
        h = sched.submit(Turn(t.agent + "-solo", t.prompt, t.max_tokens, t.temperature, t.seed))
        h.wait()
        solo[t.agent] = h.tokens
    handles = [sched.submit(t) for t in turns]
    for h in handles:
        h.wait()
        assert h.tokens == solo[h.agent], h.agent
        assert h.stats.generated_tokens == len(h.tokens) > 0
    assert max(len(who) for kind, who, *_ in sched.timeline if kind == "decode") >= 3


@pytest.mark.numerics
def test_n_choices_fork_one_prefill_and_sample_as_their_seeds_alone(sched, runner):
    prompt = chat(runner, "Tell me a fact about cats.")
    solo = []
    for seed in (7, 8, 9):  # choice i samples as a lone turn seeded seed + i
        h = sched.submit(Turn(f"solo-{seed}", prompt, max_tokens=8, temperature=0.9, seed=seed))
        h.wait()
        solo.append(h.tokens)
    assert len({tuple(t) for t in solo}) > 1  # the seeds differ, so must the choices
    h = sched.submit(Turn("forked", prompt, max_tokens=8, temperature=0.9, seed=7, n=3, top_logprobs=2))
    h.wait()
    assert [c.wait() is not None and c.tokens for c in [h, *h.branches]] == solo
    assert sum(1 for kind, who, *_ in sched.timeline if kind == "prefill" and "forked" in who) == 1
    for c in [h, *h.branches]:
        assert [t for t, _, _ in c.logprobs] == c.tokens
        for tok, lp, top in c.logprobs:
            assert lp <= 0 and len(top) == 2 and top[0][1] >= top[1][1]
            assert abs(dict(top).get(tok, lp) - lp) < 1e-5


@pytest.mark.numerics
def test_greedy_logprobs_rank_the_chosen_token_first(sched, runner):
    h = sched.submit(Turn("greedy", chat(runner, "Name three colors."), max_tokens=6, top_logprobs=3))
    h.wait()
    assert len(h.logprobs) == len(h.tokens) == 6
    for tok, lp, top in h.logprobs:
        assert top[0][0] == tok and abs(top[0][1] - lp) < 1e-5 and -50 < lp <= 0


def test_reload_runs_inside_another_agents_decode(sched, runner):
    prompt = chat(runner, TEXT[:1500])
    make_warm(sched, "sleeper", prompt)
    talker = sched.submit(Turn("talker", chat(runner, "Count from one to forty, in words, separated by commas."), max_tokens=40))
    after_tokens(talker, 3)
    sleeper = sched.submit(Turn("sleeper", prompt + chat(runner, "Which box is red?"), max_tokens=4))
    sleeper.wait()
    talker.wait()
    assert sleeper.stats.tier == "warm" and sleeper.stats.restored_tokens > 300
    (load,) = [(t0, t1) for kind, who, t0, t1 in sched.timeline if kind == "load" and who == ("sleeper",)]
    first, last = decode_span(sched, "talker")
    assert first < load[0] and load[1] < last, "the reload must happen while the talker decodes"
    # the talker kept decoding while the file was read: a step overlaps the load
    assert any(t0 < load[1] and t1 > load[0] for kind, who, t0, t1 in sched.timeline if kind == "decode" and "talker" in who)


def test_newcomer_prefill_is_sliced_between_decode_steps(sched, runner):
    talker = sched.submit(Turn("talker", chat(runner, "Count from one to forty, in words, separated by commas."), max_tokens=40))
    after_tokens(talker, 2)
    newcomer = sched.submit(Turn("newcomer", chat(runner, TEXT[:1500]), max_tokens=2))
    newcomer.wait()
    talker.wait()
    assert newcomer.stats.prefilled_tokens > 3 * sched.prefill_chunk
    slices = [(t0, t1) for kind, who, t0, t1 in sched.timeline if kind == "prefill" and who == ("newcomer",)]
    assert len(slices) >= 4
    between = [t0 for kind, who, t0, _ in sched.timeline if kind == "decode" and "talker" in who and slices[0][1] <= t0 < slices[-1][0]]
    assert len(between) >= len(slices) - 1, "the talker decodes between the newcomer's prefill slices"


def test_prefetch_reads_before_the_turn_arrives(sched, runner):
    prompt = chat(runner, TEXT[:800])
    make_warm(sched, "next", prompt)
    assert sched.prefetch("next")
    assert not sched.prefetch("next")  # already under way
    deadline = time.time() + 30
    while "next" not in sched._ready and time.time() < deadline:
        time.sleep(0.01)
    h = sched.submit(Turn("next", prompt, max_tokens=2))
    h.wait()
    assert h.stats.tier == "warm" and h.stats.prefetched and h.stats.prefilled_tokens == 1


def test_cancel_returns_the_cache_and_frees_queued_turns(runner, tmp_path):
    pool = CachePool(tmp_path / "agents", runner.fingerprint, runner.new_cache, float("inf"), share_prefixes=False)
    sched = Scheduler(runner, pool, max_batch=1)
    try:
        running = sched.submit(Turn("runner", chat(runner, "Count from one to fifty."), max_tokens=200))
        queued = sched.submit(Turn("queued", chat(runner, "Hello."), max_tokens=5))
        pieces = iter(running)
        next(pieces)
        queued.cancel(wait=True)
        assert queued.status == "cancelled" and queued.tokens == []
        assert pool.tier("queued") == "cold" and "queued" not in pool.busy
        running.cancel(wait=True)
        assert running.status == "cancelled" and running.stats.cancelled
        assert 0 < len(running.tokens) < 200
        assert "runner" not in pool.busy and pool.tier("runner") == "hot"  # back in the pool, not lost
        assert list(pieces)  # the stream ends with what was generated
        # a prefetched cache nobody claims is dropped again on close
        assert not pool.flush()
        pool.forget("runner")
        assert sched.prefetch("runner")
    finally:
        sched.close()
    assert "runner" not in pool.busy and pool.tier("runner") == "warm"


def test_slow_reader_does_not_stall_others(sched, runner):
    slow = sched.submit(Turn("slow", chat(runner, "Count from one to twenty."), max_tokens=12))
    fast = sched.submit(Turn("fast", chat(runner, "Name three animals."), max_tokens=12))
    got = "".join(fast)  # never touch `slow` meanwhile
    assert got and fast.done
    slow.wait(60)
    assert slow.done, "the unread turn finished on its own"
    assert "".join(slow) == slow.text


def test_run_command_streams_a_workflow(runner, model_home, smollm2_path, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mlx_agentcache.cli import app

    monkeypatch.setenv("AGENTCACHE_HOME", str(model_home))
    debate = Path(__file__).parent.parent / "examples" / "debate.yaml"
    args = ["run", str(debate), "--model", str(smollm2_path), "--cache-dir", str(tmp_path), "--max-tokens", "3"]
    out = CliRunner().invoke(app, args + ["--cache-budget", "200KiB"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert sum(line.startswith("pro: ") for line in lines) == 3 and sum(line.startswith("con: ") for line in lines) == 3
    assert "[pro: cold" in out.output and "ttft" in out.output
    assert "warm, prefetched" in out.output  # the budget evicts; the known order reads ahead
    again = CliRunner().invoke(app, args + ["--json"])
    assert again.exit_code == 0, again.output
    turns = json.loads(again.output.strip().splitlines()[-1])["turns"]
    turns = [t for t in turns if not t.get("handoff_from")]  # the debate hands each argument over as a cache card
    assert [t["agent"] for t in turns] == ["pro", "con"] * 3
    assert all(t["restored_tokens"] > 0 for t in turns)
