"""Generation metrics on fixed strings, greedy generation, and the held-out-clients protocol."""

from pathlib import Path

import pytest

from conftest import tiny_overrides
from fedlora import load_config
from fedlora.config.loader import ConfigError
from fedlora.data.encoding import Encoder
from fedlora.data.examples import Example
from fedlora.engine.embedded import EmbeddedEngine, evaluation_clients
from fedlora.eval.generation import exact_match, generate, normalize_answer, rouge_l
from fedlora.runner import build_simulation


def test_rouge_l_by_hand() -> None:
    # LCS of "the cat sat on the mat" and "the cat is on the mat" = the cat on the mat (5 tokens)
    # precision 5/6, recall 5/6 -> F = 5/6
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # prediction "a b c" vs reference "a c": LCS 2, P = 2/3, R = 1 -> F = 0.8
    assert rouge_l("a b c", "a c") == pytest.approx(0.8)
    assert rouge_l("", "anything") == 0.0
    assert rouge_l("Running fast", "run fast") == pytest.approx(1.0)  # Porter stemming


def test_exact_match_normalisation() -> None:
    assert normalize_answer("  The Answer: 42! ") == "answer 42"
    assert exact_match("The answer: 42.", "answer 42") == 1.0
    assert exact_match("43", "42") == 0.0


def test_greedy_generation_is_deterministic_and_batch_independent(tmp_path: Path) -> None:
    cfg = load_config(None, tiny_overrides(tmp_path))
    sim, _ = build_simulation(cfg)
    model = sim.adapters.model
    sim.adapters.load(sim.server.global_state)
    encoder = Encoder(sim.encoder.tokenizer, "causal-lm", 64, "alpaca")
    examples = [Example(instruction=f"Say {w}", output=w) for w in ("hi", "a longer instruction here", "x")]
    one_by_one = [generate(model, encoder, [e], 1, 6)[0] for e in examples]
    batched = generate(model, encoder, examples, 3, 6)
    assert batched == one_by_one  # left padding does not change greedy outputs
    assert generate(model, encoder, examples, 3, 6) == batched


def test_held_out_clients_never_train_and_are_evaluated(tmp_path: Path) -> None:
    overrides = tiny_overrides(
        tmp_path,
        **{
            "eval.held_out_clients": 1,
            "eval.split": "test",
            "eval.final_metrics": "[rouge-l, exact-match, task-score]",
            "eval.max_new_tokens": 4,
            "federation.rounds": 1,
            "federation.clients_per_round": 3,
        },
    )
    cfg = load_config(None, overrides)
    sim, _ = build_simulation(cfg)
    fed = sim.federation
    assert len(fed.clients) == 3 and len(fed.held_out) == 1
    assert fed.held_out[0].client_id == 3 and fed.held_out[0].name not in {c.name for c in fed.clients}
    assert evaluation_clients(cfg.eval, cfg.federation.seed, fed) == fed.held_out
    engine = EmbeddedEngine(sim, tmp_path)
    record = engine.run_round(1)
    assert {c["client"] for c in record["clients"]} == {0, 1, 2}
    assert record["eval_clients"] == 1 and record["eval_generated"] == len(fed.held_out[0].test)
    assert 0.0 <= record["eval_rouge_l"] <= 1.0 and 0.0 <= record["eval_exact_match"] <= 1.0
    assert 0.0 <= record["eval_task_score"] <= 1.0


def test_generation_metrics_are_refused_for_classification(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="need generations"):
        load_config(
            None, ["model.task=classification", "data.source=bbc-news", "eval.metrics=[loss, rouge-l]"]
        )


def test_too_many_held_out_clients_is_a_clear_error(tmp_path: Path) -> None:
    cfg = load_config(None, tiny_overrides(tmp_path, **{"eval.held_out_clients": 4}))
    with pytest.raises(ValueError, match="leaves no training client"):
        build_simulation(cfg)


def test_macro_f1_by_hand() -> None:
    from fedlora.eval.loss import macro_f1

    # class 0: TP 1, FP 1, FN 1 -> 2/4 = 0.5; class 1: TP 1, FP 0, FN 1 -> 2/3; class 2: TP 0, FP 1, FN 0 -> 0
    assert macro_f1([0, 0, 1, 1], [0, 2, 1, 0]) == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)
    assert macro_f1([1, 1], [1, 1]) == 1.0


def test_reasoning_gym_task_score_uses_the_tasks_own_scorer(tmp_path: Path) -> None:
    from fedlora.data.sources import reasoning_gym_examples
    from fedlora.eval.generation import task_score

    example = reasoning_gym_examples(["gcd"], 1, seed=3)[0]
    assert task_score(example.output, example) == 1.0
    assert task_score(str(int(example.output) + 1), example) == 0.0
    with pytest.raises(ValueError, match="reasoning-gym"):
        task_score("1", Example(instruction="q", output="1"))
    with pytest.raises(ConfigError, match="task-score uses reasoning-gym"):
        load_config(None, ["data.source=natural-instructions", "eval.final_metrics=[task-score]"])


def test_rounds_evaluate_a_sample_and_the_last_round_everyone(tmp_path: Path) -> None:
    cfg = load_config(None, tiny_overrides(tmp_path, **{"eval.max_clients": 1, "federation.rounds": 2}))
    sim, _ = build_simulation(cfg)
    engine = EmbeddedEngine(sim, tmp_path)
    assert engine.run_round(1)["eval_clients"] == 1
    assert engine.run_round(2)["eval_clients"] == len(sim.federation.clients) == 4
