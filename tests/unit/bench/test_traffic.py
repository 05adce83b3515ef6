"""What the benchmark's clients send: chat messages with a tenant's system prompt, adapters
in turn or by Zipf popularity, and the scenario plan that pairs them with servers."""

from __future__ import annotations

import argparse
import collections

from bench.load import QUESTIONS, RequestMix, tenant_system_prompt
from bench.run import Adapters, build_parser, plan_scenarios


def test_chat_bodies_carry_each_tenants_own_system_prompt():
    systems = {"a": tenant_system_prompt(0), "b": tenant_system_prompt(1)}
    mix = RequestMix(("a", "b", None), questions=QUESTIONS, system_prompts=systems)
    bodies = [mix.body(n) for n in range(6)]
    assert [b.get("adapter") for b in bodies] == ["a", "b", None, "a", "b", None]
    assert bodies[0]["messages"][0] == {"role": "system", "content": systems["a"]}
    assert bodies[1]["messages"][0]["content"] == systems["b"] != systems["a"]
    assert bodies[2]["messages"] == [{"role": "user", "content": QUESTIONS[2]}]  # the template's default
    assert 200 <= len(systems["a"].split()) <= 260  # about 300 tokens of prose


def test_zipf_popularity_follows_one_over_rank():
    adapters = tuple(f"x{i}" for i in range(50))
    mix = RequestMix(adapters, prompts=("p",), popularity="zipf", seed=3)
    counts = collections.Counter(mix.adapter(n) for n in range(40_000))
    harmonic = sum(1 / (i + 1) for i in range(50))
    for rank in (0, 1, 4, 9):
        expected = 40_000 / (rank + 1) / harmonic
        assert abs(counts[adapters[rank]] - expected) < 0.1 * expected
    assert mix.adapter(123) == RequestMix(adapters, prompts=("p",), popularity="zipf", seed=3).adapter(123)


def test_the_plan_runs_each_scenario_on_its_own_server():
    options = build_parser().parse_args(["--quick", "--store-adapters", "5"])
    for key, value in (("rounds", 1), ("measure", 40), ("warmup", 8), ("naive_measure", 60)):
        setattr(options, key, value)
    names = [f"bench-{i:02d}" for i in range(32)]
    adapters = Adapters(names, ["date-iso"] + names[:7], names[:8], [f"many-{i:03d}" for i in range(5)])
    plan = {s.name: s for s in plan_scenarios(options, adapters)}
    assert plan["d: naive chat K=8"].server == "naive" and plan["d: chat K=8"].mix.questions
    assert plan["d: chat K=8"].max_new_tokens == 256 and not plan["d: chat K=8"].stagger
    assert plan["e: prefix cache off"].server == "adaptserve-no-prefix-cache"
    assert plan["e: prefix cache on"].mix.system_prompts.keys() == set(names[:8])
    assert {plan[n].server for n in ("f: K=1", "f: 5 uniform", "f: 5 zipf")} == {"adaptserve-many"}
    assert plan["f: 5 zipf"].mix.popularity == "zipf"
    assert isinstance(options, argparse.Namespace)
