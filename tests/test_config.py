"""Typed configs: YAML + overrides, conversions PyYAML gets wrong, bad input named; shipped configs parse."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from pairloop.config import load_config

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Toy:
    lr: float = 0.1
    steps: int = 3
    name: str = "x"
    flag: bool = False
    seeds: list[int] = field(default_factory=lambda: [0])
    weights: dict[str, float] = field(default_factory=dict)
    maybe: str | None = None

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ValueError(f"toy.steps must be > 0, got {self.steps}")


def test_yaml_section_then_overrides_with_types(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("gen:\n  lr: 1e-5\n  steps: 7\neval:\n  steps: 99\n")
    cfg = load_config(Toy, ["--config", str(f), "gen.flag=true", "seeds=[1,2]", "weights={A: 3}", "eval.x=1"],
                      section="gen")
    assert cfg.lr == 1e-5 and isinstance(cfg.lr, float)  # PyYAML alone reads 1e-5 as the string "1e-5"
    assert cfg.steps == 7 and cfg.flag is True and cfg.seeds == [1, 2] and cfg.weights == {"A": 3.0}
    assert load_config(Toy, ["maybe=null"]).maybe is None


@pytest.mark.parametrize("argv,msg", [(["steps=abc"], "Toy.steps"), (["steps=0"], "toy.steps"),
                                      (["stesp=3"], "unknown field"), (["flag=maybe"], "Toy.flag"),
                                      (["steps"], "key=value"), (["--config", "/nonexistent.yaml"], "no such file")])
def test_bad_input_is_named(argv, msg):
    with pytest.raises(ValueError, match=msg):
        load_config(Toy, argv, section="gen")


def test_demo_config_wires_the_loop():
    from pairloop.loop import stage_configs

    c = stage_configs(["--config", str(ROOT / "configs" / "demo.yaml")])
    assert c.gen.split == "train" and c.eval.split == "eval"
    assert c.gen.problems == c.tasks.problems == c.pairs.eval_problems == "humaneval"
    assert c.gen.eval_fraction == c.eval.eval_fraction == c.pairs.eval_fraction
    assert c.pairs.inputs == [c.gen.out] and list(c.train.pairs) == [c.pairs.out]
    assert c.train.max_lora_rank == c.engine.max_lora_rank and c.train.lora_r <= c.engine.max_lora_rank


def test_seed_config_sections_parse():
    from eval.run import EvalConfig
    from gen.engine import EngineConfig
    from gen.run import GenConfig
    from pairs.config import PairsConfig
    from train.dpo import TrainConfig

    path = str(ROOT / "configs" / "seed-3b.yaml")
    assert load_config(EngineConfig, ["--config", path], section="engine").tensor_parallel_size >= 1
    gen = load_config(GenConfig, ["--config", path], section="gen")
    assert gen.n >= 100
    assert load_config(PairsConfig, ["--config", path], section="pairs").num_pairs == 500
    assert load_config(TrainConfig, ["--config", path], section="train").lora_r <= 16
    ev = load_config(EvalConfig, ["--config", path, "eval.adapters=[]"], section="eval")
    assert ev.seeds == [0, 1, 2] and ev.problems == "humaneval"
    sections = yaml.safe_load(Path(path).read_text())
    assert sections["gen"]["problems"] != sections["eval"]["problems"]  # trained problems never evaluated


def test_override_for_an_unknown_section_is_refused():
    # `ray job submit` quoting or a typo (gne.n=3) must not be silently dropped
    with pytest.raises(ValueError, match="unknown section 'gne'"):
        load_config(Toy, ["gne.steps=3"], section="gen")
