"""The one config parser: YAML sections + overrides, nested sub-configs, conversions PyYAML gets wrong, bad input
named; every command parses the same way; shipped configs parse."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from pairloop.config import build_config, read_sections

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "configs" / "demo.yaml")
SEED = str(ROOT / "configs" / "seed-3b.yaml")


@dataclass(frozen=True)
class Inner:
    a: int = 1
    b: float = 0.5


@dataclass(frozen=True)
class Toy:
    lr: float = 0.1
    steps: int = 3
    name: str = "x"
    flag: bool = False
    seeds: list[int] = field(default_factory=lambda: [0])
    weights: dict[str, float] = field(default_factory=dict)
    maybe: str | None = None
    inner: Inner = field(default_factory=lambda: Inner(a=7))

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ValueError(f"toy.steps must be > 0, got {self.steps}")


def _toy(argv, section="gen"):
    return build_config(Toy, read_sections(argv, default_section=section).get(section, {}), section)


def test_yaml_section_then_overrides_with_types(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("gen:\n  lr: 1e-5\n  steps: 7\neval:\n  steps: 99\n")
    cfg = _toy(["--config", str(f), "gen.flag=true", "seeds=[1,2]", "weights={A: 3}", "eval.x=1"])
    assert cfg.lr == 1e-5 and isinstance(cfg.lr, float)  # PyYAML alone reads 1e-5 as the string "1e-5"
    assert cfg.steps == 7 and cfg.flag is True and cfg.seeds == [1, 2] and cfg.weights == {"A": 3.0}
    assert _toy(["maybe=null"]).maybe is None


def test_nested_sub_config_keeps_the_defaults_it_does_not_name(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("gen:\n  inner:\n    b: 2\n")
    cfg = _toy(["--config", str(f)])
    assert cfg.inner == Inner(a=7, b=2.0)  # a=7 is Toy's own default for inner, not Inner's a=1
    assert _toy(["gen.inner.a=3"]).inner == Inner(a=3, b=0.5)
    assert _toy(["--config", str(f), "gen.inner.a=4"]).inner == Inner(a=4, b=2.0)


@pytest.mark.parametrize("argv,msg", [(["steps=abc"], "gen.steps: expected an int"), (["steps=0"], "toy.steps"),
                                      (["stesp=3"], r"gen: unknown field\(s\) \['stesp'\]"),
                                      (["flag=maybe"], "gen.flag"), (["inner.c=1"], r"gen.inner: unknown field"),
                                      (["inner.a=x"], "gen.inner.a: expected an int"), (["inner=3"], "gen.inner"),
                                      (["steps"], "section.field=value"),
                                      (["--config", "/nonexistent.yaml"], "no such file"),
                                      (["--config"], "needs a file path"), (["steps=1.5"], "gen.steps")])
def test_bad_input_is_named(argv, msg):
    with pytest.raises(ValueError, match=msg):
        _toy(argv)


def test_unknown_section_in_file_or_override_is_refused(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("gne:\n  steps: 3\n")
    with pytest.raises(ValueError, match="unknown section"):
        read_sections(["--config", str(f)], default_section="gen")
    # a typo (gne.n=3) or `ray job submit` quoting must not be silently dropped
    with pytest.raises(ValueError, match="unknown section 'gne'"):
        read_sections(["gne.steps=3"])


@pytest.mark.parametrize("form", ["--config={}", "--config {}"])
def test_both_config_forms_give_identical_loop_configs(form):
    """`pairloop run --config=FILE` once dropped every stage section (two parsers); now both forms are one parse."""
    from pairloop.loop import loop_configs

    c = loop_configs(form.format(DEMO).split(" "))
    demo = yaml.safe_load(Path(DEMO).read_text())
    assert c.gen.n == demo["gen"]["n"] and c.gen.sampling.temperature == demo["gen"]["sampling"]["temperature"]
    assert c.pairs.num_pairs == demo["pairs"]["num_pairs"]
    assert c.train.learning_rate == demo["train"]["learning_rate"]
    assert c.eval.sampling.max_tokens == demo["eval"]["sampling"]["max_tokens"]
    assert c == loop_configs(["--config", DEMO])


@pytest.mark.parametrize("stage", ["gen", "pairs", "train", "eval"])
def test_single_stage_commands_read_the_file_the_same_way(stage):
    from pairloop.cli import stage_configs
    from pairloop.loop import loop_configs

    loop = loop_configs(["--config", DEMO])
    extra = {"eval": ["eval.adapters=[]"], "pairs": ["pairs.inputs=[runs/x/gen]", "pairs.eval_problems=humaneval"],
             "train": ["train.pairs=[runs/x/pairs]", "train.out=runs/x/adapter"]}.get(stage, [])
    own = stage_configs(["--config", DEMO, *extra], stage, (stage,))[stage]
    wired = getattr(loop, stage)
    # every field the loop does not wire comes out the same from either command
    from pairloop.loop import WIRED

    for name in own.__dataclass_fields__:
        if name not in WIRED[stage]:
            assert getattr(own, name) == getattr(wired, name), name


def test_single_stage_command_refuses_a_typo_in_another_section():
    from pairloop.cli import stage_configs

    with pytest.raises(ValueError, match=r"pairs: unknown field\(s\) \['num_pair'\]"):
        stage_configs(["--config", DEMO, "pairs.num_pair=3"], "gen", ("gen", "engine"))


def test_loop_refuses_a_wired_field_set_by_hand():
    from pairloop.loop import loop_configs

    with pytest.raises(ValueError, match="gen.out is set by the loop"):
        loop_configs(["--config", DEMO, "gen.out=/tmp/elsewhere"])
    with pytest.raises(ValueError, match="needs a section"):
        loop_configs(["--config", DEMO, "n=4"])


def test_loop_wires_the_pairs_window_into_adaptive_gen():
    from pairloop.loop import loop_configs

    window = ["pairs.pass_rate_min=0.1", "pairs.pass_rate_max=0.8"]
    c = loop_configs(["--config", DEMO, "gen.policy=adaptive", "gen.first_round=4", "gen.round_size=4", *window])
    assert (c.gen.pass_rate_min, c.gen.pass_rate_max) == (0.1, 0.8)
    u = loop_configs(["--config", DEMO, *window])  # uniform draws the same samples whatever the window
    assert (u.gen.pass_rate_min, u.gen.pass_rate_max) == (0.05, 0.95)
    with pytest.raises(ValueError, match=r"gen.pass_rate_min is set by the loop.*pairs.pass_rate_min/max"):
        loop_configs(["--config", DEMO, "gen.pass_rate_min=0.2"])


def test_loop_warns_when_enough_per_side_cannot_fill_the_pairs_cap():
    """k distinct texts a side give at most k x pairs.max_reuse pairs: below ceil(cap / max_reuse) the cap cannot be
    filled, said at parse time; at it, nothing is said. The pairs' excluded outcomes reach gen."""
    import warnings

    from pairloop.loop import loop_configs

    ada = ["--config", DEMO, "gen.policy=adaptive", "gen.first_round=4", "gen.round_size=4", "gen.stop_confidence=0.2",
           "gen.n=16", "pairs.max_pairs_per_problem=5", "pairs.max_reuse=2"]
    with pytest.warns(RuntimeWarning, match=r"gen.enough_per_side=2 .*max_pairs_per_problem.*3 per side can"):
        loop_configs([*ada, "gen.enough_per_side=2"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = loop_configs([*ada, "gen.enough_per_side=3", "pairs.exclude_outcomes=[NO_CODE,TIMEOUT]"])
    assert c.gen.enough_per_side == 3 and c.gen.enough_exclude == ["NO_CODE", "TIMEOUT"]
    with pytest.raises(ValueError, match="gen.enough_exclude is set by the loop"):
        loop_configs([*ada, "gen.enough_exclude=[TIMEOUT]"])


def test_demo_config_wires_the_loop():
    from tasks.problems import select_problems

    from pairloop.loop import loop_configs

    c = loop_configs(["--config", DEMO])
    assert c.gen.split == "train" and c.eval.split == "eval"
    assert c.pairs.inputs == [c.gen.out] and list(c.train.pairs) == [c.pairs.out]
    assert c.train.max_lora_rank == c.engine.max_lora_rank and c.train.lora_r <= c.engine.max_lora_rank
    # the problem sets the stages see, not the strings naming them
    gen_ids = {p.id for p in select_problems(c.gen.problems, c.gen.split, c.gen.eval_fraction, c.gen.split_seed)}
    eval_ids = {p.id for p in select_problems(c.eval.problems, c.eval.split, c.eval.eval_fraction,
                                              c.eval.split_seed)}
    held_out = {p.id for p in select_problems(c.pairs.eval_problems, "eval", c.pairs.eval_fraction,
                                              c.pairs.split_seed)}
    assert gen_ids and eval_ids and not gen_ids & eval_ids
    assert held_out == eval_ids  # the pairs stage's leakage guard looks at exactly the problems eval uses
    assert len(gen_ids | eval_ids) == 164


def test_seed_config_is_the_experiment_at_reference_scale():
    """seed-3b.yaml is the GPU counterpart of experiment-cpu.yaml: the same loop stages and arms, the reference's
    scale, and two problem sets (train on all of MBPP, evaluate on all of HumanEval) wired by the loop."""
    from pairloop.loop import loop_configs

    c = loop_configs(["--config", SEED])
    cpu = loop_configs(["--config", str(ROOT / "configs" / "experiment-cpu.yaml")])
    assert set(c.arms) == set(cpu.arms) == {"balanced", "proportional"}
    for arm in c.arms:
        assert c.arms[arm][0].balance == cpu.arms[arm][0].balance
    assert c.engine.tensor_parallel_size >= 1
    assert c.gen.n >= 100 and c.gen.execution.executor == "ray"
    assert all(p.num_pairs == 500 for p, _ in c.arms.values())
    assert all(t.lora_r <= c.engine.max_lora_rank for _, t in c.arms.values())
    assert c.eval.seeds == [0, 1, 2] and c.eval.problems == "humaneval" and c.eval.split == "all"
    assert c.gen.problems == "mbpp" and c.gen.split == "all"  # MBPP for training, HumanEval for evaluation
    for p, _ in c.arms.values():  # the pairs' leakage guard is aimed at the eval set, all of it
        assert p.eval_problems == "humaneval" and p.eval_fraction is None


def test_demo_engines_run_float32_whatever_the_cpu():
    # An adapter trained like the demo's (lr 2e-5, a few steps) moved the hot-load probe by L2 ~0.03 (the
    # experiment's run 1), far inside what a bf16 engine's noise lets the check resolve (4 x ~0.2): with engine.dtype
    # auto a bf16-capable CPU would refuse the demo's adapter eval after all the work before it. float32: ~1e-5.
    from pairloop.loop import loop_configs

    assert loop_configs(["--config", DEMO]).engine.dtype == "float32"
